"""A LoRA file checked against itself, before anything converts or loads it.

A LoRA layer adds ``alpha / rank * B @ A`` to a weight. A file states rank and
alpha in up to four places: the shapes of A and B, ``.alpha`` tensors, the
diffusers/PEFT config in the safetensors metadata (``lora_adapter_metadata``)
and kohya's ``ss_network_dim`` / ``ss_network_alpha``. Loaders read some of them
and fill the rest with defaults: a missing A becomes PEFT's random
initialisation, unreadable metadata becomes alpha = rank, a config without
``lora_alpha`` becomes PEFT's default 8. ``check_file`` reads every source and
refuses the file (``LoRAError``, one line) when one is missing, unreadable or
contradicts another, so that a file loads exactly as written or not at all.

Conventions (not errors):
- No alpha anywhere means alpha = rank (scale 1), as in diffusers; a warning says so.
- kohya's ``ss_network_*`` metadata is informational (no loader reads it): a value
  that is not a number ("Dynamic", "None") means "not given"; ``ss_network_alpha``
  0 means alpha = rank (kohya's own rule). It is compared only with linear (2-D)
  layers, and only when ``ss_network_args`` sets no per-block or per-kind dims;
  a layer may have rank min(dim, in, out) (kohya's extraction clamps to that).
- LoKr, LoHa, OFT and (IA)^3 layers are not A/B pairs; only their alpha is checked.
- ``lora_adapter_metadata`` keys are "<component>.<field>" (what pipelines save:
  "unet.r", "transformer.lora_alpha") or bare "<field>" (what a model's
  ``save_lora_adapter`` saves). A component's config covers the layers whose
  names start with "<component>."; a bare config, or else the file's only
  non-text-encoder component, covers layers without such a prefix (kohya-named
  "lora_*" layers excepted). rank_pattern / alpha_pattern match module paths the
  way PEFT does.

Layers whose delta is zero (A or B all zero) are legal but change nothing: a
warning names them, and ``zero_layers`` lists them (in any naming, also after
conversion) so that the caller can let the other LoRA act there alone.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import torch

from .errors import LoRAError

# The (down, up) factor names of each pair naming, as messages show them.
_PAIRS = {
    "peft": ("lora_A", "lora_B"),
    "embedding": ("lora_embedding_A", "lora_embedding_B"),
    "kohya": ("lora_down", "lora_up"),
    "linear_layer": ("lora_linear_layer.down", "lora_linear_layer.up"),
    "old": ("lora.down", "lora.up"),
    "processor": ("_lora.down", "_lora.up"),
    "xlabs": ("down", "up"),
}
_ADAPTER = r"(?:\.[\w-]+)?"  # PEFT's adapter-name infix: ".lora_A.default.weight"
# Key ending -> (role in its layer, pair naming). First match wins: longer endings come first.
_ENDINGS = [(re.compile(pattern + "$"), role, naming) for pattern, role, naming in [
    (rf"\.lora_A{_ADAPTER}\.weight", "down", "peft"),
    (rf"\.lora_B{_ADAPTER}\.weight", "up", "peft"),
    (rf"\.lora_B{_ADAPTER}\.bias", "bias", None),
    (rf"\.lora_embedding_A{_ADAPTER}", "down", "embedding"),
    (rf"\.lora_embedding_B{_ADAPTER}", "up", "embedding"),
    (rf"\.lora_magnitude_vector{_ADAPTER}(?:\.weight)?", "dora", None),
    (r"\.lora_down\.weight", "down", "kohya"),
    (r"\.lora_up\.weight", "up", "kohya"),
    (r"\.lora_up\.bias", "bias", None),
    (r"\.lora_mid\.weight", "mid", None),
    (r"\.lora_linear_layer\.down\.weight", "down", "linear_layer"),
    (r"\.lora_linear_layer\.up\.weight", "up", "linear_layer"),
    (r"\.lora\.down\.weight", "down", "old"),
    (r"\.lora\.up\.weight", "up", "old"),
    (r"_lora\.down\.weight", "down", "processor"),
    (r"_lora\.up\.weight", "up", "processor"),
    (r"\.down\.weight", "down", "xlabs"),
    (r"\.up\.weight", "up", "xlabs"),
    (r"\.alpha", "alpha", None),
    (r"\.diff_b", "bias", None),
    (r"\.diff", "diff", None),
    (r"\.dora_scale", "dora", None),
    # LyCORIS LoHa / LoKr / OFT / (IA)^3 / GLoRA parts: other algorithms, not A/B pairs.
    (r"\.(?:hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t[12]|oft_blocks|oft_diag|oft_R|rescale"
     r"|on_input|[ab][12]\.weight|w_norm|b_norm)", "other", None),
]]


@dataclass
class _Layer:
    name: str  # the key without its ending, in the file's own naming
    keys: dict[str, str] = field(default_factory=dict)  # role -> key ("other": the last one)
    naming: str | None = None

    def factor(self, role: str) -> str:
        down, up = _PAIRS[self.naming or "peft"]
        return {"down": down, "up": up, "mid": "lora_mid", "bias": "bias", "diff": "diff"}[role]

    @property
    def is_pair(self) -> bool:
        return "other" not in self.keys and ("down" in self.keys or "up" in self.keys or "mid" in self.keys)


@dataclass
class _Parsed:
    layers: dict[str, _Layer]
    duplicates: list[tuple[str, str, str]]  # (layer, first key, second key)
    mixed: list[tuple[str, str, str]]  # (layer, key, other key) with different pair namings


# --- the check ----------------------------------------------------------------

def check_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], label: str) -> list[str]:
    """Refuse (``LoRAError``) a LoRA that contradicts itself; return warning lines.

    ``tensors`` and ``metadata`` are the file's own (``klora.loras.read``), before
    any conversion; every message starts with ``label``.
    """
    metadata = metadata or {}
    values = {key: _values(tensor) for key, tensor in tensors.items() if tensor.is_floating_point()}
    for key, (finite, _) in values.items():
        if not finite:
            raise LoRAError(f"{label}: tensor '{key}' contains NaN or Inf values")
    configs = _adapter_configs(metadata, label)
    kohya = _kohya_metadata(metadata, label)
    parsed = _parse(tensors)
    if parsed.duplicates:
        name, first, second = parsed.duplicates[0]
        raise LoRAError(f"{label}: layer '{name}' has the same factor twice ('{first}' and '{second}')")
    if parsed.mixed:
        name, first, second = parsed.mixed[0]
        raise LoRAError(f"{label}: layer '{name}' mixes two namings ('{first}' and '{second}'): no converter pairs them")

    pairs = {}  # name -> (rank, in_features, out_features, is_linear)
    for layer in parsed.layers.values():
        shape = _check_factors(layer, tensors, label)
        if shape is not None:
            pairs[layer.name] = shape
    alphas, orphans = _alpha_keys(parsed.layers, tensors, label)

    covered = _check_adapter_configs(configs, parsed.layers, pairs, alphas, tensors, label)
    kohya_covered = _check_kohya(kohya, parsed.layers, pairs, alphas, tensors, label)

    warnings = []
    with_alpha = [n for n in pairs if n in alphas or n in covered or n in kohya_covered]
    if pairs and not with_alpha:
        warnings.append(f"{label}: no alpha in the file (no alpha metadata, no .alpha keys): alpha = rank assumed, "
                        "i.e. scale 1")
    elif len(with_alpha) < len(pairs):
        missing = [f"'{n}'" for n in pairs if n not in with_alpha]
        warnings.append(f"{label}: {len(missing)} of {len(pairs)} layers have no alpha (no .alpha key, no alpha "
                        f"metadata; {_examples(missing)}): alpha = rank assumed for them, i.e. scale 1")
    if orphans:
        quoted = [f"'{key}'" for key in orphans]
        warnings.append(f"{label}: {len(orphans)} .alpha keys belong to no LoRA layer and are ignored "
                        f"({_examples(quoted)})")
    zeros = _zero_layers(parsed.layers, values)
    measured = [n for n, layer in parsed.layers.items() if _measurable(layer)]
    if measured and len(zeros) == len(measured):
        warnings.append(f"{label}: every weight delta in this LoRA is zero ({len(measured)} layers): "
                        "it changes nothing")
    elif zeros:
        named = [f"'{name}' ({why})" for name, why in zeros.items()]
        warnings.append(f"{label}: {len(zeros)} of {len(measured)} layers have a zero delta and change nothing "
                        f"({_examples(named)})")
    return warnings


def zero_layers(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Layers whose delta is zero (A or B all zero; a ``.diff`` all zero), in key order.

    Works in any naming the file or a converter uses: given a PEFT-named state
    dict ("<module>.lora_A.weight") it returns module paths.
    """
    layers = _parse(tensors).layers
    keys = {key for layer in layers.values() for key in layer.keys.values()}
    values = {key: _values(tensors[key]) for key in keys if tensors[key].is_floating_point()}
    return list(_zero_layers(layers, values))


