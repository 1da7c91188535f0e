"""K-LoRA inside ComfyUI: the rule of ``klora.rule`` on ComfyUI's own ModelPatcher, for every model it loads LoRAs for.

Methods (``klora.methods``; the rules themselves are in ``rule``, ``est_lora``, ``lora_switch``, ``np_lora``)
    klora and est choose per step on each layer both LoRAs adapt (top-K sums or energies of the same
    dense delta, gamma from the same L1 ratios); switch turns one whole LoRA off, on every layer it
    adapts, per block of steps; np, merge, content and style are static (applied once, no wrappers):
    np adds the content's low-rank parts projected off the style's right singular vectors on each
    layer both adapt. Step numbers are the run's: a sampler given the tail of a schedule
    (KSamplerAdvanced's ``start_at_step``, SplitSigmas) starts at its offset there (``schedule_origin``).

What is patched
    Each LoRA file is read by ``klora.loras.read`` (so ``klora.checks`` refuses broken files in one
    line; other files ComfyUI lists, .pt and the like, as ComfyUI reads them: ``read_file``) and
    then loaded by ComfyUI's own loader: ``comfy.lora_convert.convert_lora`` and ``comfy.lora.load_lora``
    over ``comfy.lora.model_lora_keys_unet`` (a fresh dict each time), so a layout ComfyUI maps loads
    exactly as ``LoraLoaderModelOnly`` loads it. Names ComfyUI does not map are added to that key map
    first, never renamed in the file: the PEFT form of diffusers names for the UNet models
    (``unet.down_blocks.1...attn1.to_q``, from ComfyUI's own ``unet_to_diffusers``), bare diffusers
    names for FLUX/SD3, and the diffusers, original and musubi-tuner names of Wan, HunyuanVideo and
    LTX-Video (``klora.formats``' tables). Alphas that only the PEFT metadata gives become ``.alpha``
    tensors, since ComfyUI reads those only. After loading, a file key that maps to nothing is an
    error naming the file and examples, except text-encoder keys (a file of nothing else is refused
    as a text-encoder LoRA) and the Wan 2.1 image-to-video layers on a model without them (skipped
    with one warning each). LoHa, LoKr, OFT, BOFT, GLoRA and ``set_weight`` patches are refused: K
    needs a rank. DoRA is refused by ``read``.

    Every weight key the two files touch gets one ``KLoRAPatch`` (a ``WeightAdapterBase``, the
    supported way to own what a key gets) in ``ModelPatcher.patches``. It holds both files' patches
    for that key (low-rank parts and full-weight parts: ``.diff``, ``.diff_b``, ``w_norm``/``b_norm``)
    and, when ComfyUI computes the key, adds the parts of the LoRA chosen now, with the very call
    ``LoraLoaderModelOnly``'s patches get (``comfy.lora.calculate_weight``). Other patches on the key
    (LoRA loaders before or after this node) stay where they are in the list.

The unit of choice: diffusers layers, also inside ComfyUI's fused weights
    K-LoRA chooses per diffusers layer, so both engines make the same choices for the same files.
    Where ComfyUI fuses layers diffusers keeps apart (FLUX double-block qkv, single-block linear1 =
    q, k, v, MLP; SD3 qkv; HunyuanVideo qkv and linear1), a weight is cut into the row ranges
    ComfyUI's own diffusers key maps give as offsets (``comfy.utils.flux_to_diffusers``, ...; for
    HunyuanVideo the fused rows of ``klora.formats.HUNYUAN_VIDEO_FROM_DIFFUSERS``). Each range is
    one layer of the rule: K = r_c * r_s, the top-K sums and the L1 ratio for gamma are taken over
    its rows, and it gets its own choice. A LoRA that adapts the whole fused weight (kohya, BFL) is
    cut into the same ranges (rows of its B @ A), as diffusers' converters cut it. Log keys are
    ComfyUI's weight keys without ``.weight``, with the rows for a range:
    ``diffusion_model.double_blocks.0.img_attn.qkv[0:3072]``.
    Only layers both LoRAs adapt with low-rank parts are chosen; a layer one LoRA adapts gets that
    LoRA always; an all-zero side never competes (the other LoRA is used there); gamma counts only
    positive, finite ratios, one gamma per model (Wan 2.2's experts: one node each). Full-weight
    parts switch with their LoRA's low-rank part on a chosen layer and are always on elsewhere; the
    statistics are those of the low-rank parts. ``content_strength``/``style_strength`` multiply a
    LoRA's applied delta like ``strength_model``; they scale that LoRA's S and gamma alike, so the
    choice is unchanged (statistics are logged at strength 1).

When weights change
    An ``APPLY_MODEL`` wrapper (every family has one) runs before each model call. It reads the
    step's sigma and this sampler run's ``sample_sigmas`` from ``transformer_options``, works out
    the progress, and when the choice of a layer changed it recomputes that layer's keys from
    ComfyUI's backup of the original weight with the arithmetic of ``ModelPatcher.patch_weight_to_device``
    (a float32 copy of the original, the key's patches, ComfyUI's rounding), bit-identical to a load;
    nothing is ever subtracted, so switching back and forth never drifts. A key only K-LoRA patches
    skips the layers of ``comfy.lora.calculate_weight`` around the same arithmetic (a switch would pay
    them for every layer it changes), and under the per-step methods a low-rank part of a float32
    weight is one ``addmm_`` (the product summed in and rounded once, where ComfyUI's ``LoRAAdapter``
    rounds it first: at most a float32 ulp apart; loads, lowvram forwards and switches all use it, so a
    layer holds the same bits however it got its choice; the static methods keep ComfyUI's own
    arithmetic, and content / style / merge equal its loaders bit for bit). Under K-LoRA a layer
    switches at most about twice per run. Keys ComfyUI has not patched in place (lowvram
    ``LowVramPatch`` modules) are recomputed by ComfyUI at every forward and follow the current choice
    by themselves. Unloading, reloading, clones and other LoRA nodes need nothing else: whatever
    ComfyUI computes reads the current choice. The state lives on the ``KLoRA`` object (patch objects
    point at it, ``set_attachments("klora", ...)``), never in globals or ``model_options``.

Progress
    ``steps``: p = i / T, T = the steps of this sampler run (``len(sample_sigmas) - 1``) and
    i = max{j : sample_sigmas[j] >= sigma}. Classifier-free guidance (batched or not) and samplers
    that call the model several times per step count one step; a call at an in-between sigma
    (dpm_2, dpmpp_2s) belongs to the step it starts from, and a Heun-type corrector evaluated at the
    next step's sigma gets that step's choice. ``percent``: p = ComfyUI's sampling percent of the
    step's sigma (the inverse of ``model_sampling.percent_to_sigma``, by bisection), the scale of
    ``start_percent``/``end_percent``: it continues across split samplers (Wan 2.2's two
    KSamplerAdvanced) and places a denoise < 1 run where its noise is. The choice of every step is
    worked out once per run, from ``sample_sigmas``. An ``OUTER_SAMPLE`` wrapper marks each sampling
    run (its first model call opens a generation in the selection log) and writes the log when the
    run ends. The log has the command line's schema; its ``switching`` is "comfyui" (weights
    recomputed from ComfyUI's backup; lowvram modules at every forward).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import comfy.float
import comfy.lora
import comfy.lora_convert
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import comfy.weight_adapter

from . import atomic, checks, est_lora, formats, lora_switch, loras, methods, np_lora, rule
from .errors import KLoRAError, LoRAError

ROLES = ("content", "style")
ATTACHMENT = "klora"
WRAPPER_KEY = "klora"
MAX_LOGGED_GENERATIONS = 64
SWITCHING = "comfyui"  # the log's "switching": keys recomputed from ComfyUI's backup (lowvram: per forward)
PROGRESS = methods.COMFYUI_PROGRESS

logger = logging.getLogger(__name__)

# File keys of text encoders: the node takes a MODEL only, so they are skipped with a warning.
_TEXT_ENCODER = re.compile(r"^(lora_te\d*_|lora_prior_te_|text_encoders?(_\d)?\.|te\d?\.|cond_stage_model\.)")
# Wan 2.1 image-to-video layers, in original, musubi and diffusers names.
_WAN_IMAGE_LAYERS = re.compile(r"(cross_attn[._](k_img|v_img|norm_k_img)|(^|[._])img_emb[._]"
                               r"|attn2[._](add_[kv]_proj|norm_added_k)|image_embedder)")
_NAME_PREFIXES = ("unet.unet.", "unet.", "transformer.", "base_model.model.", "model.diffusion_model.",
                  "diffusion_model.", "")
_NOT_LOADED = "lora key not loaded: "
_SAFETENSORS = (".safetensors", ".sft")  # what comfy.utils.load_torch_file reads as safetensors


# --- public interface ------------------------------------------------------------

def apply(model, content_path, style_path, *, pattern="s*", alpha=rule.DEFAULT_ALPHA, beta=None, method="klora",
          progress="steps", content_strength=1.0, style_strength=1.0, np_mu=methods.DEFAULT_NP_MU,
          switch_every=methods.DEFAULT_SWITCH_EVERY, log_path=None, labels=None):
    """A clone of ``model`` (a ``ModelPatcher``) with the two LoRA files fused on it by ``method``
    (``klora.methods.METHODS``).

    ``beta=None`` takes the pattern's paper value (``rule.default_beta``; klora and est). ``np_mu``
    (method np; ``math.inf``: the hard projection) and ``switch_every`` (method switch) are the other
    methods' knobs. ``log_path``: the selection log's JSON file, written now and whenever a sampling run
    ends (None: no file). ``labels``: {"content": ..., "style": ...} names for messages (default: the paths).
    Raises ``KLoRAError`` (one line) for bad settings and ``LoRAError`` for a bad or misfit file.
    """
    patched = model.clone()
    klora = KLoRA(patched, content_path, style_path, pattern=pattern, alpha=alpha, beta=beta, method=method,
                  progress=progress, content_strength=content_strength, style_strength=style_strength,
                  np_mu=np_mu, switch_every=switch_every, log_path=log_path, labels=labels)
    klora.attach(patched)
    return patched


def attached(model) -> "KLoRA | None":
    """The ``KLoRA`` on a ``ModelPatcher`` (the last one when several K-LoRA nodes were chained), or None."""
    return model.get_attachment(ATTACHMENT) if hasattr(model, "get_attachment") else None


def selection_map(model, max_side: int = 720):
    """The selection map of the last sampling run of the K-LoRA on ``model``, as a PIL image."""
    from .selection_map import render

    klora = attached(model)
    if klora is None:
        raise KLoRAError("this MODEL has no K-LoRA: connect the MODEL output of a K-LoRA (content + style) node")
    return render(klora.render_log(), max_side=max_side)


# --- reading a LoRA file into ComfyUI patches ---------------------------------------

@dataclass
class Part:
    """One patch of one LoRA on one model key, as ``comfy.lora.load_lora`` made it."""

    role: str
    key: str  # the model key it patches
    patch: object  # a comfy.weight_adapter.LoRAAdapter, or ("diff", (tensor,))
    offset: tuple | None  # (dim, start, length): the part of the key it adds to
    function: object | None  # applied to its delta (swap_scale_shift)
    name: str  # the file's module name, for messages
    rank: int | None = None  # low-rank parts only

    @property
    def low_rank(self) -> bool:
        return self.rank is not None

    def rows(self, length: int) -> tuple[int, int]:
        """[start, stop) of the rows (dim 0) it writes; all rows when its offset is on another dim."""
        if self.offset is None or self.offset[0] != 0:
            return 0, length
        return int(self.offset[1]), int(self.offset[1]) + int(self.offset[2])

    @property
    def plain(self) -> bool:
        """A low-rank part without DoRA, mid or reshape, or a ``diff``, with no function on its delta: what
        ``_add_part`` computes exactly as ComfyUI's own adapter does."""
        if self.function is not None:
            return False
        if not self.low_rank:
            return True
        weights = self.patch.weights
        return weights[3] is None and weights[4] is None and weights[5] is None

    def tensors_on(self, device) -> tuple:
        """Its tensors in float32 on ``device`` (as ComfyUI casts them for a float32 patch), kept per device."""
        cache = self.__dict__.setdefault("_on", {})
        if device not in cache:
            cast = comfy.model_management.cast_to_device
            if self.low_rank:
                up, down = self.patch.weights[0], self.patch.weights[1]
                cache[device] = (cast(up, device, torch.float32).flatten(start_dim=1),
                                 cast(down, device, torch.float32).flatten(start_dim=1))
            else:
                cache[device] = (cast(self.patch[1][0], device, torch.float32),)
        return cache[device]


