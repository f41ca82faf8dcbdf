"""Deepen a trained model's decoder by inserting new layers that start as the identity.

    python research/scripts/grow_decoder.py --src runs/default_model_stage4/final/mistral \
        --dst runs/grown --after 1 3

writes a Mistral-layout checkpoint whose decoder has one new layer after each listed layer (0-based,
of the source). A new layer's weights are drawn as for training from scratch, except its two
residual outputs (`attention.wo`, `feed_forward.w2`), which start at zero: the grown model computes
exactly what the source did (tested), and training then grows the new layers from there.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


def grow(src: Path, dst: Path, after: list[int], seed: int = 0) -> dict:
    """Write the grown checkpoint to `dst`; return its params."""
    params = json.loads((src / "params.json").read_text())
    n = params["n_layers"]
    bad = [i for i in after if not 0 <= i < n]
    if bad or len(set(after)) != len(after):
        raise SystemExit(f"--after: each layer once, in 0..{n - 1} (the source has {n}); got {after}")
    weights = load_file(src / "consolidated.safetensors")
    by_layer: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(n)}
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        m = LAYER_KEY.match(key)
        if m:
            by_layer[int(m.group(1))][m.group(2)] = value
        else:
            out[key] = value

    new_depth = n + len(after)
    gen = torch.Generator().manual_seed(seed)
    order: list[dict[str, torch.Tensor]] = []
    for i in range(n):
        order.append(by_layer[i])
        if i in after:
            order.append(_identity_layer(by_layer[i], gen))
    for j, layer in enumerate(order):
        for name, value in layer.items():
            out[f"layers.{j}.{name}"] = value.contiguous()

    dst.mkdir(parents=True, exist_ok=True)
    params["n_layers"] = new_depth
    save_file(out, dst / "consolidated.safetensors")
    (dst / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    if (src / "tekken.json").is_file():
        shutil.copy(src / "tekken.json", dst / "tekken.json")
    return params


def _identity_layer(like: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    layer = {}
    for name, value in like.items():
        if value.dim() < 2:  # the two RMSNorm weights
            layer[name] = torch.ones_like(value)
        elif name in ("attention.wo.weight", "feed_forward.w2.weight"):
            layer[name] = torch.zeros_like(value)  # residual branches start closed: the identity
        else:
            layer[name] = (torch.randn(value.shape, generator=gen) * 0.02).to(value.dtype)  # as from scratch
    return layer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, required=True, help="Mistral-layout checkpoint directory")
    p.add_argument("--dst", type=Path, required=True)
    p.add_argument("--after", type=int, nargs="+", required=True, help="insert a new layer after each of these")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not (a.src / "params.json").is_file() or not (a.src / "consolidated.safetensors").is_file():
        raise SystemExit(f"--src {a.src}: no params.json and consolidated.safetensors (a Mistral-layout checkpoint)")
    if a.dst.exists() and any(a.dst.iterdir()):  # never overwrite a checkpoint, the source above all
        raise SystemExit(f"--dst {a.dst}: exists and is not empty; give a new directory")
    params = grow(a.src, a.dst, sorted(a.after), a.seed)
    print(f"wrote {a.dst}: {params['n_layers']} decoder layers", file=sys.stderr)


if __name__ == "__main__":
    main()