# --- keys -> layers -----------------------------------------------------------

def _parse(tensors: dict[str, torch.Tensor]) -> _Parsed:
    layers: dict[str, _Layer] = {}
    duplicates, mixed = [], []
    for key in tensors:
        for pattern, role, naming in _ENDINGS:
            match = pattern.search(key)
            if match:
                break
        else:
            continue  # not a LoRA key; the loader decides what to do with it
        name = key[: match.start()]
        layer = layers.setdefault(name, _Layer(name))
        if role in layer.keys and role != "other":
            duplicates.append((name, layer.keys[role], key))
            continue
        if naming is not None:
            if layer.naming is not None and layer.naming != naming:
                other = next(k for r, k in layer.keys.items() if r in ("down", "up"))
                mixed.append((name, other, key))
            layer.naming = naming
        layer.keys[role] = key
    # An ".alpha" may be named after a factor ("x.lora_down.weight.alpha") or an old
    # processor name ("x.to_q_lora.alpha"): give it to the layer that owns the factor.
    for name in [n for n, layer in layers.items() if set(layer.keys) == {"alpha"}]:
        owner = _alpha_owner(name, layers)
        if owner is not None and "alpha" not in layers[owner].keys:
            layers[owner].keys["alpha"] = layers.pop(name).keys["alpha"]
    return _Parsed(layers, duplicates, mixed)