def read_parts(model, path, role: str, label: str | None = None) -> tuple[dict[str, list[Part]], list[str]]:
    """({model key: [Part, ...]}, warning lines) of one LoRA file on a ComfyUI model (``patcher.model``)."""
    own = f"{role} LoRA '{Path(path)}'"
    label = label or own
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            lora = read_file(Path(path), role)
        except LoRAError as exc:
            raise LoRAError(str(exc).replace(own, label, 1)) from None
    notes = [str(w.message).replace(own, label, 1) for w in caught]
    tensors = dict(lora.tensors)
    for layer, value in checks.metadata_alphas(tensors, lora.metadata).items():
        tensors[f"{layer}.alpha"] = torch.tensor(value)
    tensors = _lora_bias_as_diff_b(tensors)
    tensors = comfy.lora_convert.convert_lora(tensors)
    names = list(dict.fromkeys(k[: m.start()] for k in tensors if (m := formats.COMFY_KEY_ENDINGS.search(k))))
    key_map = key_map_for(model, names)

    loaded, not_loaded = _load(tensors, key_map)
    state = model.state_dict()
    skipped_te = [k for k in not_loaded if _TEXT_ENCODER.search(k)]
    unmapped = [k for k in not_loaded if k not in skipped_te]
    if skipped_te and not loaded and not unmapped:
        raise LoRAError(f"{label}: its layers are all for the text encoder (e.g. '{skipped_te[0]}'), which this node "
                        "does not take: it patches the diffusion model only (load the file with ComfyUI's "
                        "LoraLoader, whose CLIP input takes it)")
    if skipped_te:
        notes.append(f"{label}: {len(skipped_te)} text-encoder weights are not applied (this node patches the "
                     f"diffusion model; e.g. '{skipped_te[0]}')")
    if unmapped and isinstance(model, comfy.model_base.WAN21):
        image = [k for k in unmapped if _WAN_IMAGE_LAYERS.search(k)]
        if image and len(image) < len(tensors):
            notes.append(f"{label}: skipped {len(image)} keys of layers this model does not have "
                         f"(e.g. '{image[0]}'): {formats.OPTIONAL_LAYERS['WanLoraLoaderMixin'][1]}")
            unmapped = [k for k in unmapped if k not in image]
    if unmapped:
        layers = list(dict.fromkeys(k[: m.start()] if (m := formats.COMFY_KEY_ENDINGS.search(k)) else k
                                    for k in unmapped))
        examples = ", ".join(f"'{k}'" for k in layers[:3])
        if not loaded:
            raise LoRAError(f"{label}: none of its layers maps to a weight of this {_model_name(model)} model "
                            f"(e.g. {examples}); {_family_hint(tensors, model)}")
        raise LoRAError(f"{label}: {len(layers)} of its {max(len(names), len(layers))} layers map to no weight of "
                        f"this {_model_name(model)} model (e.g. {examples}); K-LoRA applies a LoRA whole or not at all")

    parts: dict[str, list[Part]] = {}
    names_of = {}  # target -> the file's module name, for messages
    for name in names:
        if name in key_map:
            names_of.setdefault(key_map[name], name)
    for target, patch in loaded.items():
        key, offset, function = (target, None, None) if isinstance(target, str) else \
            (target[0], target[1], target[2] if len(target) > 2 else None)
        name = names_of.get(target, key)
        if key not in state:
            raise LoRAError(f"{label}: layer '{name}' maps to '{key}', which this {_model_name(model)} model "
                            f"does not have; {_family_hint(tensors, model)}")
        part = Part(role, key, patch, offset, function, name, _rank(patch, label, name))
        _check_shape(part, state[key], key, label)
        parts.setdefault(key, []).append(part)
    if not any(p.low_rank for ps in parts.values() for p in ps):
        raise LoRAError(f"{label}: has no low-rank layer for this model (only full-weight deltas?); K-LoRA "
                        "chooses between low-rank layers")
    return parts, notes


