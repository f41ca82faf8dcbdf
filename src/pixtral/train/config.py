"""Training configuration: dataclasses loaded from YAML, with `--set section.key=value` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pixtral.errors import ConfigError


@dataclass
class ModelConfig:
    # "preset:NAME" (from scratch), "default" (the small model shipped in the package) or a checkpoint
    # directory (either layout; write ./default for a folder of that name)
    init: str = "preset:tiny"
    args: dict = field(default_factory=dict)  # ModelArgs overrides for a preset; vision fields under "vision"
    tokenizer: str | None = None  # tekken.json; default: the checkpoint's own, or mistral-common's
    tokenizer_ranks: int | None = None  # from scratch: a reduced Tekken with this many BPE ranks
    # From scratch: start every patch-embedding filter orthogonal to a blank (white) patch, so that
    # the page background embeds to zero (see `trainer.init_weights`).
    blank_patch_init: bool = False
    # From scratch: start the vision encoder as "subtract the image's mean token" (its first
    # attention layer averages uniformly over the image, the others add nothing), so a drawing
    # stands out from the page it is on (see `trainer.init_centering_encoder`).
    centering_encoder_init: bool = False
    # From scratch: start every residual branch of the vision encoder at zero, so each patch token
    # is `ln_pre` of its own pixels, the same wherever and beside whatever it is drawn (see
    # `trainer.init_local_encoder`).
    local_encoder_init: bool = False


@dataclass
class DataConfig:
    train: list = field(default_factory=list)  # JSONL files
    val: list = field(default_factory=list)
    format: str = "auto"  # chat | document | auto (per line)
    seq_len: int = 2048  # tokens per packed sequence; longer samples are skipped and reported
    on_error: str = "skip"  # skip | fail
    workers: int = 0  # processes that encode the data at the start; 0: one per CPU core (per rank)


@dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    targets: list = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    vision_encoder: bool = False
    adapter: bool = False
    merge: bool = True  # final save: merged full model (True) and always the adapters alone


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    vision_lr_scale: float = 1.0  # lr multiplier for the vision encoder, adapter and patch merger
    # A further multiplier for the vision encoder alone (and its pre-projector norm), e.g. to let an
    # encoder trained from scratch take smaller steps than the adapter that reads from it.
    encoder_lr_scale: float = 1.0
    # Weight of the mean square of the image features (adapter output) added to the training loss,
    # per target token. A vision encoder trained from scratch otherwise grows image features
    # thousands of times larger than text embeddings; behind the decoder's RMSNorm, its updates then
    # barely change what the decoder sees, and it learns to read very slowly. 0 disables.
    image_feature_l2: float = 0.0


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    freeze: list = field(default_factory=list)  # any of: vision_encoder, adapter, decoder
    steps: int = 100
    micro_batch_size: int = 1  # packed sequences per forward pass, per process
    grad_accum: int = 1  # forward passes per optimizer step, per process
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = True  # autocast to bfloat16 on GPU
    # Autocast to bfloat16 on the CPU as well: about 2x faster on CPUs with AVX512-BF16 or AMX
    # (measured on a Zen 4 EPYC); on x86 CPUs without them it would be emulated, many times slower,
    # so the trainer says so and trains in float32. Off by default: CPU runs stay exact float32.
    cpu_bf16: bool = False
    parallel: str = "ddp"  # ddp | fsdp (under torchrun)
    save_every: int = 100  # steps between resumable checkpoints (0: only at the end)
    eval_every: int = 100  # steps between validations (0: never); with data.val, also one before step 1
    val_batches: int = 20  # packed sequences per validation
    # With validation: final/ holds the model of the step with the lowest validation loss (step 0:
    # none beat the starting model), kept as best-STEP.pt while training; false: the last step's.
    keep_best: bool = True
    early_stop_after: int = 0  # stop after this many validations in a row without a new best (0: never)
    # Longest wait in any collective (seconds) before a rank gives up, naming the step; a checkpoint
    # save is one such wait for the ranks that do not write it.
    dist_timeout_s: float = 1800.0
    log_every: int = 10
    save_dtype: str = "float32"  # dtype of the final model files
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config: '{name}' must be positive, got {getattr(self, name)}")
        if not self.data.train:
            raise ConfigError("config: 'data.train' lists no training file")
        if self.early_stop_after < 0:
            raise ConfigError(f"config: 'early_stop_after' must be 0 (never) or positive, got {self.early_stop_after}")
        if self.early_stop_after and not (self.data.val and self.eval_every > 0):
            raise ConfigError("config: 'early_stop_after' counts validations, but none run: "
                              "give data.val and eval_every")
        if not self.dist_timeout_s > 0:
            raise ConfigError(f"config: 'dist_timeout_s' must be positive, got {self.dist_timeout_s}")
        if not self.model.init.startswith("preset:"):  # a checkpoint brings its own architecture and weights
            scratch_only = {"args": bool(self.model.args), "tokenizer_ranks": self.model.tokenizer_ranks is not None,
                            "blank_patch_init": self.model.blank_patch_init,
                            "centering_encoder_init": self.model.centering_encoder_init,
                            "local_encoder_init": self.model.local_encoder_init}
            given = [f"model.{k}" for k, on in scratch_only.items() if on]
            if given:
                raise ConfigError(f"config: {', '.join(given)} only apply from scratch (model.init: preset:NAME), "
                                  f"but model.init is the checkpoint {self.model.init!r}")
        if self.model.centering_encoder_init and self.model.local_encoder_init:
            raise ConfigError("config: model.centering_encoder_init and model.local_encoder_init are two different "
                              "starts for the vision encoder; choose one")
        if self.model.local_encoder_init and self.model.blank_patch_init:
            # Measured: a white patch embeds to norm 0.006 in float32 and 9.3 under bf16 autocast.
            raise ConfigError("config: model.local_encoder_init with model.blank_patch_init: a white patch then "
                              "embeds to rounding noise that the encoder's ln_pre scales up to full size, so the "
                              "model would see a different background in bf16 and in float32; drop one of them")
        bad = set(self.freeze) - {"vision_encoder", "adapter", "decoder"}
        if bad:
            raise ConfigError(f"config: unknown 'freeze' entries {sorted(bad)} (use vision_encoder, adapter, decoder)")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"config: 'parallel' must be 'ddp' or 'fsdp', got {self.parallel!r}")
        for name in ("vision_lr_scale", "encoder_lr_scale"):
            if not getattr(self.optim, name) >= 0:  # also refuses NaN
                raise ConfigError(f"config: 'optim.{name}' must be 0 or positive, got {getattr(self.optim, name)}")
        if self.optim.image_feature_l2 < 0:
            raise ConfigError(f"config: 'optim.image_feature_l2' must be 0 or positive, got {self.optim.image_feature_l2}")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"config: 'save_dtype' must be float32, bfloat16 or float16, got {self.save_dtype!r}")
        if self.data.on_error not in ("skip", "fail"):
            raise ConfigError(f"config: 'data.on_error' must be 'skip' or 'fail', got {self.data.on_error!r}")
        if not isinstance(self.data.workers, int) or isinstance(self.data.workers, bool) or self.data.workers < 0:
            raise ConfigError(f"config: 'data.workers' must be a whole number >= 0 (0: one per CPU core), "
                              f"got {self.data.workers!r}")


def _build(cls, values: dict, source: str, prefix: str = ""):
    where = f"{source}: {prefix.rstrip('.') or 'top level'}"
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value or {}, source, f"{prefix}{name}.")
            continue
        if isinstance(default, list) and isinstance(value, str):
            value = [value]
        elif isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                value = float(value)  # YAML 1.1 reads 2e-4 (no dot) as a string
            except ValueError:
                pass
        if default is not None and value is not None and not isinstance(value, type(default)):
            raise ConfigError(f"{source}: {prefix}{name}: expected {type(default).__name__}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def apply_override(tree: dict, assignment: str) -> None:
    """'optim.lr=1e-4' -> tree['optim']['lr'] = 1e-4 (the value is parsed as YAML)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. optim.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = value


def resolve_init(init: str) -> str:
    """`model.init` as a checkpoint directory: "default" is the model shipped in the package."""
    if init == "default":
        from pixtral.assets import default_model_dir

        return str(default_model_dir())
    return init


def load_config(path: str | Path | None, overrides: list[str] = (), check: bool = True) -> TrainConfig:
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from None
        where = str(path)
    else:
        where = "config"
    for assignment in overrides:
        apply_override(tree, assignment)
    cfg = _build(TrainConfig, tree, where)
    if check:
        cfg.validate()
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