def _alpha_owner(name: str, layers: dict[str, _Layer]) -> str | None:
    candidates = [name]
    for pattern, role, _ in _ENDINGS:
        match = pattern.search(name)
        if match and role in ("down", "up"):
            candidates.append(name[: match.start()])
            break
    for ending in ("_lora", ".lora", ".lora_linear_layer"):
        if name.endswith(ending):
            candidates.append(name[: -len(ending)])
    return next((c for c in candidates[1:] if c in layers and layers[c].is_pair), None)


# --- pairs --------------------------------------------------------------------

def _check_factors(layer: _Layer, tensors, label: str):
    """(rank, in, out, is_linear) of a pair layer after checking its factors; None otherwise."""
    name = layer.name
    for role in ("down", "up", "mid", "bias", "diff"):
        if role in layer.keys and not tensors[layer.keys[role]].is_floating_point():
            dtype = str(tensors[layer.keys[role]].dtype).replace("torch.", "")
            raise LoRAError(f"{label}: layer '{name}': {layer.factor(role)} is {dtype}, not floating point")
    if not layer.is_pair:
        if "diff" in layer.keys and "bias" in layer.keys:
            _check_bias(layer, tensors, tensors[layer.keys["diff"]].shape[0], label)
        return None
    down_name, up_name = layer.factor("down"), layer.factor("up")
    if "down" not in layer.keys or "up" not in layer.keys:
        have = "up" if "up" in layer.keys else "down" if "down" in layer.keys else "mid"
        lacking = [layer.factor(r) for r in ("down", "up") if r not in layer.keys]
        raise LoRAError(f"{label}: layer '{name}' has {layer.factor(have)} ({_shape(tensors[layer.keys[have]])}) "
                        f"but no {' and no '.join(lacking)}")
    A, B = tensors[layer.keys["down"]], tensors[layer.keys["up"]]
    both = f"{down_name} {_shape(A)}, {up_name} {_shape(B)}"
    for factor, tensor in ((down_name, A), (up_name, B)):
        if tensor.dim() not in (2, 3, 4, 5):
            raise LoRAError(f"{label}: layer '{name}': {factor} is {tensor.dim()}-D ({_shape(tensor)}); LoRA factors "
                            "are 2-D (linear) or 4-D (conv)")
    if A.dim() != B.dim():
        raise LoRAError(f"{label}: layer '{name}': {down_name} is {A.dim()}-D but {up_name} is {B.dim()}-D ({both})")
    if A.shape[0] != B.shape[1]:
        raise LoRAError(f"{label}: layer '{name}': ranks disagree ({both}): {down_name} has rank {A.shape[0]}, "
                        f"{up_name} has rank {B.shape[1]}")
    rank = A.shape[0]
    if rank == 0:
        raise LoRAError(f"{label}: layer '{name}' has rank 0 ({both}): rank must be positive")
    if any(size != 1 for size in B.shape[2:]):
        raise LoRAError(f"{label}: layer '{name}': conv {up_name} must be 1x1 ({both})")
    if "mid" in layer.keys:
        mid = tensors[layer.keys["mid"]]
        if mid.dim() != A.dim() or tuple(mid.shape[:2]) != (rank, rank) or any(s != 1 for s in A.shape[2:]):
            raise LoRAError(f"{label}: layer '{name}': lora_mid {_shape(mid)} does not fit rank {rank} "
                            f"({both}; expected {rank}x{rank}xkhxkw between 1x1 factors)")
    if "bias" in layer.keys:
        _check_bias(layer, tensors, B.shape[0], label)
    return rank, A.shape[1], B.shape[0], A.dim() == 2