def read_file(path: Path, role: str) -> loras.LoRAFile:
    """A LoRA file from ComfyUI's loras folder: ``loras.read`` for safetensors; any other file ComfyUI lists
    there (.pt, .ckpt, .bin, ...) loaded as ComfyUI's own loaders load it, ``comfy.utils.load_torch_file``
    with weights only (``torch.load(weights_only=True)``, which runs no code from the file), then held to
    the checks ``loras.read`` makes (``checks.check_file`` warns through ``warnings``)."""
    if path.suffix.lower() in _SAFETENSORS:
        return loras.read(path, f"{role} LoRA")
    label = f"{role} LoRA '{path}'"
    try:
        loaded = comfy.utils.load_torch_file(str(path), safe_load=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise LoRAError(f"{label}: not a readable LoRA file (ComfyUI's load_torch_file, weights only: {reason})") \
            from None
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)} if isinstance(loaded, dict) else {}
    return loras.checked(tensors, {}, label, path)


def key_map_for(model, names) -> dict:
    """ComfyUI's key map for ``model`` plus entries for the module ``names`` it does not map."""
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    family = _family(model)
    lookups = None
    for name in names:
        if name in key_map:
            continue
        if lookups is None:
            lookups = _Lookups(model, family)
        target = lookups.resolve(name)
        if target is not None:
            key_map[name] = target
    return key_map


def row_slices(model) -> dict[str, list[tuple[int, int]]]:
    """{weight key: [(start, stop), ...]} for the weights ComfyUI fuses from several diffusers layers."""
    lookups = _Lookups(model, _family(model))
    state = lookups.state
    bounds: dict[str, set[int]] = {}

    def add(key, start, length):
        if key in state:
            bounds.setdefault(key, {0, state[key].shape[0]}).update((start, start + length))

    targets = list(comfy.lora.model_lora_keys_unet(model, {}).values()) + list(lookups.diffusers.values())
    for target in targets:
        if not isinstance(target, str) and target[1] is not None and target[1][0] == 0:
            add(target[0], int(target[1][1]), int(target[1][2]))
    if lookups.family == "hunyuan_video":
        for template, (original, rows) in formats.HUNYUAN_VIDEO_FROM_DIFFUSERS.items():
            if rows not in ("q", "k", "v", "mlp"):
                continue
            for index in lookups.block_numbers:
                key = lookups.comfy_key(original.replace("{i}", str(index)))
                if key is not None:
                    out_features, in_features = state[key].shape[:2]
                    add(key, *formats.fused_rows(rows, in_features, out_features))
    return {key: [(a, b) for a, b in zip(sorted(edges), sorted(edges)[1:])]
            for key, edges in bounds.items() if len(edges) > 2}


def sampling_percent(model_sampling, sigma: float) -> float:
    """ComfyUI's sampling percent of ``sigma``: the p in [0, 1) with ``percent_to_sigma(p) == sigma``,
    by bisection (``percent_to_sigma`` falls as p grows)."""
    low, high = 0.0, 1.0
    for _ in range(48):
        middle = (low + high) / 2
        if float(model_sampling.percent_to_sigma(middle)) >= sigma:
            low = middle
        else:
            high = middle
    return min(low, 1.0 - 1e-9)


# --- the K-LoRA of one model ------------------------------------------------------

@dataclass
class _Unit:
    """One module of the model (its weight key and bias key) that the LoRAs touch."""

    module: str  # model key without ".weight"/".bias"
    keys: dict[str, list[Part]]  # model key -> parts, both roles, in load order
    slices: list[tuple[int, int]]  # row ranges of the weight, each one layer of the rule
    weight_key: str = ""
    present: list[frozenset] = field(default_factory=list)  # roles with a part in each range
    applied: list[frozenset] = field(default_factory=list)  # roles applied in each range now
    # Method np: range index -> the style's right singular vectors there (in x k, float64), the
    # directions the content's low-rank parts on the weight are projected off.
    directions: dict[int, torch.Tensor] = field(default_factory=dict)


