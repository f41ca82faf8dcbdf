"""LoRA: a low-rank update B @ A added to frozen linear layers, merged or exported after training.

`LoRALinear` subclasses `nn.Linear` and keeps the frozen `weight` under its own name, so the
base parameter names are unchanged and a merged model saves like any other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from pixtral.errors import ConfigError


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype) * self.scale

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            out.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def _scopes(model: nn.Module, vision: bool, adapter: bool) -> list[tuple[str, nn.Module, bool]]:
    """(prefix, module, every linear?) to wrap: target names in the transformers, all of the adapter."""
    scopes = [("layers", model.layers, False)]
    if vision and hasattr(model, "vision_encoder"):
        scopes.append(("vision_encoder", model.vision_encoder, False))
    if adapter:
        for name in ("vision_language_adapter", "patch_merger"):
            if hasattr(model, name):
                scopes.append((name, getattr(model, name), True))
    return scopes


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str],
               vision: bool = False, adapter: bool = False) -> list[str]:
    """Freeze the model and wrap linears with LoRA.

    `targets` are last names of linears in the decoder blocks (wq wk wv wo w1 w2 w3), and in
    the vision encoder blocks when `vision`; with `adapter`, every linear of the
    vision-language adapter (and patch merger) is wrapped. Returns the wrapped module names.
    """
    if rank <= 0:
        raise ConfigError(f"lora.rank must be positive, got {rank}")
    model.requires_grad_(False)
    wrapped = []
    for prefix, scope, every in _scopes(model, vision, adapter):
        for name, module in list(scope.named_modules()):
            parent_name, _, leaf = name.rpartition(".")
            if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and (every or leaf in targets):
                parent = scope.get_submodule(parent_name) if parent_name else scope
                setattr(parent, leaf, LoRALinear(module, rank, alpha))
                wrapped.append(f"{prefix}.{name}")
    if not any(w.startswith("layers.") for w in wrapped):
        raise ConfigError(f"lora.targets {targets} matched no decoder linear layer (names: wq wk wv wo w1 w2 w3)")
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Replace every LoRALinear by a plain nn.Linear with the update folded in."""
    n = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module.merged())
            n += 1
    return n


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def export_lora(model: nn.Module, dst: str | Path, rank: int, alpha: float, targets: list[str]) -> Path:
    """Write the adapters alone: adapter.safetensors + adapter_config.json."""
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(model), str(dst / "adapter.safetensors"))
    from pixtral.checkpoint.save import current_umask

    (dst / "adapter.safetensors").chmod(0o666 & ~current_umask())  # safetensors writes 0600
    (dst / "adapter_config.json").write_text(json.dumps({"rank": rank, "alpha": alpha, "targets": targets}, indent=2) + "\n")
    return dst


def load_lora(model: nn.Module, src: str | Path) -> None:
    """Wrap `model` as in the export and load the adapter weights."""
    from safetensors.torch import load_file

    src = Path(src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter.safetensors"))
    vision = any(k.startswith("vision_encoder.") for k in tensors)
    adapter = any(k.startswith(("vision_language_adapter.", "patch_merger.")) for k in tensors)
    apply_lora(model, cfg["rank"], cfg["alpha"], cfg["targets"], vision, adapter)
    missing = set(tensors) - set(model.state_dict())
    if missing:
        raise ConfigError(f"{src}: adapter tensors do not match the model: {sorted(missing)[:3]}")
    model.load_state_dict(tensors, strict=False)