def _check_bias(layer: _Layer, tensors, out_features: int, label: str) -> None:
    bias = tensors[layer.keys["bias"]]
    if tuple(bias.shape) != (out_features,):
        raise LoRAError(f"{label}: layer '{layer.name}': bias '{layer.keys['bias']}' is {_shape(bias)}, expected "
                        f"{out_features} (the layer's output size)")


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(str(s) for s in tensor.shape) if tensor.dim() else "a scalar"


# --- alpha keys ---------------------------------------------------------------

def _alpha_keys(layers: dict[str, _Layer], tensors, label: str) -> tuple[dict[str, tuple[float, torch.dtype]], list]:
    """{layer: (alpha, dtype)} for layers with an ".alpha" tensor; the ".alpha" keys of no layer."""
    alphas, orphans = {}, []
    for name, layer in layers.items():
        if "alpha" not in layer.keys:
            continue
        key = layer.keys["alpha"]
        tensor = tensors[key]
        if tensor.numel() != 1 or tensor.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise LoRAError(f"{label}: '{key}' is {_shape(tensor)} of {str(tensor.dtype).replace('torch.', '')}; "
                            "an alpha is a single number")
        value = float(tensor.reshape(()))
        if value == 0:
            raise LoRAError(f"{label}: layer '{name}' has alpha 0 (its .alpha key): the layer would be scaled to nothing "
                            "(kohya reads 0 as alpha = rank, diffusers as scale 0); write the alpha you mean")
        if value < 0:
            raise LoRAError(f"{label}: layer '{name}' has alpha {value:g} (its .alpha key): alpha must be positive")
        if layer.is_pair or "other" in layer.keys:
            alphas[name] = (value, tensor.dtype)
        elif set(layer.keys) == {"alpha"}:
            orphans.append(key)
    return alphas, orphans


# --- lora_adapter_metadata (diffusers / PEFT) -----------------------------------

@dataclass
class _Config:
    component: str  # "" for bare keys
    r: int | None
    lora_alpha: float
    rank_pattern: dict
    alpha_pattern: dict

    def name(self, field_name: str) -> str:
        return f"'{self.component}.{field_name}'" if self.component else f"'{field_name}'"