class KLoRA:
    """The two LoRAs of one node on one ComfyUI model: statistics, schedule, state and log.

    Made by ``apply``; one per node execution. ``attach`` puts its patches and wrappers on a
    ``ModelPatcher`` (clones share it). The method decides what each range of a unit applies:
    klora / est choose per step on the ranges both LoRAs adapt (K-LoRA's rule on top-K sums or on
    energies), switch turns one whole LoRA off per block of steps, np projects the content once.
    """

    def __init__(self, patcher, content_path, style_path, *, pattern="s*", alpha=rule.DEFAULT_ALPHA, beta=None,
                 method="klora", progress="steps", content_strength=1.0, style_strength=1.0,
                 np_mu=methods.DEFAULT_NP_MU, switch_every=methods.DEFAULT_SWITCH_EVERY, log_path=None,
                 labels=None):
        for name, value, allowed in (("pattern", pattern, rule.PATTERNS), ("progress", progress, PROGRESS)):
            if value not in allowed:
                raise KLoRAError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        method = methods.check_method(method)
        alpha = float(alpha)
        if not (0 < alpha < float("inf")):
            raise KLoRAError(f"alpha must be a positive number, got {alpha}")
        beta = rule.default_beta(pattern, alpha) if beta is None else methods.check_beta(beta)
        self.np_mu = methods.check_np_mu(np_mu)
        self.switch_every = methods.check_switch_every(switch_every)
        self.strengths = {"content": float(content_strength), "style": float(style_strength)}
        for role, value in self.strengths.items():
            if not math.isfinite(value):
                raise KLoRAError(f"{role}_strength must be a finite number, got {value}")
        self.pattern, self.alpha, self.beta, self.method, self.progress = pattern, alpha, beta, method, progress
        self.log_path = None if log_path is None else os.fspath(log_path)
        model = patcher.model
        labels = labels or {}
        parts, self.labels = {}, {}
        for role, path in (("content", content_path), ("style", style_path)):
            label = labels.get(role) or f"{role} LoRA '{path}'"
            parts[role], notes = read_parts(model, path, role, label)
            self.labels[role] = label
            for line in notes:
                _warn(line)
        if loras.same_file(content_path, style_path):
            _warn(loras.SAME_FILE.format(label=self.labels["content"]))
        self._build_units(model, parts, patcher.load_device)
        self.generations: list[dict] = []
        self._run = None
        self._origin = None  # (first step, steps) of the schedule the running sampler's sigmas were cut from
        self.save_log()

    # --- setup ---

    def _build_units(self, model, parts, device) -> None:
        state = model.state_dict()
        slices = row_slices(model)
        modules: dict[str, dict[str, list[Part]]] = {}
        for role in ROLES:
            if self.method in ("content", "style") and role != self.method:
                continue
            for key, key_parts in parts[role].items():
                module = key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key
                modules.setdefault(module, {}).setdefault(key, []).extend(key_parts)
        self.units: list[_Unit] = []
        self.stats: dict[str, rule.LayerStats] = {}
        self.energies: dict[str, tuple[float, float]] = {}  # EST-LoRA's (||dW_c||_F^2, ||dW_s||_F^2) per chosen layer
        self.only: dict[str, str] = {}
        self._chosen: list[tuple[_Unit, int, str]] = []  # (unit, range index, log key): the rows of the log
        self._zero_sides: list[str] = []  # the role with an all-zero update, per layer both adapt
        self._shared = 0  # ranges both LoRAs adapt with low-rank parts
        for module in sorted(modules, key=_model_order(state)):
            keys = modules[module]
            weight_key = next((k for k in (f"{module}.weight", module) if k in state), next(iter(keys)))
            rows = _length(state, weight_key)
            unit = _Unit(module, keys, list(slices.get(weight_key, [(0, rows)])), weight_key)
            if any(p.function is not None or (p.offset is not None and p.offset[0] != 0)
                   for ps in keys.values() for p in ps):
                unit.slices = [(0, rows)]  # rows reordered or cut along another dimension: one layer
            unit.applied = self._unit_roles(unit, weight_key, state, device)
            self.units.append(unit)
        # Ranges that change from step to step, in the order of the mask: the chosen layers for K-LoRA and
        # EST-LoRA; every range of either LoRA for LoRA Switch, which turns the other LoRA off everywhere.
        self._stepped = ([(unit, i, None) for unit in self.units for i in range(len(unit.slices))]
                         if self.method == "switch" else self._chosen)
        self.gamma = rule.gamma_from_ratios([self.stats[key].ratio for _, _, key in self._chosen])
        self._content_topk, self._style_topk = (
            torch.tensor([getattr(self.stats[k], f"{role}_topk_sum") for _, _, k in self._chosen], dtype=torch.float64)
            for role in ROLES)
        self._content_energy, self._style_energy = (
            torch.tensor([self.energies[k][i] for _, _, k in self._chosen], dtype=torch.float64) for i in (0, 1))
        if self.method in methods.PER_STEP:  # until the first step: the choice at step 0
            self._show(self._mask_at(0.0, 0))
        for role in ROLES:
            if count := self._zero_sides.count(role):
                other = "style" if role == "content" else "content"
                _warn(f"{count} layers both LoRAs adapt are all zero in the {self.labels[role]}: the {other} LoRA is "
                      "used there at every step")
        if not self._shared and self.method in (*methods.CHOOSING, "np"):
            _warn("the content and style LoRAs adapt no layer in common: there is nothing to choose or project, "
                  "each LoRA is applied on its own layers")

    def _unit_roles(self, unit, weight_key, state, device) -> list[frozenset]:
        """What each range of ``unit`` applies under this method (under a per-step method, until the first
        step); records the statistics of the ranges both LoRAs adapt with low-rank parts (per-step methods)
        and the style's directions there (np)."""
        rows = _length(state, weight_key)
        unit.present = [frozenset(p.role for ps in unit.keys.values() for p in ps
                                  if _overlaps(p.rows(_length(state, p.key)), span)) for span in unit.slices]
        if self.method not in (*methods.PER_STEP, "np"):
            return list(unit.present)
        low_rank = [{role: [p for p in unit.keys.get(weight_key, []) if p.role == role and p.low_rank
                            and _overlaps(p.rows(rows), span)] for role in ROLES} for span in unit.slices]
        both = [i for i, parts in enumerate(low_rank) if all(parts.values())]
        self._shared += len(both)
        if self.method == "np":
            unit.directions = {i: _style_directions(low_rank[i]["style"], unit.slices[i], state[weight_key],
                                                    weight_key, device) for i in both}
            return list(unit.present)
        # K = r_c * r_s; a range two low-rank parts of one LoRA cover has the sum of their ranks.
        ks = {i: math.prod(sum(p.rank for p in low_rank[i][role]) for role in ROLES) for i in both}
        sums, energies = {i: {} for i in both}, {i: {} for i in both}
        for role in ROLES if both else ():  # one dense delta of one LoRA in memory at a time
            delta = _delta([p for p in unit.keys[weight_key] if p.role == role and p.low_rank], state[weight_key],
                           weight_key, device)
            for i in both:
                start, stop = unit.slices[i]
                sums[i][role] = rule.magnitude_sums(delta[start:stop].flatten(1).abs(), ks[i])
                energies[i][role] = est_lora.energy(delta[start:stop])
            del delta
        applied = []
        for i, parts in enumerate(low_rank):
            key = log_key(unit.module, unit.slices, i)
            adapting = [role for role in ROLES if parts[role]]
            if len(adapting) == 1:
                self.only[key] = adapting[0]
            if i not in both:
                applied.append(unit.present[i])
                continue
            zero = [role for role in ROLES if sums[i][role][1] == 0]
            if zero and self.method in methods.CHOOSING:  # an all-zero update never competes: the other LoRA is used
                self._zero_sides.extend(zero)
                self.only[key] = "style" if zero == ["content"] else "content"
                applied.append(frozenset({self.only[key]}))
                continue
            (content_topk, content_sum), (style_topk, style_sum) = sums[i]["content"], sums[i]["style"]
            self.stats[key] = rule.LayerStats(k=ks[i], content_topk_sum=content_topk, style_topk_sum=style_topk,
                                              content_abs_sum=content_sum, style_abs_sum=style_sum)
            self.energies[key] = (energies[i]["content"], energies[i]["style"])
            self._chosen.append((unit, i, key))
            applied.append(unit.present[i])  # replaced by the first step's choice
        return applied

    def attach(self, patcher) -> None:
        """Put this K-LoRA's patches, wrappers and attachment on ``patcher`` (``apply`` made it a clone)."""
        patches = {}
        state = patcher.model.state_dict()
        for unit in self.units:
            for key in unit.keys:
                patches[key] = KLoRAPatch(self, unit, key, state[key].dtype)
        added = patcher.add_patches(patches, 1.0)
        if len(added) != len(patches):
            missing = sorted(set(patches) - set(added))[:3]
            raise KLoRAError(f"ComfyUI did not take K-LoRA's patches for {missing}")
        if self.method in methods.PER_STEP:
            patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                                         self._outer_sample)
            patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                         self._apply_model)
        patcher.set_attachments(ATTACHMENT, self)

    # --- the schedule ---

    @property
    def paths(self) -> list[str]:
        """Log keys of the layers both LoRAs adapt that a per-step method chooses in, in model order."""
        return [key for _, _, key in self._chosen]

    def scale_at(self, progress: float) -> float:
        return rule.scale_at(progress, self.pattern, self.alpha, self.beta)

    def _mask_at(self, progress: float, step: int) -> tuple:
        """True (content) or False (style) for each range that changes per step, at this step."""
        if self.method == "switch":
            return (lora_switch.uses_content(step, self.switch_every),) * len(self._stepped)
        if self.method == "est":
            mask = est_lora.content_mask(self._content_energy, self._style_energy, self.gamma, self.scale_at(progress))
        else:
            mask = rule.content_mask(self._content_topk, self._style_topk, self.gamma, self.scale_at(progress))
        return tuple(mask.tolist())

    def choices_at(self, progress: float, step: int | None = None) -> dict[str, str]:
        """Which LoRA each chosen layer uses at ``progress`` (klora, est) or at ``step`` (switch)."""
        if self.method == "switch" and step is None:
            raise KLoRAError("LoRA Switch chooses by step: give the step")
        return self._choices(self._mask_at(progress, step or 0))

    def _choices(self, mask) -> dict[str, str]:
        if self.method == "switch":  # one LoRA everywhere
            mask = mask[:1] * len(self._chosen)
        return {key: ("content" if c else "style") for (_, _, key), c in zip(self._chosen, mask)}

    def _show(self, mask: tuple) -> list[_Unit]:
        """Set the ranges that change per step to ``mask``; returns the units whose applied roles changed."""
        changed = {}
        for (unit, index, _), use_content in zip(self._stepped, mask):
            roles = unit.present[index] & {"content" if use_content else "style"}
            if unit.applied[index] != roles:
                unit.applied[index] = roles
                changed[id(unit)] = unit
        return list(changed.values())

    # --- per sampling run and per model call ---

    def _outer_sample(self, executor, *args, **kwargs):
        self._run = None  # the first model call of this run starts its generation
        self._origin = schedule_origin(kwargs["sigmas"] if "sigmas" in kwargs else args[3])
        try:
            return executor(*args, **kwargs)
        finally:
            self._run = self._origin = None
            self.save_log()

    def _apply_model(self, executor, *args, **kwargs):
        options = kwargs.get("transformer_options")
        if options is None:
            options = args[5] if len(args) > 5 else {}
        self.before_call(executor.class_obj, options)
        return executor(*args, **kwargs)

    def before_call(self, base_model, transformer_options) -> None:
        """Make the weights hold this step's choice before a model call."""
        sigmas = transformer_options.get("sigmas")
        schedule = transformer_options.get("sample_sigmas")
        if sigmas is None or schedule is None or not self._stepped:
            return
        run = self._run
        if run is None or run.schedule is not schedule:
            run = self._run = _Run(self, schedule, base_model.model_sampling, self._origin)
            self.generations.append({"num_inference_steps": run.schedule_steps, "steps": []})
            del self.generations[:-MAX_LOGGED_GENERATIONS]
        step = run.step_of(float(sigmas.flatten()[0]))
        if step == run.step:
            return
        run.step = step
        progress = run.progress[step]
        changed = self._show(run.masks[step])
        if changed:
            _repatch(base_model.current_patcher, [key for unit in changed for key in unit.keys])
        if step not in run.logged:
            run.logged.add(step)
            scale = None if self.method == "switch" else self.scale_at(progress)
            self.generations[-1]["steps"].append({"step": run.first + step, "progress": progress, "scale": scale,
                                                  "choices": self._choices(run.masks[step])})

    # --- the log ---

    def selection_log(self) -> dict:
        """The command line's selection-log schema (``KLoRA.selection_log`` in ``klora.fusion``)."""
        log = {"pattern": self.pattern, "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
               "method": self.method, "progress": self.progress, "switching": SWITCHING}
        log.update(self.labels)
        if self.strengths != {"content": 1.0, "style": 1.0}:  # the engine's keys; statistics stay the files' own
            log["content_scale"], log["style_scale"] = self.strengths["content"], self.strengths["style"]
        log.update(methods.log_knobs(self.method, self.np_mu, self.switch_every))
        log["layers"] = methods.log_layers(self.stats, self.energies)
        log["only"] = dict(self.only)
        log["generations"] = [{"num_inference_steps": g["num_inference_steps"], "steps": list(g["steps"])}
                              for g in self.generations]
        return log

    def render_log(self) -> dict:
        """The selection log with ComfyUI's ``diffusion_model.`` prefix taken off its keys, so that the
        selection map groups rows by block."""
        def bare(key):
            return key.removeprefix("diffusion_model.")

        log = self.selection_log()
        log["layers"] = {bare(k): v for k, v in log["layers"].items()}
        log["only"] = {bare(k): v for k, v in log["only"].items()}
        for generation in log["generations"]:
            generation["steps"] = [dict(s, choices={bare(k): v for k, v in s["choices"].items()})
                                   for s in generation["steps"]]
        return log

    def save_log(self) -> None:
        if self.log_path is None:
            return
        atomic.write_text(self.log_path, json.dumps(self.selection_log(), indent=1))

    def __repr__(self) -> str:
        return (f"KLoRA(pattern={self.pattern!r}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma:.4g}, "
                f"method={self.method!r}, progress={self.progress!r}, shared_layers={self._shared}, "
                f"single_lora_layers={len(self.only)})")


