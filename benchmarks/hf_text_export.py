"""The text decoder of a Hugging Face Pixtral export, as a `MistralForCausalLM` folder that
`transformers serve` can load without torchvision.

    python benchmarks/hf_text_export.py HF_DIR OUT_DIR      # HF_DIR: `pixtral convert CKPT HF_DIR --to hf`

`transformers serve` loads a LLaVA/Mistral3 checkpoint with transformers' `PixtralProcessor`, which
requires torchvision. The decoder alone is an ordinary Mistral model: the same tensors under other
names (`language_model.model.X` or `model.language_model.X` -> `model.X`; `language_model.lm_head.X`
-> `lm_head.X`; the vision tower and projector dropped), renamed tensor by tensor, one safetensors
shard at a time (a 12B export needs no more memory than its largest shard). The config is the
export's `text_config` with `architectures: ["MistralForCausalLM"]`.

The tokenizer is written as `tokenizer.json` + `tokenizer_config.json` by transformers' own
converter (`convert_tekken_tokenizer`) with the export's chat template; `tekken.json` is not
copied: with it (and mistral-common installed) transformers picks its `MistralCommonBackend`
tokenizer, on which `transformers serve`'s streaming path fails ("'MistralTokenizer' object has no
attribute '_tokenizer'"). The prompt token ids this tokenizer's chat template gives are the ones
our processor builds (tests/benchmarks/test_bench_serving.py checks it).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

RENAMES = [("language_model.model.", "model."), ("model.language_model.", "model."),
           ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head.")]
COPIED = ["chat_template.jinja", "generation_config.json"]


def text_name(name: str) -> str | None:
    """The decoder-only name of an export's tensor, or None for the vision tower and projector."""
    for old, new in RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return None


def weight_files(hf_dir: Path) -> list[str]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (hf_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def export_text_decoder(hf_dir: str | Path, out: str | Path, consume: bool = False) -> Path:
    """Write the decoder of the Hugging Face export `hf_dir` into `out` (replaced when it exists).

    `consume`: delete each of `hf_dir`'s weight files once its tensors are written (a throw-away
    export: the disk then holds one copy of the weights and a shard, not two copies)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    hf_dir, out = Path(hf_dir), Path(out)
    tekken = hf_dir / "tekken.json"
    if not tekken.is_file():
        raise FileNotFoundError(f"{hf_dir}: no tekken.json to build the tokenizer from")
    config = AutoConfig.from_pretrained(hf_dir)
    text_config = config.text_config
    text_config.architectures = ["MistralForCausalLM"]
    dtype = json.loads((hf_dir / "config.json").read_text()).get("torch_dtype")
    if dtype:
        text_config.dtype = dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        files = weight_files(hf_dir)
        weight_map, total = {}, 0
        for name in files:
            tensors = {}
            with safe_open(hf_dir / name, framework="pt") as f:
                for key in f.keys():
                    new = text_name(key)
                    if new is not None:
                        tensors[new] = f.get_tensor(key)
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            for key, t in tensors.items():
                weight_map[key] = name
                total += t.numel() * t.element_size()
            del tensors
            if consume:
                (hf_dir / name).unlink()
        if not any(k.startswith("lm_head.") for k in weight_map) and not text_config.tie_word_embeddings:
            raise ValueError(f"{hf_dir}: no lm_head weights found")
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        text_config.save_pretrained(tmp)
        template = hf_dir / "chat_template.jinja"
        chat_template = template.read_text(encoding="utf-8") if template.is_file() else None
        convert_tekken_tokenizer(str(tekken), chat_template).save_pretrained(tmp)
        for name in COPIED:
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, tmp / name)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(f"wrote {export_text_decoder(sys.argv[1], sys.argv[2])}")
