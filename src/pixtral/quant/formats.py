"""What a pre-quantized checkpoint's config says: the scheme, its scale tensors, which linears it covers.

Three fp8 (e4m3) formats are read; everything else is refused with a `ConfigError` naming the
config file and the scheme, so a checkpoint is never loaded wrong:

- **compressed-tensors** (`config.json` `quantization_config.quant_method: "compressed-tensors"`,
  as llm-compressor writes it and vLLM / transformers read it): format `float-quantized` (or
  `naive-quantized` with float weights), 8-bit float symmetric weights with the `channel`,
  `tensor` or `block` strategy and `weight_scale` beside each weight; activations none, dynamic
  (token / tensor / group: a GPU kernel's business) or static per tensor (`input_scale`). Which
  linears: each config group's `targets` minus `ignore` (names, `re:` regexes, or the class
  name `Linear`).
- **transformers fp8** (`quant_method: "fp8"`, fine-grained fp8): `weight_scale_inv` (a
  multiplier despite its name), per tile of `weight_block_size` or, without one, per tensor;
  `activation_scale` when `activation_scheme` is "static"; every linear but `modules_to_not_convert`.
- **Mistral's own** (`params.json` `quantization: {qformat_weight: "fp8_e4m3", qscheme_act}`, as
  vLLM's and mistral-inference's Mistral loaders read it): `qscale_weight` beside each fp8
  weight (one per tensor, or one per output row), `qscale_act` (static activations) unless
  `qscheme_act` is "NO_SCALES" (dynamic). It lists no modules: the linears whose weights are
  stored as fp8 are the quantized ones.

Every scale here multiplies: `weight ~= weight_fp8 * scale`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pixtral.errors import ConfigError

CT_FORMATS = ("float-quantized", "naive-quantized")
CT_WEIGHT_STRATEGIES = ("channel", "tensor", "block")
CT_DYNAMIC_ACT_STRATEGIES = ("token", "tensor", "group")


@dataclass(frozen=True)
class LinearQuant:
    """How one stored linear is quantized: the strategy, the names of its scale tensors (the leaf
    beside `weight`), the tile of a block scale."""

    strategy: str | None  # "channel", "tensor", "block"; None: per tensor or per channel, by the scale's shape
    scale: str  # "weight_scale", "weight_scale_inv" or "qscale_weight"
    input_scale: str | None = None  # a static activation scale's leaf, when the checkpoint has one
    block: tuple[int, int] | None = None


@dataclass(frozen=True)
class StoredQuantization:
    """A checkpoint's quantization: `method` (the format), the config file, and which linears it covers."""

    method: str  # "compressed-tensors", "fp8" or "mistral"
    source: str
    groups: tuple[tuple[tuple[str, ...], LinearQuant], ...]  # (targets, how) in config order
    ignore: tuple[str, ...] = ()
    lists_modules: bool = True  # False: the stored dtypes say which linears are quantized (Mistral's format)
    transformers_ignore: bool = False  # transformers' modules_to_not_convert rule (prefix / regex / suffix)

    scheme = "fp8"  # the only one read from checkpoints

    def for_module(self, names: tuple[str, ...]) -> LinearQuant | None:
        """How the linear known by any of `names` is quantized by the config (None: left float)."""
        if any(self._ignored(entry, n) for entry in self.ignore for n in names):
            return None
        for targets, how in self.groups:
            if any(_matches(t, n) for t in targets for n in names):
                return how
        return None

    def _ignored(self, entry: str, name: str) -> bool:
        if self.transformers_ignore:  # transformers' rule: a regex from the start to a module boundary, or a suffix
            return re.match(rf"(?:{entry})(?:(?<=\.)|(?=\.|$))", name) is not None or name.endswith(entry)
        return _matches(entry, name)


def _matches(pattern: str, name: str) -> bool:
    """compressed-tensors' rule: `re:` a regex matched from the start, `Linear` the class, else the exact name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == "Linear" or pattern == name


def read_quantization(config: dict, source: str, mistral: bool) -> StoredQuantization | None:
    """The quantization a checkpoint's config declares (None: a float checkpoint); refuses what we cannot run."""
    if mistral and config.get("quantization") is not None:
        return _mistral(config["quantization"], source)
    qc = config.get("quantization_config", config.get("compression_config"))
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ConfigError(f"{source}: 'quantization_config' must be an object")
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(qc, source)
    if method == "fp8":
        return _transformers_fp8(qc, source)
    known = {"gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes", "aqlm": "AQLM", "hqq": "HQQ",
             "eetq": "EETQ", "torchao": "torchao", "fbgemm_fp8": "FBGEMM fp8", "quanto": "quanto", "mxfp4": "MXFP4"}
    what = known.get(method, repr(method))
    raise ConfigError(f"{source}: quantization scheme {what} (quant_method {method!r}) is not supported; "
                      "pre-quantized checkpoints load in fp8 e4m3 only (compressed-tensors, transformers fp8, "
                      "Mistral's qformat_weight fp8_e4m3)")