def schedule_origin(sigmas) -> tuple[int, int] | None:
    """(the index of the first of ``sigmas`` in the schedule they were cut from, that schedule's steps).

    KSamplerAdvanced (``start_at_step``) and SplitSigmas hand a sampler a slice of the schedule, a view of
    the tensor the scheduler made: its offset in that tensor is the run's first step. A KSampler with
    denoise < 1 runs the last steps of a longer schedule and is placed there likewise. None when the
    sigmas are not such a view."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or len(sigmas) < 2 or sigmas.stride(0) != 1:
        return None
    whole = sigmas.untyped_storage().nbytes() // sigmas.element_size()
    first = sigmas.storage_offset()
    if first + len(sigmas) > whole:
        return None
    return first, whole - 1


class _Run:
    """One sampler run: its steps, their progress and choices, worked out once from ``sample_sigmas``."""

    def __init__(self, klora: KLoRA, schedule: torch.Tensor, model_sampling, origin=None):
        self.schedule = schedule
        self.sigmas = [float(s) for s in schedule.detach().float().cpu()]
        self.total = max(len(self.sigmas) - 1, 1)
        # The run's first step in the whole schedule (the step the log and LoRA Switch number it with).
        self.first, self.schedule_steps = origin if origin is not None else (0, self.total)
        steps = range(self.total)
        if klora.progress == "percent":
            self.progress = [sampling_percent(model_sampling, self.sigmas[i]) for i in steps]
        else:
            self.progress = [i / self.total for i in steps]
        canonical = {}
        self.masks = [canonical.setdefault(m, m)
                      for m in (klora._mask_at(p, self.first + i) for i, p in enumerate(self.progress))]
        self.step = None
        self.logged: set[int] = set()

    def step_of(self, sigma: float) -> int:
        """max{j : sigmas[j] >= sigma} (with a relative tolerance), within [0, steps - 1]."""
        floor = sigma * (1 - 1e-5) - 1e-12
        step = 0
        for j, s in enumerate(self.sigmas[: self.total]):
            if s >= floor:
                step = j
            else:
                break
        return step


class KLoRAPatch(comfy.weight_adapter.WeightAdapterBase):
    """What one model key gets from K-LoRA: the parts of the LoRA(s) its unit applies now.

    ``comfy.lora.calculate_weight`` calls ``calculate_weight`` with the key's float32 copy (or, for
    lowvram modules, the cast weight) after the patches before it in the key's list.
    """

    name = "klora"

    def __init__(self, klora: KLoRA, unit: _Unit, key: str, weight_dtype: torch.dtype):
        self.klora, self.unit, self.key = klora, unit, key
        self.loaded_keys = set()
        self.weights = []
        self._owner = (None, None, None)  # (model, module holding the weight, attribute), found once
        # One addmm per low-rank part where layers switch during a run and the weight keeps float32 (with a
        # half-precision weight ComfyUI's rounding order decides which way a value rounds: kept as it is).
        self.one_pass = klora.method in methods.PER_STEP and weight_dtype == torch.float32
        # NP-LoRA: the content's low-rank parts on these ranges of the weight are projected off the style's
        # directions (c = mu / (1 + mu)).
        self.projections = ({unit.slices[i]: v for i, v in unit.directions.items() if v.shape[1]}
                            if key == unit.weight_key else {})
        self.projection_strength = np_lora.projection_strength(klora.np_mu)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        unit, length = self.unit, weight.shape[0] if weight.dim() else 1
        for role in ROLES:
            allowed = [span for span, roles in zip(unit.slices, unit.applied) if role in roles]
            if not allowed:
                continue
            scale = strength * self.klora.strengths[role]
            for part in unit.keys[self.key]:
                if part.role != role:
                    continue
                start, stop = part.rows(length)
                inside = [(max(a, start), min(b, stop)) for a, b in allowed if max(a, start) < min(b, stop)]
                if not inside:
                    continue
                whole = sum(b - a for a, b in inside) == stop - start
                project = role == "content" and part.low_rank and self.projections
                # Some of its rows only, or projected: its delta alone (0 + d is d, exactly), then added to those rows.
                target = weight if whole and not project else torch.zeros_like(weight)
                if part.plain:
                    _add_part(target, part, scale, self.one_pass)
                else:
                    target = comfy.lora.calculate_weight([(scale, part.patch, 1.0, part.offset, part.function)],
                                                         target, key, intermediate_dtype, original_weight)
                if project:
                    self._project(target)
                if target is not weight:
                    for a, b in inside:
                        weight[a:b] += target[a:b]
        return weight

    def _project(self, delta) -> None:
        """NP-LoRA on a content delta, in place: ``dW_c (I - c V V^T)`` on each range both LoRAs adapt."""
        for (a, b), directions in self.projections.items():
            rows = delta[a:b]
            projected = np_lora.project_content(rows.reshape(b - a, -1), directions.to(rows.device),
                                                self.projection_strength)
            rows.copy_(projected.reshape(rows.shape))

    @property
    def plain(self) -> bool:
        return all(part.plain for part in self.unit.keys[self.key])

    def owner(self, model) -> tuple:
        """(module, attribute) of the weight in ``model``, or (None, None) when ComfyUI writes it through a
        function of its layer (scaled fp8); looked up once, not at every switch."""
        if self._owner[0] is not model:
            path, _, attribute = self.key.rpartition(".")
            module = comfy.utils.get_attr(model, path) if path else model
            special = hasattr(module, f"set_{attribute}") or hasattr(module, f"convert_{attribute}")
            self._owner = (model, None if special else module, attribute)
        return self._owner[1], self._owner[2]

    def single_part(self):
        """The one part this key applies now when that is one part over the whole weight, else None."""
        unit, found = self.unit, None
        for part in unit.keys[self.key]:
            spans = [span for span, roles in zip(unit.slices, unit.applied) if part.role in roles]
            if not spans:
                continue
            if found is not None or part.offset is not None or len(spans) != len(unit.slices):
                return None
            found = part
        return found


def _add_part(weight, part: Part, strength: float, one_pass: bool) -> None:
    """``weight += strength * part`` for a plain part, in ``weight``'s dtype (ComfyUI's intermediate dtype).

    A low-rank part: with ``one_pass`` (a per-step method, whose layers switch during a run, on a
    float32 weight), one ``addmm_``: the product summed into the weight and rounded once, one pass over
    it; otherwise op for op what ComfyUI's ``LoRAAdapter`` does (the product, rounded, times strength *
    alpha, then added), so that content / style / merge equal ``LoraLoaderModelOnly`` bit for bit. The
    two are at most a float32 ulp apart. Loads, lowvram forwards and switches of one K-LoRA all compute
    a key the same way, so a layer holds the same bits however it got its choice. A ``diff``: as ComfyUI adds it."""
    target = weight if part.offset is None else weight.narrow(part.offset[0], part.offset[1], part.offset[2])
    if part.low_rank:
        up, down = part.tensors_on(target.device)
        if up.dtype != target.dtype:
            up, down = up.to(target.dtype), down.to(target.dtype)
        alpha = part.patch.weights[2]
        alpha = alpha / down.shape[0] if alpha is not None else 1.0
        if one_pass and target.is_contiguous():
            target.view(target.shape[0], -1).addmm_(up, down, alpha=strength * alpha)
        else:
            target += (strength * alpha) * torch.mm(up, down).reshape(target.shape)
    elif strength != 0.0:
        target += strength * part.tensors_on(target.device)[0].to(target.dtype)


# --- helpers -----------------------------------------------------------------------

def _warn(text: str) -> None:
    """Log a warning; every warning the node logs starts with "K-LoRA:"."""
    logger.warning(text if text.startswith("K-LoRA:") else f"K-LoRA: {text}")


def _style_directions(parts, span, weight, key, device) -> torch.Tensor:
    """``np_lora.style_directions`` of the style's low-rank ``parts`` over the rows ``span`` of ``weight``:
    their A rows and B columns stacked, each B cut to the range (a fused weight's range has the delta
    ``B[rows] @ A``), alpha / rank folded into B. A part that is not a plain B @ A over whole input rows (a
    mid factor, an offset along another dimension) adds its dense delta over the range instead."""
    start, stop = span
    ups, downs = [], []
    for part in parts:
        if part.patch.weights[3] is None and (part.offset is None or part.offset[0] == 0):
            B, A = part.tensors_on(device)
            alpha = part.patch.weights[2]
            scale = float(alpha) / A.shape[0] if alpha is not None else 1.0
            first, last = part.rows(weight.shape[0])
            a, b = max(start, first), min(stop, last)
            up = B.new_zeros(stop - start, A.shape[0])
            up[a - start:b - start] = scale * B[a - first:b - first]
        else:
            A = _delta([part], weight, key, device)[start:stop].flatten(1)
            up = torch.eye(stop - start, dtype=A.dtype, device=device)
        ups.append(up)
        downs.append(A)
    return np_lora.style_directions(torch.cat(downs), torch.cat(ups, dim=1))


def log_key(module: str, slices, index: int) -> str:
    """ComfyUI's weight key without ``.weight``, with ``[start:stop]`` when the weight holds several layers."""
    if len(slices) == 1:
        return module
    start, stop = slices[index]
    return f"{module}[{start}:{stop}]"