def _adapter_configs(metadata: dict[str, str], label: str) -> dict[str, _Config]:
    raw = metadata.get("lora_adapter_metadata")
    if raw is None or not raw.strip():
        return {}
    where = f"{label}: metadata 'lora_adapter_metadata'"
    try:
        packed = json.loads(raw)
    except ValueError as exc:
        raise LoRAError(f"{where} is not valid JSON ({str(exc)[:80]}), so its rank and alpha cannot be read; fix or "
                        "remove that entry") from None
    if packed is None:
        return {}
    if not isinstance(packed, dict):
        raise LoRAError(f"{where} is a JSON {type(packed).__name__}, not an object of '<component>.r', "
                        "'<component>.lora_alpha', ...")
    grouped: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, field_name = key.rpartition(".")
        grouped.setdefault(component, {})[field_name] = value
    configs = {}
    for component, fields in grouped.items():
        if not {"r", "lora_alpha", "rank_pattern", "alpha_pattern"} & set(fields):
            continue
        config = _Config(component, None, 0.0, {}, {})
        if "lora_alpha" not in fields:
            raise LoRAError(f"{where} has no {config.name('lora_alpha')}; PEFT would use its default alpha 8 in "
                            "silence: add the alpha the LoRA was trained with")
        config.lora_alpha = _positive(fields["lora_alpha"], f"{where} {config.name('lora_alpha')}", whole=False)
        if fields.get("r") is not None:
            config.r = int(_positive(fields["r"], f"{where} {config.name('r')}", whole=True))
        for pattern_field, whole in (("rank_pattern", True), ("alpha_pattern", False)):
            patterns = fields.get(pattern_field) or {}
            if not isinstance(patterns, dict):
                raise LoRAError(f"{where} {config.name(pattern_field)} is {patterns!r}, not an object of "
                                "module pattern -> number")
            checked = {}
            for pattern, value in patterns.items():
                try:
                    re.compile(rf"(.*\.)?({pattern})$")
                except re.error as exc:
                    raise LoRAError(f"{where} {config.name(pattern_field)}: '{pattern}' is not a valid pattern "
                                    f"({exc})") from None
                checked[pattern] = _positive(value, f"{where} {config.name(pattern_field)}['{pattern}']", whole)
            setattr(config, pattern_field, checked)
        configs[component] = config
    return configs


