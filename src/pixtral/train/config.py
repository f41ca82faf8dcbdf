"""Training configuration: pydantic models loaded from YAML, with `--set section.key=value` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from pixtral.errors import ConfigError


def _yaml_float(value):
    """YAML 1.1 (PyYAML) reads 2e-4 (no dot) as a string: take it as the number it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _as_list(value):
    return [value] if isinstance(value, str) else value  # `train: a.jsonl` is a list of one


Float = Annotated[float, BeforeValidator(_yaml_float)]  # also takes an integer (strict mode does)
StrList = Annotated[list[str], BeforeValidator(_as_list)]


class _Section(BaseModel):
    # Strict: YAML gives real ints and bools, so 1 is no bool and true no int; floats also take ints.
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, values):
        return {} if values is None else values  # `model:` with nothing under it


# Vision-encoder starts that only research experiments used, removed from the trainer. Configs of
# old runs (config.yaml, checkpoints) hold them as false: those still load, the key dropped.
REMOVED_MODEL_OPTIONS = ("blank_patch_init", "local_encoder_init")
REMOVED_IN = "7ac1025"  # the last commit whose trainer has them


class ModelConfig(_Section):
    # "preset:NAME" (from scratch), "default" (the small model shipped in the package) or a checkpoint
    # directory (either layout; write ./default for a folder of that name)
    init: str = "preset:tiny"
    args: dict[str, Any] = {}  # ModelArgs overrides for a preset; vision fields under "vision"
    tokenizer: str | None = None  # tekken.json; default: the checkpoint's own, or mistral-common's
    tokenizer_ranks: int | None = None  # from scratch: a reduced Tekken with this many BPE ranks
    # From scratch: start the vision encoder as "subtract the image's mean token" (its first
    # attention layer averages uniformly over the image, the others add nothing), so a drawing
    # stands out from the page it is on (see `trainer.init_centering_encoder`).
    centering_encoder_init: bool = False

    @model_validator(mode="before")
    @classmethod
    def _removed_options(cls, values):
        if not isinstance(values, dict):
            return values
        values = dict(values)
        for key in REMOVED_MODEL_OPTIONS:
            if key in values and values[key] is False:
                del values[key]
            elif key in values:
                raise PydanticCustomError(
                    "removed_option",
                    "this option was removed from the trainer (a research experiment's start that the shipped "
                    "recipe does not use); the trainer of commit {commit} has it (git log, research/README.md): "
                    "run this config there, or drop the key",
                    {"key": key, "commit": REMOVED_IN})
        return values


class DataConfig(_Section):
    train: StrList = []  # JSONL files
    val: StrList = []
    format: str = "auto"  # chat | document | auto (per line)
    seq_len: int = 2048  # tokens per packed sequence; longer samples are skipped and reported
    on_error: str = "skip"  # skip | fail
    workers: int = 0  # processes that encode the data at the start; 0: one per CPU core (per rank)


class LoRAConfig(_Section):
    enabled: bool = False
    rank: int = 8
    alpha: Float = 16.0
    targets: StrList = ["wq", "wk", "wv", "wo"]
    vision_encoder: bool = False
    adapter: bool = False
    merge: bool = True  # final save: merged full model (True) and always the adapters alone


class OptimConfig(_Section):
    lr: Float = 3e-4
    min_lr_ratio: Float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: Float = 0.0
    betas: list[Float] = [0.9, 0.95]
    eps: Float = 1e-8
    grad_clip: Float = 1.0  # 0 disables
    vision_lr_scale: Float = 1.0  # lr multiplier for the vision encoder, adapter and patch merger
    # A further multiplier for the vision encoder alone (and its pre-projector norm), e.g. to let an
    # encoder trained from scratch take smaller steps than the adapter that reads from it.
    encoder_lr_scale: Float = 1.0
    # Weight of the mean square of the image features (adapter output) added to the training loss,
    # per target token. A vision encoder trained from scratch otherwise grows image features
    # thousands of times larger than text embeddings; behind the decoder's RMSNorm, its updates then
    # barely change what the decoder sees, and it learns to read very slowly. 0 disables.
    image_feature_l2: Float = 0.0


class TrainConfig(_Section):
    out_dir: str = "runs/train"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    freeze: StrList = []  # any of: vision_encoder, adapter, decoder
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
    dist_timeout_s: Float = 1800.0
    log_every: int = 10
    save_dtype: str = "float32"  # dtype of the final model files
    progress: bool = True

    def validate(self) -> None:
        """The checks across keys and of values; `load_config` runs them unless told not to."""
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
                            "centering_encoder_init": self.model.centering_encoder_init}
            given = [f"model.{k}" for k, on in scratch_only.items() if on]
            if given:
                raise ConfigError(f"config: {', '.join(given)} only apply from scratch (model.init: preset:NAME), "
                                  f"but model.init is the checkpoint {self.model.init!r}")
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
        if self.data.workers < 0:  # an integer already (true is refused when the config is read)
            raise ConfigError(f"config: 'data.workers' must be a whole number >= 0 (0: one per CPU core), "
                              f"got {self.data.workers!r}")


_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string", "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping"}


def _section(loc: tuple) -> type[BaseModel]:
    cls = TrainConfig
    for part in loc:
        cls = cls.model_fields[part].annotation
    return cls


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _explain(exc: ValidationError, source: str) -> str:
    """One line per problem: `SOURCE: KEY.PATH: what is wrong` (the key path `top level` for the file itself)."""
    def where(loc) -> str:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        return f"{source}: {path or 'top level'}"

    lines, unknown = [], {}
    for err in exc.errors(include_url=False):
        loc, kind = tuple(err["loc"]), err["type"]
        if kind == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(loc[-1])
        elif kind == "removed_option":
            lines.append(f"{where(loc + (err['ctx']['key'],))}: {err['msg']}")
        elif kind in _EXPECTED:
            lines.append(f"{where(loc)}: expected {_EXPECTED[kind]}, got {_short(err['input'])}")
        else:
            lines.append(f"{where(loc)}: {err['msg']}, got {_short(err['input'])}")
    for loc, keys in unknown.items():
        lines.append(f"{where(loc)}: unknown key(s) {sorted(keys)}; known: {', '.join(_section(loc).model_fields)}")
    return "\n".join(lines)


def config_from_tree(tree: Any, source: str) -> TrainConfig:
    """A config from its YAML tree (a file's, or the one a checkpoint stores); `source` names it in errors.
    Keys left out take their defaults. Not validated across keys: see `TrainConfig.validate`."""
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None


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
    tree: Any = {}
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
    if overrides and not isinstance(tree, dict):
        raise ConfigError(f"{where}: top level: expected a mapping, got {_short(tree)}")
    for assignment in overrides:
        apply_override(tree, assignment)
    cfg = config_from_tree(tree, where)
    if check:
        cfg.validate()
    return cfg