def _repatch(patcher, keys) -> None:
    """Recompute ``keys`` from ComfyUI's backup with the arithmetic of a load (keys not patched in place
    are lowvram modules, which ComfyUI recomputes at every forward).

    A key that only K-LoRA patches, with plain low-rank and ``diff`` parts (the common case), skips the
    layers of ``comfy.lora.calculate_weight`` around the same arithmetic (``_fast_repatch``), which a switch
    would pay for every layer it changes.

    Otherwise what ``ModelPatcher.patch_weight_to_device`` does, bit for bit: a float32 copy of the original weight,
    ``comfy.lora.calculate_weight`` over the key's patches, ComfyUI's rounding to the weight's dtype. Two
    costs of that call are left out, since a switch pays them for every layer it changes (a third and a
    fifth of a re-patch on a small model): the rounding seed, a Python loop over the key's characters that
    only fp8's stochastic rounding reads, and a new ``Parameter`` per key (the result is copied into the
    patched weight, which never shares memory with the backup). Weights ComfyUI writes through a function
    of their layer (scaled fp8) take ComfyUI's own path.
    """
    if patcher is None:
        return
    model = patcher.model
    for key in keys:
        backup = patcher.backup.get(key)
        patches = patcher.patches.get(key)
        if backup is None or not patches:
            continue
        if len(patches) == 1 and _alone(patches[0]) and _fast_repatch(model, patches[0][1], backup.weight):
            continue
        weight, set_func, convert_func = comfy.model_patcher.get_key_weight(model, key)
        if set_func is None and convert_func is None and weight.data_ptr() != backup.weight.data_ptr():
            original = comfy.model_management.cast_to_device(backup.weight, weight.device, torch.float32, copy=True)
            out = comfy.lora.calculate_weight(patcher.patches[key], original, key)
            seed = 0 if weight.dtype in _UNSEEDED else comfy.model_patcher.string_to_seed(key)
            weight.data.copy_(comfy.float.stochastic_rounding(out, weight.dtype, seed=seed))
            continue
        if backup.inplace_update:
            comfy.utils.copy_to_param(model, key, backup.weight)
        else:
            comfy.utils.set_attr_param(model, key, backup.weight)
        patcher.patch_weight_to_device(key, device_to=weight.device, inplace_update=backup.inplace_update)