def _mistral(block, source: str) -> StoredQuantization:
    if not isinstance(block, dict):
        raise ConfigError(f"{source}: 'quantization' must be an object")
    fmt = block.get("qformat_weight")
    if fmt != "fp8_e4m3":
        raise ConfigError(f"{source}: quantization qformat_weight {fmt!r} is not supported (only 'fp8_e4m3')")
    act = block.get("qscheme_act", "TENSOR")
    if act not in ("TENSOR", "NO_SCALES", None):
        raise ConfigError(f"{source}: quantization qscheme_act {act!r} is not supported ('TENSOR' or 'NO_SCALES')")
    how = LinearQuant(None, "qscale_weight", None if act == "NO_SCALES" else "qscale_act")
    return StoredQuantization("mistral", source, ((("Linear",), how),), lists_modules=False)


def _transformers_fp8(qc: dict, source: str) -> StoredQuantization:
    act = str(qc.get("activation_scheme", "dynamic")).lower()
    if act not in ("dynamic", "static"):
        raise ConfigError(f"{source}: fp8 activation_scheme {act!r} is not supported ('dynamic' or 'static')")
    if qc.get("scale_fmt", "float") != "float":
        raise ConfigError(f"{source}: fp8 scale_fmt {qc['scale_fmt']!r} is not supported (only 'float' scales)")
    block = qc.get("weight_block_size")
    if block is not None:
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise ConfigError(f"{source}: fp8 weight_block_size {block!r} is not two positive integers")
        block = (block[0], block[1])
    how = LinearQuant("block" if block else "tensor", "weight_scale_inv",
                      "activation_scale" if act == "static" else None, block)
    if qc.get("modules_to_convert"):
        raise ConfigError(f"{source}: fp8 'modules_to_convert' is not supported (only modules_to_not_convert)")
    ignore = tuple(qc.get("modules_to_not_convert") or ())
    return StoredQuantization("fp8", source, ((("Linear",), how),), ignore, transformers_ignore=True)


def _compressed_tensors(qc: dict, source: str) -> StoredQuantization:
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{source}: compressed-tensors scheme not supported: {why}")

    fmt = qc.get("format")
    if qc.get("sparsity_config"):
        raise refuse("sparsity_config (sparse weights)")
    if qc.get("kv_cache_scheme"):
        raise refuse(f"kv_cache_scheme {qc['kv_cache_scheme']!r} (a quantized KV cache)")
    if qc.get("transform_config"):
        raise refuse("transform_config (rotated weights)")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise refuse(f"quantization_status {status!r} (only 'compressed' checkpoints hold quantized weights)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise refuse("no config_groups")
    out = []
    for name, group in groups.items():
        where = f"config_groups.{name}"
        if not isinstance(group, dict):
            raise refuse(f"{where} is not an object")
        gfmt = group.get("format") or fmt
        if gfmt not in CT_FORMATS:
            raise refuse(f"{where}: format {gfmt!r} (only {' / '.join(CT_FORMATS)} fp8)")
        targets = group.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise refuse(f"{where}: targets {targets!r} is not a list of names")
        w = group.get("weights")
        if not isinstance(w, dict):
            raise refuse(f"{where}: no weights quantization (activation-only schemes)")
        wtype, bits = w.get("type"), w.get("num_bits")
        if wtype != "float" or bits != 8:
            raise refuse(f"{where}: weights {wtype} {bits}-bit (e.g. int8 / int4 / GPTQ-style); only 8-bit float (fp8)")
        strategy = w.get("strategy")
        if strategy not in CT_WEIGHT_STRATEGIES:
            raise refuse(f"{where}: weights strategy {strategy!r} (only {', '.join(CT_WEIGHT_STRATEGIES)})")
        if not w.get("symmetric", True):
            raise refuse(f"{where}: asymmetric weights (zero points)")
        if w.get("dynamic"):
            raise refuse(f"{where}: dynamic weight scales")
        block = None
        if strategy == "block":
            b = w.get("block_structure")
            if not (isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)):
                raise refuse(f"{where}: block_structure {b!r} is not two positive integers")
            block = (b[0], b[1])
        if group.get("output_activations"):
            raise refuse(f"{where}: output_activations quantization")
        input_scale = None
        a = group.get("input_activations")
        if a:
            if a.get("type") != "float" or a.get("num_bits") != 8 or not a.get("symmetric", True):
                raise refuse(f"{where}: input_activations {a.get('type')} {a.get('num_bits')}-bit"
                             f"{'' if a.get('symmetric', True) else ' asymmetric'} (only symmetric 8-bit float)")
            if a.get("dynamic") is True:
                if a.get("strategy") not in CT_DYNAMIC_ACT_STRATEGIES:
                    raise refuse(f"{where}: dynamic input_activations strategy {a.get('strategy')!r}")
            elif a.get("dynamic") is False and a.get("strategy") == "tensor":
                input_scale = "input_scale"
            else:
                raise refuse(f"{where}: input_activations dynamic={a.get('dynamic')!r} strategy {a.get('strategy')!r} "
                             "(only dynamic, or static per tensor)")
        out.append((tuple(targets), LinearQuant(strategy, "weight_scale", input_scale, block)))
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise refuse(f"ignore {ignore!r} is not a list of names")
    return StoredQuantization("compressed-tensors", source, tuple(out), tuple(ignore))
