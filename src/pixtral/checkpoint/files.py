"""Finding a checkpoint's files and its config, in either layout."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pixtral.checkpoint.configs import args_from_hf_config, args_from_params_json
from pixtral.checkpoint.layout import hf_legacy_name, key_specs
from pixtral.checkpoint.quantized import StoredLinear, index_quantized
from pixtral.checkpoint.safetensors_io import TensorInfo, read_header
from pixtral.errors import CheckpointError, ConfigError
from pixtral.model.args import ModelArgs
from pixtral.quant.formats import StoredQuantization, read_quantization

MISTRAL, HF = "mistral", "hf"


@dataclass
class CheckpointFiles:
    root: Path
    layout: str  # MISTRAL or HF
    config_file: Path
    weight_files: list[Path]
    tokenizer_file: Path | None

    @cached_property
    def config(self) -> dict:
        """The config file's contents, read once (the args and the quantization both come from it)."""
        return _read_json(self.config_file)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None


def find_files(path: str | Path) -> CheckpointFiles:
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"{root}: no such checkpoint directory")
    if not root.is_dir():
        raise CheckpointError(f"{root}: a checkpoint is a directory (params.json or config.json plus *.safetensors)")
    tokenizer = root / "tekken.json"
    tokenizer = tokenizer if tokenizer.is_file() else None
    consolidated = sorted(root.glob("consolidated*.safetensors"))
    # Some releases ship both layouts side by side; the Mistral-native one is the reference.
    if (root / "params.json").is_file() and consolidated:
        return CheckpointFiles(root, MISTRAL, root / "params.json", consolidated, tokenizer)
    if (root / "config.json").is_file():
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: missing 'weight_map'")
            files = sorted({root / name for name in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{index}: lists {f.name}, which does not exist")
        else:
            files = sorted(root.glob("model*.safetensors"))
        if files:
            return CheckpointFiles(root, HF, root / "config.json", files, tokenizer)
        raise CheckpointError(f"{root}: config.json found but no model*.safetensors weights")
    if (root / "params.json").is_file():
        if list(root.glob("consolidated*.pth")):
            raise CheckpointError(f"{root}: only .pth weights found; convert them to consolidated.safetensors")
        raise CheckpointError(f"{root}: params.json found but no consolidated*.safetensors weights")
    raise CheckpointError(f"{root}: not a checkpoint (no params.json or config.json)")


def read_args(files: CheckpointFiles) -> ModelArgs:
    config = files.config
    if files.layout == MISTRAL:
        return args_from_params_json(config, source=str(files.config_file))
    return args_from_hf_config(config, source=str(files.config_file))


def read_stored_quantization(files: CheckpointFiles) -> StoredQuantization | None:
    """The quantization the checkpoint's config declares (None: float); an unsupported scheme is refused here."""
    return read_quantization(files.config, str(files.config_file), mistral=files.layout == MISTRAL)


def index_tensors(files: CheckpointFiles, args: ModelArgs, quantization: StoredQuantization | None = None,
                  ) -> tuple[dict[str, tuple[str, TensorInfo]], dict[str, StoredLinear]]:
    """Map every model parameter (Mistral name) to (stored name, where it lives), and the fp8 linears.

    Every missing, unexpected or mis-shaped tensor is found here, from headers alone, and
    reported with its file and key before any weight is read. `quantization`: what the config
    declares; the stored linears' scales are indexed too (`pixtral.checkpoint.quantized`), as
    `<module>.weight_scale` / `<module>.input_scale`.
    """
    stored: dict[str, TensorInfo] = {}
    for file in files.weight_files:
        for name, info in read_header(file).items():
            if name in stored:
                raise CheckpointError(f"{file}: tensor {name!r} also appears in {stored[name].file}")
            stored[name] = info
    canonical = (lambda n: n) if files.layout == MISTRAL else hf_legacy_name
    lookup = {canonical(name): (name, info) for name, info in stored.items()}
    specs = key_specs(args)
    wanted = {s.mistral: (s.mistral if files.layout == MISTRAL else s.hf) for s in specs}
    expected_shapes, linears = _expected_shapes(args)
    out: dict[str, tuple[str, TensorInfo]] = {}
    for ours, key in wanted.items():
        if key not in lookup:
            raise CheckpointError(
                f"{files.root}: missing tensor {key!r} (the config at {files.config_file.name} expects it)"
            )
        stored_name, info = lookup[key]
        if tuple(info.shape) != expected_shapes[ours]:
            raise CheckpointError(
                f"{info.file}: tensor {stored_name!r} has shape {list(info.shape)}, but the config expects "
                f"{list(expected_shapes[ours])}"
            )
        out[ours] = (stored_name, info)
    heads = {s.mistral: s.head_dim for s in specs if s.permute_heads} if files.layout == HF else {}
    quantized, scales = index_quantized(quantization, out, stored, linears, files.layout == HF, heads,
                                        files.config_file.name)
    out.update(scales)
    known = set(wanted.values()) | {canonical(name) for name, _ in scales.values()}
    ignorable = ("rotary_emb.inv_freq",)  # buffers some exporters save; never needed
    for key, (name, info) in lookup.items():
        if key not in known and not name.endswith(ignorable):
            raise CheckpointError(f"{info.file}: unexpected tensor {name!r} (not part of this model's config)")
    return out, quantized


def _expected_shapes(args: ModelArgs) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Every parameter's shape, and the names of the linear modules (the ones a checkpoint may quantize)."""
    import torch
    from torch import nn

    from pixtral.model.pixtral import Pixtral

    with torch.device("meta"):
        model = Pixtral(args)
    linears = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    return {name: tuple(p.shape) for name, p in model.named_parameters()}, linears