_UNSEEDED = (torch.float32, torch.float16, torch.bfloat16)  # dtypes comfy.float.stochastic_rounding casts to


def _alone(patch) -> bool:
    """K-LoRA's patch as ``add_patches(..., 1.0)`` put it: no strength, offset or function around it."""
    strength, ours, strength_model, offset, function = patch
    return isinstance(ours, KLoRAPatch) and (strength, strength_model, offset, function) == (1.0, 1.0, None, None)


def _fast_repatch(model, ours: "KLoRAPatch", original) -> bool:
    """Recompute a key only K-LoRA patches, with plain parts, from ComfyUI's backup: what
    ``patch_weight_to_device`` computes (a float32 copy of the backup, the patch's ``calculate_weight``,
    rounded to the weight's dtype), in the weight itself when that is float32. False when the key needs
    ComfyUI's own path."""
    module, attribute = ours.owner(model)
    weight = None if module is None else getattr(module, attribute)
    if weight is None or weight.dtype not in _UNSEEDED or not ours.plain or weight.data_ptr() == original.data_ptr():
        return False
    float32 = weight.dtype == torch.float32
    part = ours.single_part() if ours.one_pass and float32 and weight.is_contiguous() else None
    if part is not None and part.low_rank:
        # The backup copied in and the part's addmm_ in one op (out-of-place addmm copies its input to the
        # output, then adds the product: the same bits).
        up, down = part.tensors_on(weight.device)
        alpha = part.patch.weights[2]
        alpha = alpha / down.shape[0] if alpha is not None else 1.0
        rows = weight.shape[0]
        torch.addmm(original.to(weight.device).reshape(rows, -1), up, down,
                    alpha=ours.klora.strengths[part.role] * alpha, out=weight.data.view(rows, -1))
        return True
    out = weight.data if float32 else torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    out.copy_(original)
    ours.calculate_weight(out, ours.key, 1.0, 1.0, None, None)  # plain parts: in place, no ComfyUI dispatch
    if not float32:
        weight.data.copy_(out.to(weight.dtype))
    return True


def _load(tensors, key_map):
    """``comfy.lora.load_lora`` with the keys it reports as not loaded collected instead of logged."""
    class NotLoaded(logging.Filter):
        def __init__(self):
            super().__init__()
            self.keys = []

        def filter(self, record):
            message = record.getMessage()
            if message.startswith(_NOT_LOADED):
                self.keys.append(message[len(_NOT_LOADED):])
                return False
            return True

    root = logging.getLogger()
    catcher = NotLoaded()
    root.addFilter(catcher)
    try:
        loaded = comfy.lora.load_lora(tensors, key_map, log_missing=True)
    finally:
        root.removeFilter(catcher)
    return loaded, catcher.keys