def _positive(value, where: str, whole: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoRAError(f"{where} is {json.dumps(value)}, not a number; fix the metadata or remove it")
    if not math.isfinite(value) or value <= 0:
        raise LoRAError(f"{where} is {value}: {'rank' if whole else 'alpha'} must be a positive number")
    if whole and value != int(value):
        raise LoRAError(f"{where} is {value}: a rank is a whole number")
    return float(value)


def _coverage(configs: dict[str, _Config], layers: dict[str, _Layer]) -> dict[str, tuple[_Config, str]]:
    """{layer: (config, module path)} for the pair layers a config describes."""
    components = {c for c in configs if c}
    denoisers = [c for c in components if not c.startswith("text_encoder")]
    fallback = configs.get("") or (configs[denoisers[0]] if len(denoisers) == 1 else None)
    covered = {}
    for name, layer in layers.items():
        if not layer.is_pair:
            continue
        component = next((c for c in components if name.startswith(c + ".")), None)
        if component is not None:
            module = name[len(component) + 1:]
            if module.startswith(component + "."):  # the paper's "unet.unet." files
                module = module[len(component) + 1:]
            covered[name] = (configs[component], module)
        elif fallback is not None and not name.startswith("lora_"):
            covered[name] = (fallback, name)
    return covered


def _config_value(config: _Config, kind: str, module: str) -> tuple[float | None, str]:
    """(value, where it comes from) of "rank" or "alpha" for ``module``: PEFT's rule,
    the first pattern that matches the end of the module path wins, else the default."""
    patterns, default = ("rank_pattern", "r") if kind == "rank" else ("alpha_pattern", "lora_alpha")
    for pattern, value in getattr(config, patterns).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value, f"{config.name(patterns)}['{pattern}']"
    return getattr(config, default), config.name(default)


def _check_adapter_configs(configs, layers, pairs, alphas, tensors, label) -> set[str]:
    """Every covered layer's rank and ".alpha" agree with its config; returns the covered layers."""
    covered = _coverage(configs, layers)
    rank_clash, alpha_clash = [], []
    for name, (config, module) in covered.items():
        rank = pairs[name][0]
        said, source = _config_value(config, "rank", module)
        if said is not None and int(said) != rank:
            rank_clash.append((name, rank, said, source))
        if name in alphas:
            said, source = _config_value(config, "alpha", module)
            value, dtype = alphas[name]
            if not _same(value, said, dtype):
                alpha_clash.append((name, value, said, source))
    where = "metadata 'lora_adapter_metadata'"
    if rank_clash:
        name, rank, said, source = rank_clash[0]
        layer = layers[name]
        raise LoRAError(f"{label}: layer '{name}' has rank {rank} ({layer.factor('down')} "
                        f"{_shape(tensors[layer.keys['down']])}) but {where} {source} says {said:g}{_more(rank_clash)}")
    if alpha_clash:
        name, value, said, source = alpha_clash[0]
        raise LoRAError(f"{label}: layer '{name}': its .alpha key says {value:g} but {where} {source} says "
                        f"{said:g}{_more(alpha_clash)}")
    return set(covered)


# --- kohya metadata -----------------------------------------------------------

@dataclass
class _Kohya:
    dim: int | None
    alpha: float | None  # 0: kohya's "alpha = dim"
    comparable: bool  # every linear layer is meant to use dim and alpha


def _kohya_metadata(metadata: dict[str, str], label: str) -> _Kohya:
    dim = _kohya_number(metadata, "ss_network_dim", label)
    alpha = _kohya_number(metadata, "ss_network_alpha", label)
    if dim == 0:
        raise LoRAError(f"{label}: kohya metadata ss_network_dim says 0: a rank must be positive")
    if dim is not None and dim != int(dim):
        raise LoRAError(f"{label}: kohya metadata ss_network_dim says {dim:g}: a rank is a whole number")
    return _Kohya(None if dim is None else int(dim), alpha, _kohya_uniform(metadata.get("ss_network_args")))


def _kohya_number(metadata: dict[str, str], key: str, label: str) -> float | None:
    try:
        value = float(str(metadata[key]).strip())
    except (KeyError, ValueError):
        return None  # absent, "Dynamic", "None": not given
    if not math.isfinite(value):
        return None
    if value < 0:
        raise LoRAError(f"{label}: kohya metadata {key} says {value:g}: it must be positive")
    return value


def _kohya_uniform(raw: str | None) -> bool:
    """True unless ss_network_args gives linear layers their own dims (block_dims, split_qkv, img_attn_dim, ...)."""
    if raw is None or not str(raw).strip():
        return True
    try:
        args = json.loads(raw)
    except ValueError:
        return False
    if not isinstance(args, dict):
        return False
    for key, value in args.items():
        key = key.lower()
        if key.startswith("conv") or key.endswith("dropout"):
            continue
        if any(word in key for word in ("dim", "alpha", "block", "split", "rank")):
            return False
        if key == "algo" and str(value).lower() not in ("lora", "locon"):
            return False
    return True


def _check_kohya(kohya: _Kohya, layers, pairs, alphas, tensors, label) -> set[str]:
    """Linear layers agree with ss_network_dim / ss_network_alpha; returns the layers it gives an alpha."""
    if not kohya.comparable or (kohya.dim is None and kohya.alpha is None):
        return set()
    linear = [n for n, (_, _, _, is_linear) in pairs.items() if is_linear]
    for name in linear:
        rank, in_features, out_features, _ = pairs[name]
        layer = layers[name]
        if kohya.dim is not None and rank not in (kohya.dim, min(kohya.dim, in_features, out_features)):
            raise LoRAError(f"{label}: layer '{name}' has rank {rank} ({layer.factor('down')} "
                            f"{_shape(tensors[layer.keys['down']])}) but kohya metadata ss_network_dim says {kohya.dim}")
        if kohya.alpha is None:
            continue
        expected = kohya.alpha if kohya.alpha > 0 else float(rank)
        said = f"ss_network_alpha says {kohya.alpha:g}" + (" (kohya: alpha = rank)" if kohya.alpha == 0 else "")
        if name in alphas:
            value, dtype = alphas[name]
            if not _same(value, expected, dtype):
                raise LoRAError(f"{label}: layer '{name}': its .alpha key says {value:g} but kohya metadata {said}")
        elif not _same(float(rank), expected, torch.float32):
            raise LoRAError(f"{label}: layer '{name}' has no .alpha key, so it loads with alpha = rank = {rank}, but "
                            f"kohya metadata {said}")
    return set(linear) if kohya.alpha is not None else set()


# --- zero deltas ----------------------------------------------------------------

def _measurable(layer: _Layer) -> bool:
    return "other" not in layer.keys and any(role in layer.keys for role in ("down", "up", "diff", "bias"))


def _zero_layers(layers: dict[str, _Layer], values: dict[str, tuple[bool, bool]]) -> dict[str, str]:
    """{layer: why its delta is zero} for layers whose every part is zero."""
    zeros = {}

    def nonzero(layer, role):
        return values.get(layer.keys[role], (True, True))[1]  # an integer factor was refused already

    for name, layer in layers.items():
        if not _measurable(layer):
            continue
        if "bias" in layer.keys and nonzero(layer, "bias"):
            continue
        if "down" in layer.keys and "up" in layer.keys:
            empty = [layer.factor(r) for r in ("down", "up") if not nonzero(layer, r)]
            if empty:
                zeros[name] = f"{empty[0]} all zero"
        elif "diff" in layer.keys:
            if not nonzero(layer, "diff"):
                zeros[name] = "diff all zero"
        elif "down" not in layer.keys and "up" not in layer.keys and "bias" in layer.keys:
            zeros[name] = "bias all zero"
    return zeros


def _values(tensor: torch.Tensor) -> tuple[bool, bool]:
    """(all finite, any non-zero) in one pass: NaN spreads to both extremes, +-Inf shows in one."""
    if tensor.numel() == 0:
        return True, False
    wide = tensor if tensor.dtype == torch.float64 else tensor.float()  # float8 has no aminmax; float32 is fastest
    low, high = (float(v) for v in torch.aminmax(wide))
    return math.isfinite(low) and math.isfinite(high), low != 0 or high != 0


# --- small helpers ------------------------------------------------------------

def _same(value: float, said: float, dtype: torch.dtype) -> bool:
    """Equal up to the precision of the tensor that stores ``value``."""
    tolerance = max(torch.finfo(dtype).eps, 1e-6) if dtype.is_floating_point else 1e-6
    return math.isclose(value, float(said), rel_tol=tolerance)


def _examples(items: list[str], count: int = 3) -> str:
    return f"e.g. {', '.join(items[:count])}" + (f" and {len(items) - count} more" if len(items) > count else "")


def _more(clashes: list) -> str:
    return f" ({len(clashes) - 1} more layers disagree likewise)" if len(clashes) > 1 else ""


# --- alphas that live only in the metadata --------------------------------------

def metadata_alphas(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, float]:
    """{layer: alpha} for pair layers whose alpha only the diffusers/PEFT metadata gives (no ``.alpha`` key).

    Loaders that read ``.alpha`` keys only (ComfyUI's) would use scale 1 for such layers; an
    ``<layer>.alpha`` tensor with this value makes them apply ``alpha / rank`` as the file means it.
    With ``use_rslora`` the value is ``alpha * sqrt(rank)``, so that ``value / rank = alpha / sqrt(rank)``.
    Call ``check_file`` first: it refuses metadata that cannot be read or contradicts the tensors.
    """
    configs = _adapter_configs(metadata or {}, "metadata")
    if not configs:
        return {}
    packed = json.loads(metadata["lora_adapter_metadata"])  # readable: _adapter_configs found configs in it
    rslora = any(bool(v) for k, v in packed.items() if k.rpartition(".")[2] == "use_rslora")
    layers = _parse(tensors).layers
    out = {}
    for name, (config, module) in _coverage(configs, layers).items():
        layer = layers[name]
        if "alpha" in layer.keys or "down" not in layer.keys:
            continue
        alpha, _ = _config_value(config, "alpha", module)
        rank = tensors[layer.keys["down"]].shape[0]
        out[name] = float(alpha) * math.sqrt(rank) if rslora else float(alpha)
    return out
