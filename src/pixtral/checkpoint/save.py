"""Write checkpoints in either layout, from a model in memory or streamed from another checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from pixtral.checkpoint.configs import hf_config, params_json
from pixtral.checkpoint.files import HF, MISTRAL, find_files, read_args
from pixtral.checkpoint.hf_processor import hf_processor_files
from pixtral.checkpoint.layout import key_specs, to_hf_rows
from pixtral.checkpoint.reader import TensorReader
from pixtral.checkpoint.safetensors_io import write_safetensors
from pixtral.errors import CheckpointError
from pixtral.model.args import ModelArgs
from pixtral.quant.compressed_tensors import CompressedTensorsWriter, compressed_tensors_config

HF_SHARD_BYTES = 5 * 2**30


def _prepare_output(dst: Path, overwrite: bool) -> Path:
    """A fresh temporary directory beside dst; dst itself is only replaced once complete."""
    dst = Path(dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise CheckpointError(f"{dst}: already exists and is not empty; choose another output directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would become the published folder's mode
    return tmp


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)


def write_checkpoint(args: ModelArgs, dst: str | Path, layout: str,
                     shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
                     produce: Callable[[str], torch.Tensor], tokenizer_file: Path | None = None,
                     overwrite: bool = False, quantization_config: dict | None = None) -> Path:
    """Write a checkpoint whose tensors `produce(mistral_name)` returns in Mistral convention.

    `shapes` may hold a `<module>.weight_scale` beside a quantized weight (HF layout only, with
    `quantization_config` for config.json): it is written right after its weight, its rows
    permuted with the weight's.
    """
    if layout not in (MISTRAL, HF):
        raise CheckpointError(f"unknown layout {layout!r}; use 'mistral' or 'hf'")
    if quantization_config is not None and layout != HF:
        raise CheckpointError("quantized checkpoints are written in the Hugging Face layout (compressed-tensors) only")
    dst = Path(dst).expanduser()
    config = hf_config(args) if layout == HF else None  # refuses what HF cannot hold, before any write
    # transformers' AutoProcessor files, derived from the tokenizer (also checked before any write)
    processor_files = hf_processor_files(args, tokenizer_file) if layout == HF and tokenizer_file else {}
    tmp = _prepare_output(dst, overwrite)
    try:
        specs = key_specs(args)
        if layout == MISTRAL:
            entries = [(s.mistral, *shapes[s.mistral]) for s in specs]
            write_safetensors(tmp / "consolidated.safetensors", entries, produce)
            (tmp / "params.json").write_text(json.dumps(params_json(args), indent=2) + "\n")
        else:
            by_hf, entries = {}, []
            for spec in specs:
                scale = spec.mistral.removesuffix("weight") + "weight_scale"
                pairs = [(spec.hf, spec.mistral)]
                if scale in shapes:
                    pairs.append((spec.hf.removesuffix("weight") + "weight_scale", scale))
                for hf_name, ours in pairs:
                    by_hf[hf_name] = (ours, spec)
                    entries.append((hf_name, *shapes[ours]))

            def produce_hf(hf_name: str) -> torch.Tensor:
                ours, spec = by_hf[hf_name]
                t = produce(ours)
                return to_hf_rows(t, spec.permute_heads, spec.head_dim) if spec.permute_heads else t

            _write_hf_shards(tmp, entries, produce_hf)
            dtype = next(iter(shapes.values()))[1]
            config["torch_dtype"] = str(dtype).removeprefix("torch.")
            if quantization_config is not None:
                config["quantization_config"] = quantization_config
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tekken.json")
        for name, text in processor_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        _publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_hf_shards(root: Path, entries, produce) -> None:
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = torch.Size(entry[1]).numel() * entry[2].itemsize
        if current and size + nbytes > HF_SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(root / "model.safetensors", shards[0], produce, metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(root / name, shard, produce, metadata={"format": "pt"})
        for key, shape, dtype in shard:
            weight_map[key] = name
            total += torch.Size(shape).numel() * dtype.itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_model(model, dst: str | Path, layout: str = MISTRAL, tokenizer_file: Path | None = None,
               dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Save an in-memory `Pixtral` model in either layout."""
    params = dict(model.named_parameters())
    target = dtype or next(iter(params.values())).dtype
    shapes = {name: (tuple(p.shape), target) for name, p in params.items()}
    return write_checkpoint(model.args, dst, layout, shapes,
                            lambda name: params[name].detach().to("cpu", target), tokenizer_file, overwrite)


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, overwrite: bool = False,
                       quantization: str | None = None) -> Path:
    """Stream a checkpoint into the other layout, tensor by tensor (bit-exact unless quantizing).

    `quantization="fp8"` (HF layout only): the decoder's linears are written as fp8 in the
    compressed-tensors layout (`pixtral.quant.compressed_tensors`), each weight quantized as it is
    read; everything else is copied bit-exact. A pre-quantized source is refused.
    """
    files = find_files(src)
    args = read_args(files)
    reader = TensorReader(files, args)
    try:
        if reader.quantization is not None:
            raise CheckpointError(f"{files.root}: already quantized ({reader.quantization.scheme}, "
                                  f"{reader.quantization.method}); converting quantized checkpoints is not supported")
        shapes = {ours: (info.shape, info.dtype) for ours, (_, info) in reader.tensors.items()}
        if quantization is None:
            return write_checkpoint(args, dst, to, shapes, reader.read, files.tokenizer_file, overwrite)
        if quantization != "fp8" or to != HF:
            raise CheckpointError(f"convert writes quantized checkpoints as fp8 in the Hugging Face layout "
                                  f"(compressed-tensors) only, not {quantization} in the {to} layout")
        produce = CompressedTensorsWriter(reader.read, shapes)
        return write_checkpoint(args, dst, to, produce.shapes, produce, files.tokenizer_file, overwrite,
                                quantization_config=compressed_tensors_config())
    finally:
        reader.close()