def _lora_bias_as_diff_b(tensors):
    """PEFT's ``lora_B.bias`` (a bias delta scaled like the layer) as ComfyUI's ``.diff_b``."""
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(".lora_B.bias"):
            name = key[: -len(".lora_B.bias")]
            A = tensors.get(f"{name}.lora_A.weight")
            alpha = tensors.get(f"{name}.alpha")
            scale = 1.0 if alpha is None or A is None else float(alpha) / A.shape[0]
            out[f"{name}.diff_b"] = tensor * scale if scale != 1.0 else tensor
        else:
            out[key] = tensor
    return out


def _rank(patch, label, name) -> int | None:
    if isinstance(patch, comfy.weight_adapter.LoRAAdapter):
        if patch.weights[5] is not None:
            raise LoRAError(f"{label}: layer '{name}' reshapes its weight (reshape_weight, a FLUX control LoRA); "
                            "K-LoRA cannot choose between such LoRAs")
        return int(patch.weights[1].shape[0])
    if isinstance(patch, comfy.weight_adapter.WeightAdapterBase):
        raise LoRAError(f"{label}: layer '{name}' is a {type(patch).__name__.removesuffix('Adapter')} layer; "
                        "K-LoRA compares low-rank (B @ A) LoRAs, whose rank K needs; convert the file to LoRA")
    if isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "diff":
        return None
    kind = patch[0] if isinstance(patch, tuple) else type(patch).__name__
    raise LoRAError(f"{label}: layer '{name}' is a '{kind}' patch, which K-LoRA cannot switch")


def _check_shape(part: Part, weight, key: str, label: str) -> None:
    target = list(weight.shape)
    if part.offset is not None:
        target[part.offset[0]] = int(part.offset[2])
    if part.low_rank:
        up, down, mid = part.patch.weights[0], part.patch.weights[1], part.patch.weights[3]
        fits = up.shape[0] == target[0] and (mid is not None or math.prod(down.shape[1:]) == math.prod(target[1:]))
        got = f"{up.shape[0]}x{math.prod(down.shape[1:])}"
    else:
        fits = list(part.patch[1][0].shape) == target
        got = "x".join(map(str, part.patch[1][0].shape))
    if not fits:
        shape = "x".join(str(s) for s in ([target[0], math.prod(target[1:])] if part.low_rank else target))
        raise LoRAError(f"{label}: layer '{part.name}' is {got} in the LoRA but {shape} in this model ('{key}'); "
                        "is it a LoRA for another model, or another size of this one?")


# ComfyUI's model classes -> the family names ``loras.guess_family`` speaks of.
_FAMILY_NAMES = {"WAN21": "Wan", "HunyuanVideo": "HunyuanVideo", "LTXV": "LTX-Video", "Flux": "FLUX.1",
                 "SD3": "Stable Diffusion 3", "QwenImage": "Qwen-Image", "SDXL": "Stable Diffusion XL",
                 "BaseModel": "Stable Diffusion"}


def _model_name(model) -> str:
    return type(model).__name__


def _family_hint(tensors, model) -> str:
    guess = loras.guess_family(tensors)
    ours = next((name for cls in type(model).__mro__ if (name := _FAMILY_NAMES.get(cls.__name__))), None)
    if guess is None or ours in guess[1]:
        return "is it a LoRA for another model?"
    return f"its layer names are those of a {guess[0]} LoRA"


def _length(state, key) -> int:
    tensor = state[key]
    return tensor.shape[0] if tensor.dim() else 1


def _overlaps(rows, span) -> bool:
    return max(rows[0], span[0]) < min(rows[1], span[1])


def _delta(parts, weight, key, device) -> torch.Tensor:
    """The dense float32 delta of ``parts`` (at strength 1) on a weight of that shape."""
    delta = torch.zeros(weight.shape, dtype=torch.float32, device=device)
    patches = [(1.0, p.patch, 1.0, p.offset, p.function) for p in parts]
    return comfy.lora.calculate_weight(patches, delta, key, intermediate_dtype=torch.float32)


def _model_order(state):
    order = {}
    for i, key in enumerate(state):
        order.setdefault(key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key, i)
    return lambda module: order.get(module, len(order))


def _family(model) -> str:
    if isinstance(model, comfy.model_base.WAN21):
        return "wan"
    if isinstance(model, comfy.model_base.HunyuanVideo):
        return "hunyuan_video"
    if isinstance(model, comfy.model_base.LTXV):
        return "ltx_video"
    return "other"


class _Lookups:
    """Names ComfyUI's key map lacks, resolved against one model."""

    def __init__(self, model, family: str):
        self.model, self.family = model, family
        self.state = model.state_dict()
        self.diffusers = _diffusers_names(model)
        self._numbers = None

    @property
    def block_numbers(self) -> list[int]:
        if self._numbers is None:
            self._numbers = sorted({int(n) for key in self.state for n in re.findall(r"\.(\d+)\.", key)})
        return self._numbers

    def comfy_key(self, original: str) -> str | None:
        """ComfyUI's weight key of an original-model module (HunyuanVideo: ComfyUI's own renames)."""
        name = f"{original}.weight"
        if self.family == "hunyuan_video":
            name = next(iter(self.model.model_config.process_unet_state_dict({name: None})))
        for key in (f"diffusion_model.{name}", f"diffusion_model.{original}"):
            if key in self.state:
                return key
        return None

    def resolve(self, name: str):
        for prefix in _NAME_PREFIXES:
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            target = self.diffusers.get(rest)
            if target is None:
                target = self._from_family(rest)
            if target is not None:
                return target
        if name.startswith("lora_unet_"):
            original = formats.musubi_module(self.family, name[len("lora_unet_"):])
            if original is not None:
                return self.comfy_key(original)
        return None

    def _from_family(self, rest: str):
        found = formats.original_module(self.family, rest)
        if found is not None:
            original, rows = found
            key = self.comfy_key(original)
            if key is not None:
                if rows == "swapped":
                    return key, None, comfy.utils.swap_scale_shift
                if rows is not None:
                    out_features, in_features = self.state[key].shape[:2]
                    return key, (0, *formats.fused_rows(rows, in_features, out_features))
                return key
        if self.family in ("wan", "hunyuan_video", "ltx_video"):
            return self.comfy_key(rest)  # an original name under a prefix ComfyUI does not map
        return None


def _diffusers_names(model) -> dict:
    """{diffusers module: ComfyUI target} from ComfyUI's own diffusers key maps (the UNet's PEFT form too)."""
    config = model.model_config.unet_config
    maps = []
    if "num_res_blocks" in config:
        maps.append({k: f"diffusion_model.{v}" for k, v in comfy.utils.unet_to_diffusers(config).items()})
    for base, convert in (("SD3", "mmdit_to_diffusers"), ("Flux", "flux_to_diffusers"),
                          ("AuraFlow", "auraflow_to_diffusers"), ("PixArt", "pixart_to_diffusers")):
        if isinstance(model, getattr(comfy.model_base, base)):
            maps.append(getattr(comfy.utils, convert)(config, output_prefix="diffusion_model."))
    out = {}
    for table in maps:
        for key, target in table.items():
            if key.endswith(".weight"):
                out[key[: -len(".weight")]] = target
    return out
