"""Attach K-LoRA to any diffusers pipeline (or a bare denoiser) and choose per step.

Before every call of a denoiser a forward pre-hook works out the step progress
from the pipeline's own scheduler and makes every layer that both LoRAs adapt
apply the one LoRA that ``klora.rule`` picks for that step. The choice is made
before the forward on purpose: several denoisers rescale the *active* adapters
inside their forward (``cross_attention_kwargs["scale"]``) and undo it afterwards.

K-LoRA lives inside a LoRA stack. Extra LoRAs (a speed LoRA, a detail LoRA) are
applied at their scale on every step and take no part in the choice; LoRAs the
user loaded into the pipeline before attaching stay as the user set them (fused,
or active adapters with their weights) and are as before after ``detach()``.
``content_scale`` / ``style_scale`` multiply everything a LoRA applies.

Two ways to apply the choice (``switching``):
- ``"fused"`` (default): each layer's weight holds ``W0 + extras + delta`` of the
  chosen LoRA, so a step costs what the base model costs. A switch rewrites the
  weight from an exact copy of ``W0 + extras`` (never by subtracting the old delta,
  which drifts in half precision), in place, so compiled graphs see it without
  recompiling; ``detach()`` copies ``W0`` back.
- ``"adapters"``: the LoRAs stay PEFT adapters and each layer's active adapters
  are the user's, the extras and the chosen one; works where weights cannot be
  written (sequential CPU offload, quantized models).

Full-weight parts of a file (``.diff``, ``.diff_b``, norm weights:
``klora.formats.split_full_parts``) are written into their parameters in both
modes, the way ComfyUI applies them: on a layer K-LoRA chooses in they come and
go with their LoRA's low-rank delta, elsewhere they are always on. The choice
itself only ever looks at the low-rank parts (K = r_c * r_s).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass

import torch

from . import atomic, est_lora, lora_switch, loras, methods, np_lora, rule
from .errors import KLoRAError, LoRAError
from .pipelines import Family, check_supported, denoisers_of, family_of

METHODS = methods.METHODS
ROLES = ("content", "style")  # the pair K-LoRA chooses between; extra LoRAs are "extra1", "extra2", ...
# "np": NP-LoRA's correction of the content LoRA, -c * B_c (A_c V V^T), on the layers both LoRAs adapt.
ADAPTER_NAMES = {"content": "klora_content", "style": "klora_style", "np": "klora_np"}
SWITCHING = ("fused", "adapters")
PROGRESS = methods.DIFFUSERS_PROGRESS
_NOTHING, _CONTENT, _STYLE, _BOTH = frozenset(), frozenset({"content"}), frozenset({"style"}), frozenset(ROLES)


def adapter_name(role: str) -> str:
    """The PEFT adapter name of a role: "klora_content", "klora_style", "klora_extra1", ..."""
    return ADAPTER_NAMES.get(role) or f"klora_{role}"


@dataclass
class _Generation:
    num_inference_steps: int
    steps: list  # (step, progress, scale, component, tuple of bools for that component: True = content)


@dataclass
class _Layer:
    """One layer (or parameter) of one denoiser that the content or style LoRA changes."""

    key: str  # its name in the selection log: the path, or "<component>.<path>" with two denoisers
    component: str
    path: str  # a module path, or a parameter path for a full-weight part of a parameter (Wan's modulation)
    roles: frozenset  # which LoRAs change it
    klora_roles: frozenset  # what it applies under "klora" where K-LoRA does not choose per step
    chosen: bool = False  # K-LoRA chooses here per step
    full: frozenset = frozenset()  # which LoRAs change it with full-weight parts (.diff, .diff_b, norms)


class KLoRA:
    """K-LoRA fusion of a content and a style LoRA on one pipeline or denoiser.

    ``target``: a diffusers pipeline of any family that loads LoRAs, or its denoiser
    (a model with diffusers' ``PeftAdapterMixin``). With a pipeline, progress comes
    from the pipeline's scheduler: exact for any step count, any number of denoiser
    calls per step, interrupted runs, and pipelines with two denoisers (Wan 2.2's
    experts share one schedule). A bare denoiser has no scheduler to ask: the step
    is counted from the distinct timesteps it is called with and divided by
    ``num_inference_steps``.

    ``content_2`` / ``style_2``: separate files for the second denoiser of a
    two-expert pipeline (Wan 2.2 HIGH/LOW LoRA pairs); by default both LoRAs go into
    every denoiser. ``extra_loras``: LoRAs always on at their scale, outside the
    choice: ``[path, (path, scale), ...]`` (files, folders, hub ids or state dicts);
    ``extra_loras_2``: the second expert's instead (a HIGH/LOW speed LoRA).
    ``content_scale`` / ``style_scale``: the strength of each LoRA (it multiplies the
    LoRA's delta; the choice does not change with it). ``progress``: "steps"
    (p = step / steps, the paper's) or "noise" (p = 1 - t / T from the scheduler's
    current timestep; see ``_SchedulerProgress``). ``compile``: True or a dict of
    ``torch.compile`` options; compiles the denoiser's repeated blocks (the per-step
    control stays outside the graph).
    """

    def __init__(self, target, content, style, *, content_2=None, style_2=None, content_weight_name=None,
                 style_weight_name=None, content_2_weight_name=None, style_2_weight_name=None, extra_loras=(),
                 extra_loras_2=None, content_scale=1.0, style_scale=1.0,
                 pattern="s*", alpha=rule.DEFAULT_ALPHA, beta=None, method="klora", progress="steps",
                 switching="fused", compile=False, num_inference_steps=None, text_encoder_lora=False,
                 max_logged_generations=64, np_mu=methods.DEFAULT_NP_MU, switch_every=methods.DEFAULT_SWITCH_EVERY):
        self.pipeline, self.family, self.denoisers = resolve_target(target)
        if self.pipeline is not None:
            check_supported(self.family, type(self.pipeline).__name__)
        self.pattern, self.alpha, self.beta = pattern, alpha, beta
        self.set_schedule(pattern, alpha, beta)
        self.beta_auto = None  # how beta was found when EST-LoRA's --beta auto set it (klora.cli.auto_beta)
        self.np_mu = methods.check_np_mu(np_mu)  # fixed once attached: NP-LoRA's correction is built from it
        self.switch_every = methods.check_switch_every(switch_every)
        for name, value, allowed in (("method", method, METHODS), ("progress", progress, PROGRESS),
                                     ("switching", switching, SWITCHING)):
            if value not in allowed:
                raise KLoRAError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        self.strengths = {"content": _strength(content_scale, "content_scale"),
                          "style": _strength(style_scale, "style_scale")}
        for component, denoiser in self.denoisers.items():
            existing = getattr(denoiser, "peft_config", {}) or {}
            if any(name.startswith("klora_") for name in existing) or hasattr(denoiser, "_klora_attached"):
                raise KLoRAError("K-LoRA is already attached to this model; call detach() on it first")
        self.multi = len(self.denoisers) > 1
        self.progress_mode = progress
        self._max_generations = max_logged_generations
        self.generations: list[_Generation] = []

        files = self._read_files(content, style, content_2, style_2, content_weight_name, style_weight_name,
                                 content_2_weight_name, style_2_weight_name, extra_loras, extra_loras_2)
        self.labels = {role: f.label for role, f in files.items()}
        self._adapters = self._convert(files)
        self.switching = self._choose_switching(switching)
        self._collect_layers()
        self._text_encoders = []
        self._peft = self._weights = None
        loaded = []
        try:
            if self.switching == "adapters":
                self._peft = _Adapters(self, loaded)
            self._weights = _Weights(self, lowrank=self.switching == "fused")
            self._handle_text_encoders(text_encoder_lora)
        except BaseException:
            self._remove_text_encoder_adapters()
            if self._weights is not None:
                self._weights.remove()
            if self._peft is not None:
                self._peft.remove()
            elif loaded:
                _Adapters.remove_names(self.denoisers, loaded)
            raise
        del self._adapters  # the tensors now live in the adapters or the weight writer

        self._progress = _progress_source(self.pipeline, self.family, num_inference_steps, progress)
        self._state = {layer.key: None for layer in self.layers}  # which LoRAs each layer applies now
        self._mask: dict[str, tuple | None] = {c: None for c in self.denoisers}  # last klora choice per denoiser
        self._plan: dict | None = None
        self._hooks = []
        for component, denoiser in self.denoisers.items():
            denoiser._klora_attached = True
            self._hooks.append(denoiser.register_forward_pre_hook(self._hook_for(component), with_kwargs=True))
        self._detached = False
        self.method = None
        self.set_method(method)
        self._compiled = False
        if compile:
            self._compile({} if compile is True else dict(compile))

    # --- setup -------------------------------------------------------------

    def _read_files(self, content, style, content_2, style_2, content_weight_name, style_weight_name,
                    content_2_weight_name, style_2_weight_name, extra_loras, extra_loras_2) -> dict:
        files = {"content": _as_lora_file(content, content_weight_name, "content LoRA"),
                 "style": _as_lora_file(style, style_weight_name, "style LoRA")}
        if content is style or loras.same_file(files["content"].path, files["style"].path):
            warnings.warn(loras.SAME_FILE.format(label=files["content"].label), stacklevel=4)
        for role, source, weight_name in (("content", content_2, content_2_weight_name),
                                          ("style", style_2, style_2_weight_name)):
            if source is None:
                continue
            if not self.multi:
                raise _one_denoiser(f"{role}_2", self._model_name())
            files[f"{role}_2"] = _as_lora_file(source, weight_name, f"{role} LoRA (second expert)")
        self.extra_scales = {}
        for suffix, entries, where in (("", extra_loras, ""), ("_2", extra_loras_2, " (second expert)")):
            entries = _extra_entries(entries, f"extra_loras{suffix}")
            if entries and suffix and not self.multi:
                raise _one_denoiser("extra_2", self._model_name())
            for i, (source, scale) in enumerate(entries, start=1):
                key = f"extra{i}{suffix}"
                files[key] = _as_lora_file(source, None, f"extra LoRA {i}{where}")
                self.extra_scales[key] = scale
        return files

    def _model_name(self) -> str:
        return type(self.pipeline or next(iter(self.denoisers.values()))).__name__

    def files_for(self, component: str) -> dict[str, str]:
        """{role: file key} used for ``component``: the ``_2`` files go to the second denoiser."""
        return _files_for(list(self.denoisers), component, self.labels)

    def _convert(self, files) -> dict:
        adapters, notes = _convert_all(self.family, self.denoisers, files)
        for line in notes:
            warnings.warn(line, stacklevel=4)
        for (component, role), adapter in adapters.items():
            key = self.files_for(component)[role]
            strength = self.strengths.get(role) or self.extra_scales[key]
            adapters[component, role] = loras.scaled(adapter, strength)
        return adapters

    def extra_roles(self, component: str) -> list[str]:
        """The extra LoRAs' roles ("extra1", ...) in ``component``, in the order given."""
        return [role for role in self.files_for(component) if role not in ROLES]

    def _choose_switching(self, switching: str) -> str:
        for component, denoiser in self.denoisers.items():
            for role in self.files_for(component):
                reason = _why_not_writable(denoiser, self._adapters[component, role].full)
                if reason is not None:
                    raise LoRAError(f"{self.labels[self.files_for(component)[role]]}: its full-weight deltas cannot "
                                    f"be written into this model ({reason})")
        if switching == "adapters":
            return switching
        reason = None
        for component, denoiser in self.denoisers.items():
            adapters = {role: self._adapters[component, role] for role in self.files_for(component)}
            reason = reason or _why_not_fused(denoiser, adapters)
        if reason is None:
            return "fused"
        warnings.warn(f"fused switching is not possible here ({reason}); K-LoRA switches PEFT adapters instead",
                      stacklevel=4)
        return "adapters"

    def _collect_layers(self) -> None:
        """The layers K-LoRA chooses in, their statistics and gamma (per denoiser)."""
        self.layers: list[_Layer] = []
        self.stats: dict[str, rule.LayerStats] = {}
        self.only: dict[str, str] = {}
        self._gamma: dict[str, float] = {}
        self._content_topk: dict[str, torch.Tensor] = {}
        self._style_topk: dict[str, torch.Tensor] = {}
        self.energies: dict[str, tuple[float, float]] = {}  # EST-LoRA's ||dW_c||_F^2, ||dW_s||_F^2 per shared layer
        self._content_energy: dict[str, torch.Tensor] = {}
        self._style_energy: dict[str, torch.Tensor] = {}
        self._shared: dict[str, list[_Layer]] = {}
        zero_sides = {"content": 0, "style": 0}
        for component, denoiser in self.denoisers.items():
            adapters = {role: self._adapters[component, role] for role in ROLES}
            device = _stats_device(denoiser)
            modules = {role: set(adapters[role].modules) for role in ROLES}
            module_paths = _module_paths(denoiser)
            full = {role: {_unit_of(path, module_paths) for path in adapters[role].full} for role in ROLES}
            shared, stats = [], []
            for path in _paths_in_model_order(denoiser, set.union(*modules.values(), *full.values())):
                key = f"{component}.{path}" if self.multi else path
                roles = frozenset(role for role in ROLES if path in modules[role] or path in full[role])
                with_full = frozenset(role for role in ROLES if path in full[role])
                if all(path in modules[role] for role in ROLES):
                    with torch.no_grad():
                        layer_stats, energies = _layer_stats(adapters, path, device)
                    zero = [role for role, total in zip(ROLES, (layer_stats.content_abs_sum,
                                                               layer_stats.style_abs_sum)) if total == 0]
                    if not zero:
                        layer = _Layer(key, component, path, roles, roles, chosen=True, full=with_full)
                        shared.append(layer)
                        stats.append(layer_stats)
                        self.stats[key] = layer_stats
                        self.energies[key] = energies
                        self.layers.append(layer)
                        continue
                    # An all-zero weight update never competes: the other LoRA is used there at every step
                    # (the zero side's bias, if it has one, still applies under its own method; its full-weight
                    # parts, if any, stay on).
                    for role in zero:
                        zero_sides[role] += 1
                    used = (_STYLE if zero == ["content"] else _CONTENT) | with_full
                else:
                    used = roles
                if len(used) == 1:
                    self.only[key] = next(iter(used))
                self.layers.append(_Layer(key, component, path, roles, used, full=with_full))
            self._shared[component] = shared
            self._gamma[component] = rule.gamma_from_ratios([s.ratio for s in stats])
            self._content_topk[component] = torch.tensor([s.content_topk_sum for s in stats], dtype=torch.float64)
            self._style_topk[component] = torch.tensor([s.style_topk_sum for s in stats], dtype=torch.float64)
            self._content_energy[component] = torch.tensor([self.energies[l.key][0] for l in shared],
                                                           dtype=torch.float64)
            self._style_energy[component] = torch.tensor([self.energies[l.key][1] for l in shared],
                                                         dtype=torch.float64)
            self._adapters[component, "np"] = _np_correction(adapters, [layer.path for layer in shared],
                                                             self.np_mu, device)
        for role, count in zero_sides.items():
            if count:
                other = "style" if role == "content" else "content"
                warnings.warn(f"K-LoRA: {count} layers both LoRAs adapt are all zero in the {self.labels[role]}: "
                              f"the {other} LoRA is used there at every step", stacklevel=4)
        if not any(layer.roles == _BOTH for layer in self.layers):
            warnings.warn("K-LoRA: the content and style LoRAs adapt no layer in common: there is nothing to "
                          "choose or merge, each LoRA is applied on its own layers", stacklevel=4)

    def roles_of(self, layer: _Layer) -> frozenset:
        """Every LoRA a layer can apply: its files' roles, and NP-LoRA's correction where both adapt."""
        return layer.roles | {"np"} if layer.chosen else layer.roles

    def _stepped(self, component: str) -> list[_Layer]:
        """The layers whose LoRAs change from step to step under this method (the mask's order): the shared
        layers for K-LoRA and EST-LoRA; every layer of either LoRA for LoRA Switch, which turns the other
        LoRA off everywhere."""
        if self.method == "switch":
            return [layer for layer in self.layers if layer.component == component and layer.roles & _BOTH]
        return self._shared[component]

    @property
    def paths(self) -> list[str]:
        """Log keys of the layers K-LoRA chooses in, per step."""
        return [layer.key for layers in self._shared.values() for layer in layers]

    @property
    def denoiser(self) -> torch.nn.Module:
        """The (first) denoiser K-LoRA acts on."""
        return next(iter(self.denoisers.values()))

    @property
    def gamma(self):
        """gamma of the rule: one number, or {component: gamma} with two denoisers."""
        return dict(self._gamma) if self.multi else next(iter(self._gamma.values()))

    def _handle_text_encoders(self, apply: bool) -> None:
        """Text-encoder weights in the files: always on when asked for, never chosen per step."""
        first = next(iter(self.denoisers))
        carrying = [(role, adapter) for (component, role), adapter in self._adapters.items()
                    if adapter.text_encoder_state_dicts and component == first]
        if not carrying:
            return
        if not apply:
            names = " and ".join(self.labels[self.files_for(first)[role]] for role, _ in carrying)
            warnings.warn(f"{names} also hold text-encoder weights; they are not applied "
                          "(text_encoder_lora=True / --text_encoder_lora applies them)", stacklevel=4)
            return
        if self.pipeline is None or not hasattr(self.pipeline, "load_lora_into_text_encoder"):
            raise KLoRAError("text-encoder LoRA weights need a pipeline whose LoRA loader handles text encoders")
        done = self._text_encoders
        for role, adapter in carrying:
            label = self.labels[self.files_for(first)[role]]
            for te_name, part in adapter.text_encoder_state_dicts.items():
                encoder = getattr(self.pipeline, te_name, None)
                if encoder is None:
                    raise LoRAError(f"{label}: has '{te_name}' weights but the pipeline has no {te_name}")
                prefixed = {f"{te_name}.{k}": v for k, v in part.items()}
                alphas = {k: v for k, v in (adapter.text_encoder_alphas or {}).items() if k.startswith(te_name + ".")}
                try:
                    with loras.quiet_libraries():
                        self.pipeline.load_lora_into_text_encoder(
                            prefixed, network_alphas=alphas or None, text_encoder=encoder, prefix=te_name,
                            adapter_name=adapter_name(role), _pipeline=self.pipeline)
                except Exception as exc:
                    done.append((encoder, adapter_name(role), adapter.strength))  # removed again by the caller
                    raise LoRAError(f"{label}: its {te_name} weights could not be loaded "
                                    f"({type(exc).__name__}: {loras._short(exc)})") from None
                done.append((encoder, adapter_name(role), adapter.strength))
        from peft.tuners.tuners_utils import BaseTunerLayer

        for encoder in {id(entry[0]): entry[0] for entry in done}.values():
            names = {entry[1]: entry[2] for entry in done if entry[0] is encoder}
            for module in encoder.modules():
                if isinstance(module, BaseTunerLayer):
                    present = [n for n in names if n in module.lora_A]
                    module.set_adapter(present, inference_mode=True)
                    for name in present:
                        if names[name] != 1.0:
                            module.set_scale(name, names[name])

    def _compile(self, options: dict) -> None:
        if self.switching == "adapters":
            warnings.warn("compile with adapter switching recompiles at every switch; switching='fused' does not",
                          stacklevel=3)
        self._requires_grad = {}
        for component, denoiser in self.denoisers.items():
            for name, parameter in denoiser.named_parameters():
                self._requires_grad[component, name] = parameter.requires_grad
            denoiser.requires_grad_(False)  # a flag flip after compiling would recompile
            if getattr(denoiser, "_repeated_blocks", None):
                denoiser.compile_repeated_blocks(**options)
            else:  # compile the forward only: the pre-hook that chooses stays eager, outside the graph
                denoiser.forward = torch.compile(denoiser.forward, **options)
        self._compiled = True

    # --- configuration -----------------------------------------------------

    def set_schedule(self, pattern=None, alpha=None, beta=None) -> None:
        """Change pattern / alpha / beta; pattern or alpha None keeps the current one, beta=None takes
        the pattern's default."""
        pattern = self.pattern if pattern is None else pattern
        if pattern not in rule.PATTERNS:
            raise KLoRAError(f"pattern must be one of {', '.join(rule.PATTERNS)}, got {pattern!r}")
        if alpha is None:  # keep the current alpha (at construction: the paper's)
            alpha = rule.DEFAULT_ALPHA if self.alpha is None else self.alpha
        alpha = float(alpha)
        if not (alpha > 0 and alpha < float("inf")):
            raise KLoRAError(f"alpha must be a positive number, got {alpha}")
        beta = rule.default_beta(pattern, alpha) if beta is None else methods.check_beta(beta)
        self.pattern, self.alpha, self.beta = pattern, alpha, beta
        self._plan = None  # re-plan on the next call

    def set_switch_every(self, every: int) -> None:
        """LoRA Switch's block length in steps (takes effect at the next generation or step)."""
        self.switch_every = methods.check_switch_every(every)
        self._plan = None
        if self.method == "switch":
            self.set_method("switch")

    def set_method(self, method: str) -> None:
        """One of ``klora.methods.METHODS``: klora, est, switch (per step), np, merge, content, style (static)."""
        self.method = methods.check_method(method)
        wanted = {}
        for layer in self.layers:
            if method in ("content", "style"):
                wanted[layer.key] = layer.roles & {method}
            elif method == "merge" or method == "switch" and not layer.roles & _BOTH:
                wanted[layer.key] = layer.roles
            elif method == "np":
                wanted[layer.key] = self.roles_of(layer)
            elif not layer.chosen and method != "switch":
                wanted[layer.key] = layer.klora_roles
        self._show(wanted)
        self._mask = {component: None for component in self.denoisers}
        if method in methods.PER_STEP:  # until the first step: the choice at step 0
            for component in self.denoisers:
                self._apply_mask(component, self._mask_at(component, 0, 0.0))
        self._plan = None

    def scale_at(self, progress: float) -> float:
        return rule.scale_at(progress, self.pattern, self.alpha, self.beta)

    def choices_at(self, progress: float, step: int | None = None) -> dict[str, str]:
        """Which LoRA each shared layer uses at ``progress`` in [0, 1) (K-LoRA's rule when the method
        is not per step); LoRA Switch needs the ``step``."""
        chosen = {}
        for component, layers in self._shared.items():
            mask = self._mask_at(component, step, progress, layers)
            chosen.update({layer.key: ("content" if c else "style") for layer, c in zip(layers, mask)})
        return chosen

    def _mask_at(self, component: str, step: int | None, progress: float, layers=None) -> tuple:
        """True (content) or False (style) for each of ``layers`` (default: this method's stepped layers)."""
        layers = self._stepped(component) if layers is None else layers
        if self.method == "switch":
            if step is None:
                raise KLoRAError("LoRA Switch chooses by step: give the step")
            return (lora_switch.uses_content(step, self.switch_every),) * len(layers)
        if self.method == "est":
            mask = est_lora.content_mask(self._content_energy[component], self._style_energy[component],
                                         self._gamma[component], self.scale_at(progress))
        else:
            mask = rule.content_mask(self._content_topk[component], self._style_topk[component],
                                     self._gamma[component], self.scale_at(progress))
        return tuple(mask.tolist())

    # --- per step ----------------------------------------------------------

    def _hook_for(self, component: str):
        def before_forward(module, args, kwargs):
            self._before_forward(component, module, args, kwargs)
            return None

        return before_forward

    def _before_forward(self, component, module, args, kwargs) -> None:
        if self._weights.in_use:
            self._follow_lora_scale(kwargs)
        if self.method not in methods.PER_STEP:
            return
        new_generation, step, total, progress = self._progress(module, args, kwargs)
        if new_generation or self._plan is None:
            if new_generation:
                self.generations.append(_Generation(num_inference_steps=total, steps=[]))
                del self.generations[:-self._max_generations]
                self._weights.prepare()
            self._plan = {"masks": {}, "canonical": {}, "logged": set()}
            for i, value in enumerate(self._progress.schedule()):  # every step's choice, once per generation
                for c in self.denoisers:
                    self._planned_mask(c, i, value)
        mask = self._planned_mask(component, step, progress)
        if mask is not self._mask[component]:
            self._apply_mask(component, mask)
        if (step, component) not in self._plan["logged"] and self.generations:
            self._plan["logged"].add((step, component))
            shared = mask if self.method != "switch" else mask[:1] * len(self._shared[component])
            scale = None if self.method == "switch" else self.scale_at(progress)
            self.generations[-1].steps.append((step, progress, scale, component, shared))

    def _follow_lora_scale(self, kwargs) -> None:
        """Written weights hold the deltas, so the pipeline's LoRA scale (which PEFT adapters would apply
        in the forward) is folded into them: a changed scale rewrites every written layer."""
        scale = 1.0
        for name in ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs"):
            extra = kwargs.get(name)
            if isinstance(extra, dict) and extra.get("scale") is not None:
                scale = float(extra["scale"])
                break
        if scale != self._weights.lora_scale:
            self._weights.set_lora_scale(scale, self._state)

    def _planned_mask(self, component: str, step: int, progress: float) -> tuple:
        """The choice at this step; steps with the same choice share one object, so a step
        that changes nothing costs one identity check."""
        masks = self._plan["masks"]
        where = (component, step if self.method == "switch" else progress)
        mask = masks.get(where)
        if mask is None:
            mask = self._mask_at(component, step, progress)
            mask = masks[where] = self._plan["canonical"].setdefault((component, mask), mask)
        return mask

    def _apply_mask(self, component: str, mask: tuple) -> None:
        self._mask[component] = mask
        self._show({layer.key: layer.roles & (_CONTENT if use_content else _STYLE)
                    for layer, use_content in zip(self._stepped(component), mask)})

    def _show(self, wanted: dict) -> None:
        """Make each layer in ``wanted`` apply exactly the LoRAs named there."""
        changes = [(layer, wanted[layer.key]) for layer in self.layers
                   if layer.key in wanted and self._state[layer.key] != wanted[layer.key]]
        if changes:
            if self._peft is not None:
                self._peft.show(changes)
            self._weights.show(changes)
            for layer, roles in changes:
                self._state[layer.key] = roles

    # --- reporting ---------------------------------------------------------

    def selection_log(self) -> dict:
        """Everything needed to audit the choices, as plain JSON-able data."""
        log = {
            "pattern": self.pattern, "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
            "method": self.method, "progress": self.progress_mode, "switching": self.switching,
        }
        log.update({role: label for role, label in self.labels.items() if not role.startswith("extra")})
        if self.strengths != {"content": 1.0, "style": 1.0}:
            log["content_scale"], log["style_scale"] = self.strengths["content"], self.strengths["style"]
        if self.extra_scales:
            log["extra_loras"] = [{"file": self.labels[key], "scale": scale, "second_expert": key.endswith("_2")}
                                  for key, scale in self.extra_scales.items()]
        if self.multi:
            log["denoisers"] = list(self.denoisers)
        if self.beta_auto:
            log["beta_auto"] = dict(self.beta_auto)
        log.update(methods.log_knobs(self.method, self.np_mu, self.switch_every))
        log["layers"] = methods.log_layers(self.stats, self.energies)
        log["only"] = dict(self.only)
        full = {layer.key: sorted(layer.full) for layer in self.layers if layer.full}
        if full:
            log["full_weight_deltas"] = full
        generations = []
        for g in self.generations:
            steps = []
            for step, progress, scale, component, mask in g.steps:
                entry = {"step": step, "progress": progress, "scale": scale}
                if self.multi:
                    entry["component"] = component
                entry["choices"] = {layer.key: ("content" if c else "style")
                                    for layer, c in zip(self._shared[component], mask)}
                steps.append(entry)
            generations.append({"num_inference_steps": g.num_inference_steps, "steps": steps})
        log["generations"] = generations
        return log

    def save_selection_log(self, path: str | os.PathLike) -> None:
        atomic.write_text(path, json.dumps(self.selection_log(), indent=1))

    def memory(self) -> dict[str, int]:
        """Bytes of exact weight copies K-LoRA keeps, by device ({} when it writes no weight)."""
        return self._weights.memory()

    # --- removal -----------------------------------------------------------

    def detach(self) -> None:
        """Remove the hooks, the LoRAs and the extras; the user's own LoRAs stay as they were, every
        weight is exactly as before."""
        if getattr(self, "_detached", True):
            return
        for hook in self._hooks:
            hook.remove()
        self._progress.release()
        self._weights.remove()
        if self._peft is not None:
            self._peft.remove()
        self._remove_text_encoder_adapters()
        for component, denoiser in self.denoisers.items():
            if hasattr(denoiser, "_klora_attached"):
                del denoiser._klora_attached
            if self._compiled:
                for name, parameter in denoiser.named_parameters():
                    parameter.requires_grad_(self._requires_grad.get((component, name), parameter.requires_grad))
        self._detached = True

    def _remove_text_encoder_adapters(self) -> None:
        for entry in self._text_encoders:
            encoder = entry[0]
            from peft.tuners.tuners_utils import BaseTunerLayer

            if any(isinstance(m, BaseTunerLayer) for m in encoder.modules()):
                from diffusers.utils import recurse_remove_peft_layers

                recurse_remove_peft_layers(encoder)
                if hasattr(encoder, "peft_config"):
                    del encoder.peft_config
                encoder._hf_peft_config_loaded = None
        self._text_encoders = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    def __repr__(self) -> str:
        gamma = self.gamma
        gamma = {k: round(v, 4) for k, v in gamma.items()} if isinstance(gamma, dict) else f"{gamma:.4g}"
        return (f"KLoRA(family={self.family.name!r}, pattern={self.pattern!r}, alpha={self.alpha}, "
                f"beta={self.beta}, gamma={gamma}, method={self.method!r}, switching={self.switching!r}, "
                f"shared_layers={len(self.paths)}, single_lora_layers={len(self.only)}, "
                f"extra_loras={len(self.extra_scales)})")


def attach(target, content, style, **kwargs) -> KLoRA:
    """Attach K-LoRA to a pipeline or denoiser; ``detach()`` the result to remove it."""
    return KLoRA(target, content, style, **kwargs)


def converted_pair(target, content, style, *, content_scale=1.0, style_scale=1.0, content_weight_name=None,
                   style_weight_name=None) -> tuple[dict[str, dict], dict[str, str]]:
    """({component: {"content": adapter, "style": adapter}}, {role: label}): the two LoRAs converted and
    checked for each denoiser of ``target``, strengths applied, nothing loaded (``klora.export``)."""
    _, family, denoisers = resolve_target(target)
    files = {"content": _as_lora_file(content, content_weight_name, "content LoRA"),
             "style": _as_lora_file(style, style_weight_name, "style LoRA")}
    adapters, notes = _convert_all(family, denoisers, files)
    for line in notes:
        warnings.warn(line, stacklevel=3)
    strengths = {"content": _strength(content_scale, "content_scale"), "style": _strength(style_scale, "style_scale")}
    pair = {component: {role: loras.scaled(adapters[component, role], strengths[role]) for role in ROLES}
            for component in denoisers}
    return pair, {role: f.label for role, f in files.items()}


def check_loras(name_or_path, files: dict[str, loras.LoRAFile]) -> list[str]:
    """Check LoRA files against a model before its weights are loaded: the model's denoisers are
    built on the meta device from their configs. ``files``: {"content": ..., "style": ...,
    "content_2"?: ..., "style_2"?: ..., "extra1"?: ..., "extra1_2"?: ...}. Raises ``LoRAError``;
    returns the warning lines ``KLoRA`` will give. Does nothing when the configs cannot be read
    (the load reports that)."""
    from .pipelines import empty_denoisers, family_for_model

    family, _ = family_for_model(name_or_path)
    denoisers = empty_denoisers(name_or_path, family)
    if not denoisers:
        return []
    for key in files:
        if key.endswith("_2") and len(denoisers) < 2:
            raise _one_denoiser("extra_2" if key.startswith("extra") else key, f"{family.name} '{name_or_path}'")
    return _convert_all(family, denoisers, files)[1]


def _one_denoiser(key: str, model: str) -> KLoRAError:
    return KLoRAError(f"a {key} LoRA was given, but {model} has one denoiser; the _2 LoRAs are for the second "
                      "(low-noise) expert of two-expert models such as Wan 2.2 A14B")


def _files_for(components: list[str], component: str, files) -> dict[str, str]:
    """{role: file key} used for ``component``: the ``_2`` files go to the second denoiser. Roles: content,
    style, then extra1, extra2, ... (the second denoiser's own extra list when one was given)."""
    second = len(components) > 1 and component == components[1]
    chosen = {role: (f"{role}_2" if second and f"{role}_2" in files else role) for role in ROLES}
    own_extras = second and any(k.startswith("extra") and k.endswith("_2") for k in files)
    for key in files:
        if key.startswith("extra") and key.endswith("_2") == own_extras:
            chosen[key.removesuffix("_2")] = key
    return chosen


def _extra_entries(entries, name: str) -> list[tuple[object, float]]:
    """``[(source, scale)]`` from ``[source, (source, scale), ...]``."""
    if entries is None:
        return []
    if isinstance(entries, (str, os.PathLike, dict, loras.LoRAFile)):
        entries = [entries]
    entries, out = list(entries), []
    for i, entry in enumerate(entries):
        if isinstance(entry, tuple):
            if len(entry) != 2:
                raise KLoRAError(f"{name}: each entry is a LoRA or a (LoRA, scale) pair, got {entry!r}")
            source, scale = entry
        else:
            source, scale = entry, 1.0
        out.append((source, _strength(scale, f"{name} scale" if len(entries) == 1 else f"{name}[{i}] scale")))
    return out


# The largest strength or extra-LoRA scale, as in ComfyUI's LoRA loaders (and klora.comfyui_nodes). Pictures
# are ruined long before it; far past it (1e30) every picture is black, and 1e308 overflows float32 when the
# deltas are summed.
MAX_STRENGTH = 100.0


def _strength(value, name: str) -> float:
    """A LoRA's strength (or an extra LoRA's scale) as a float: finite, not 0, at most MAX_STRENGTH in size."""
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:36] + "..."
    if isinstance(value, bool):
        raise KLoRAError(f"{name} must be a number, got {shown}")
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):  # float(10**400) overflows
        raise KLoRAError(f"{name} must be a finite number, got {shown}") from None
    if not math.isfinite(value) or value == 0 or abs(value) > MAX_STRENGTH:
        raise KLoRAError(f"{name} must be a finite number other than 0, from -{MAX_STRENGTH:g} to {MAX_STRENGTH:g} "
                         f"(0 would apply nothing), got {value:g}")
    return value


def _convert_all(family, denoisers: dict, files: dict) -> tuple[dict, list[str]]:
    """({(component, role): DenoiserAdapter}, warning lines): every LoRA converted and checked against
    its denoiser before any is loaded; one warning line per file, not one per expert."""
    adapters, converted, notes = {}, {}, []
    for component, denoiser in denoisers.items():
        for role, key in _files_for(list(denoisers), component, files).items():
            cache = (key, type(denoiser))  # conversion depends on the file and the model class only
            if cache not in converted:
                converted[cache] = loras.to_denoiser_adapter(files[key], denoiser, family)
            adapter = _copy_adapter(converted[cache])
            notes += loras.check_fits(adapter, denoiser, files[key].label, family, files[key])
            adapters[component, role] = adapter
    return adapters, list(dict.fromkeys(notes))


def _unit_of(parameter: str, module_paths: set[str]) -> str:
    """The layer a full-weight part belongs to: the module of a weight or bias, else the parameter itself."""
    module, _, name = parameter.rpartition(".")
    return module if name in ("weight", "bias") and module in module_paths else parameter


def _module_paths(denoiser) -> set[str]:
    """Every module path of ``denoiser``, PEFT's wrappers seen through ("x.base_layer" is "x")."""
    return {name.replace(".base_layer", "") for name, _ in denoiser.named_modules()}


def _paths_in_model_order(denoiser, paths: set[str]) -> list[str]:
    """``paths`` (modules and parameters) in the order the denoiser holds their parameters."""
    order = []
    for name in loras.denoiser_parameters(denoiser):
        owner = name.rpartition(".")[0]
        for candidate in (owner, name):
            if candidate in paths and candidate not in order:
                order.append(candidate)
    return order + sorted(paths - set(order))


# --- applying a choice: PEFT adapters, and weights written in place ------------------

class _Adapters:
    """The LoRAs as PEFT adapters: a layer's active adapters are the user's own (as they were before
    attaching), the extra LoRAs it has, and the ones K-LoRA applies there now.

    A user's LoRA fused into a layer (``fuse_lora``) stays fused: its delta is in the weight, so the layer is
    marked unmerged while K-LoRA is attached (PEFT would otherwise skip every adapter there, and loading an
    adapter would unmerge it by subtraction) with the fused adapter inactive, and marked merged again after.
    """

    def __init__(self, klora: KLoRA, loaded: list):
        from diffusers import DiffusionPipeline
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.denoisers = klora.denoisers
        self._had_adapters = {c: bool(getattr(d, "peft_config", {}) or {}) for c, d in self.denoisers.items()}
        # The user's adapters, layer by layer, to keep them on and to put them back exactly.
        self._user = {}
        for denoiser in self.denoisers.values():
            for module in denoiser.modules():
                if isinstance(module, BaseTunerLayer):
                    merged = list(module.merged_adapters)
                    self._user[module] = (list(module.active_adapters), merged,
                                          {p: p.requires_grad for p in module.parameters()})
                    module.merged_adapters = []
        pipeline = klora.pipeline if isinstance(klora.pipeline, DiffusionPipeline) else None  # offload handling
        try:
            for component, denoiser in self.denoisers.items():
                for role, key in klora.files_for(component).items():
                    loras.load_adapter(denoiser, klora._adapters[component, role], adapter_name(role),
                                       klora.labels[key], pipeline=pipeline)
                    loaded.append((component, adapter_name(role)))
                correction = klora._adapters[component, "np"]
                if correction.modules:
                    loras.load_adapter(denoiser, correction, adapter_name("np"), "NP-LoRA's merge", pipeline=pipeline)
                    loaded.append((component, adapter_name("np")))
        except BaseException:
            self._restore_user()
            raise
        self._modules, self._fixed = {}, {}
        for component, denoiser in self.denoisers.items():
            extras = [adapter_name(role) for role in klora.extra_roles(component)]
            for path, module in denoiser.named_modules():
                if not isinstance(module, BaseTunerLayer):
                    continue
                active, merged, _ = self._user.get(module, ([], [], {}))
                user = [n for n in active if n not in merged]  # a fused LoRA is in the weight already
                fixed = self._fixed[module] = user + [n for n in extras if n in module.lora_A]
                # Every LoRA layer, also those K-LoRA's files do not reach: loading an adapter makes it the
                # active one everywhere. K-LoRA's own come with the first show().
                module.set_adapter(fixed, inference_mode=True)
                self._modules[component, path] = module
        self._by_key = {layer.key: self._modules.get((layer.component, layer.path)) for layer in klora.layers}

    def show(self, changes) -> None:
        for layer, roles in changes:
            module = self._by_key[layer.key]
            if module is not None:
                present = module.lora_A
                module.set_adapter(self._fixed[module] + [ADAPTER_NAMES[r] for r in ADAPTER_NAMES
                                                          if r in roles and ADAPTER_NAMES[r] in present],
                                   inference_mode=True)

    def remove(self) -> None:
        for component, denoiser in self.denoisers.items():
            names = [n for n in (getattr(denoiser, "peft_config", {}) or {}) if n.startswith("klora_")]
            if not self._had_adapters[component]:
                denoiser.unload_lora()  # unwraps every LoRA layer: the original modules come back
            elif names:
                with warnings.catch_warnings():  # PEFT hands a layer to another adapter; the user's come back below
                    warnings.filterwarnings("ignore", message=r"Adapter klora_\w+ was active which is now deleted")
                    denoiser.delete_adapters(names)
                self._unwrap_emptied(denoiser)
        self._restore_user()

    def _restore_user(self) -> None:
        for module, (active, merged, requires_grad) in self._user.items():
            module.set_adapter(active)
            module.merged_adapters = merged
            for parameter, flag in requires_grad.items():
                parameter.requires_grad_(flag)

    def _unwrap_emptied(self, denoiser) -> None:
        """Put back the plain layers K-LoRA wrapped next to the user's LoRA layers (now without adapters)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for parent in list(denoiser.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, BaseTunerLayer) and child not in self._user and not child.lora_A:
                    setattr(parent, name, child.get_base_layer())

    @staticmethod
    def remove_names(denoisers, loaded) -> None:
        for component, name in loaded:
            if name in getattr(denoisers[component], "peft_config", {}):
                denoisers[component].delete_adapters(name)


class _Weights:
    """Parameters K-LoRA writes in place: ``W0 + extras + the parts of the LoRAs applied now``, from exact copies.

    ``lowrank``: the low-rank factors are applied by writing the weights too (fused switching); without it
    PEFT adapters apply them and only the full-weight parts are written. Layers both LoRAs adapt keep their copy on the weight's device when it fits (else on
    the host): they switch during a generation. Other layers are written once; their ``W0`` waits on the host
    for ``detach`` and method changes. The extra LoRAs live in the copy the switch rewrites from; ``W0`` itself
    is kept apart, for ``detach``.
    """

    def __init__(self, klora: KLoRA, lowrank: bool):
        self._tensors: dict[str, list[_Tensor]] = {}  # layer key -> what a switch of that layer rewrites
        self._fixed: list[_Tensor] = []  # parameters only extra LoRAs change: written once
        self._bytes = {}
        self.lora_scale = 1.0  # the pipeline's LoRA scale (cross_attention_kwargs["scale"] and the like)
        shared_keys = set(klora.paths)
        for component, denoiser in klora.denoisers.items():
            modules = {name.replace(".base_layer", ""): m for name, m in denoiser.named_modules()}
            parameters = loras.denoiser_parameters(denoiser)
            extras = [klora._adapters[component, role] for role in klora.extra_roles(component)]
            layers = {layer.path: layer for layer in klora.layers if layer.component == component}
            module_paths = set(modules)
            for path in set(layers) | {p for a in extras for p in _changed_units(a, module_paths, lowrank)}:
                layer = layers.get(path)
                terms = {role: klora._adapters[component, role] for role in (klora.roles_of(layer) if layer else ())}
                tensors = []
                for name, target in _targets(path, modules, parameters):
                    role_terms = {role: _terms(a, path, name, target, lowrank)
                                  for role, a in terms.items()}
                    role_terms = {role: t for role, t in role_terms.items() if t}
                    base_terms = tuple(t for a in extras for t in _terms(a, path, name, target,
                                                                          lowrank))
                    if not role_terms and not base_terms:
                        continue
                    owner, attribute = target
                    tensors.append(self._tensor(owner, attribute, role_terms, base_terms,
                                                layer is not None and layer.key in shared_keys))
                if not tensors:
                    continue
                if layer is None:
                    self._fixed += tensors
                else:
                    self._tensors[layer.key] = tensors
        self.in_use = bool(self._tensors or self._fixed)
        with torch.no_grad():
            for tensor in self._fixed:
                tensor.write((), self.lora_scale)

    def _tensor(self, owner, attribute, terms, base_terms, switching) -> _Tensor:
        live = _storage(owner, attribute)
        home = _backup_device(live, switching)
        to = dict(device=home, dtype=live.dtype)
        terms = {role: tuple(_moved(t, **to) for t in ts) for role, ts in terms.items()}
        base_terms = tuple(_moved(t, **to) for t in base_terms)
        with torch.no_grad():
            backup = live.detach().to("cpu" if base_terms else home, copy=True)
            if backup.device.type == "cpu" and live.device.type == "cuda":
                backup = backup.pin_memory()
        tensor = _Tensor(owner, attribute, backup, terms, base_terms, switching, home)
        for device, size in tensor.sizes():
            self._bytes[device] = self._bytes.get(device, 0) + size
        return tensor

    def prepare(self) -> None:
        """Before a generation: move copies next to weights that moved to a GPU after attaching."""
        for tensors in self._tensors.values():
            for tensor in tensors:
                device = _storage(tensor.owner, tensor.attribute).device
                if tensor.base.device == device or device.type != "cuda" or tensor.base.device.type != "cpu":
                    continue
                if tensor.switching and _fits_on(device, tensor.base.numel() * tensor.base.element_size()):
                    tensor.move_to(device)

    def show(self, changes) -> None:
        entries, lora_scale = self._tensors, self.lora_scale
        with torch.no_grad():
            for layer, roles in changes:
                for tensor in entries.get(layer.key, ()):
                    tensor.write(roles, lora_scale)

    def set_lora_scale(self, scale: float, state: dict) -> None:
        """The pipeline's LoRA scale changed: every written parameter again, with its current LoRAs."""
        self.lora_scale = scale
        with torch.no_grad():
            for tensor in self._fixed:
                tensor.rebase(scale)
                tensor.write((), scale)
            for key, tensors in self._tensors.items():
                for tensor in tensors:
                    tensor.rebase(scale)
                    tensor.write(state.get(key) or (), scale)

    def memory(self) -> dict:
        return dict(self._bytes)

    def remove(self) -> None:
        with torch.no_grad():
            for tensor in [t for ts in self._tensors.values() for t in ts] + self._fixed:
                _storage(tensor.owner, tensor.attribute).copy_(tensor.backup)
        self._tensors, self._fixed = {}, []


def _changed_units(adapter, module_paths, lowrank: bool) -> set[str]:
    """The layers an extra LoRA changes by writing weights: its full-weight parts, and its low-rank
    layers where those are written (not PEFT adapters)."""
    units = {_unit_of(path, module_paths) for path in adapter.full}
    return units | (set(adapter.modules) if lowrank else set())


def _targets(path: str, modules: dict, parameters: dict) -> list[tuple[str, tuple]]:
    """[(parameter name as LoRA parts name it, (owner module, attribute))] that a layer's switch writes."""
    module = modules.get(path)
    if module is None:  # a parameter of its own (Wan's modulation table)
        owner, _, attribute = path.rpartition(".")
        return [(path, (modules[owner], attribute))]
    base = getattr(module, "base_layer", module)
    return [(f"{path}.{name}", (base, name)) for name in ("weight", "bias")
            if f"{path}.{name}" in parameters]


def _terms(adapter, path: str, parameter: str, target, lowrank: bool) -> tuple:
    """What ``adapter`` adds to one parameter: ("lowrank", A, B, scale) and ("dense", delta, scale) terms."""
    terms = []
    owner, attribute = target
    if lowrank and path in adapter.scales:
        scale = adapter.scales[path]
        if attribute == "weight":
            A = adapter.state_dict[f"{path}.lora_A.weight"].flatten(1)
            B = adapter.state_dict[f"{path}.lora_B.weight"].flatten(1)
            terms.append(("lowrank", A, B, scale))
        elif attribute == "bias" and f"{path}.lora_B.bias" in adapter.state_dict:
            terms.append(("dense", adapter.state_dict[f"{path}.lora_B.bias"], scale))
    if parameter in adapter.full:
        terms.append(("dense", adapter.full[parameter], adapter.strength))
    return tuple(terms)


def _moved(term, device, dtype):
    kind, *tensors, scale = term
    return (kind, *(t.to(device=device, dtype=dtype).contiguous() for t in tensors), scale)


class _Tensor:
    """One parameter K-LoRA writes: its owner, exact copies of ``W0`` and of ``W0 + extras`` (the base a switch
    rewrites from), each LoRA's terms, and views bound to wherever the parameter lives now, so that the
    common switch (one LoRA, low-rank only) is one ``addmm`` and no Python bookkeeping (rebound only when
    the parameter moved: ``pipe.to``, CPU offload)."""

    __slots__ = ("owner", "attribute", "backup", "base", "terms", "base_terms", "switching", "_ptr", "_out",
                 "_base", "_live", "_single")

    def __init__(self, owner, attribute, backup, terms, base_terms, switching, home):
        self.owner, self.attribute, self.backup = owner, attribute, backup
        self.terms, self.base_terms, self.switching = terms, base_terms, switching
        self.base = backup
        if base_terms:
            self.base = torch.empty(backup.shape, dtype=backup.dtype, device=home)
            self.rebase(1.0)
        self._ptr = None

    def sizes(self) -> list[tuple[str, int]]:
        copies = [self.backup] + ([self.base] if self.base is not self.backup else [])
        return [(str(t.device), t.numel() * t.element_size()) for t in copies]

    def rebase(self, lora_scale: float) -> None:
        """base <- W0 + the extra LoRAs at ``lora_scale``, summed in float32 and rounded once."""
        if not self.base_terms:
            return
        total = self.backup.to(self.base.device, torch.float32, copy=True)
        _add_terms(total.view(_matrix(total)), self.base_terms, lora_scale)
        self.base.copy_(total)
        self._ptr = None

    def move_to(self, device) -> None:
        if self.base is self.backup:
            self.backup = self.base = self.backup.to(device)
        else:
            self.base = self.base.to(device)
        self.terms = {role: tuple(_moved(t, device, t[1].dtype) for t in ts) for role, ts in self.terms.items()}
        self._ptr = None

    def _bind(self, live) -> None:
        device = live.device

        def here(term):
            kind, *tensors, scale = term
            return (kind, *(t if t.device == device else t.to(device, non_blocking=True) for t in tensors), scale)

        self._out = live.view(_matrix(live))
        # A base kept on the host (no room on the GPU) is sent over at each write, never kept here.
        self._base = self.base.view(self._out.shape) if self.base.device == device else None
        self._live = {role: tuple(here(t) for t in ts) for role, ts in self.terms.items()}
        # The common switch: one LoRA whose only part here is its low-rank factors.
        self._single = {role: ts[0][1:] for role, ts in self._live.items() if len(ts) == 1 and ts[0][0] == "lowrank"}
        self._ptr = (live.data_ptr(), device)

    def write(self, roles, lora_scale: float) -> None:
        """parameter <- base + the terms of ``roles``, without reading the parameter's old value."""
        live = self.owner._parameters.get(self.attribute)
        if live is None or live.is_meta:  # sequential CPU offload: write the host copy the offload hook loads from
            live = _storage(self.owner, self.attribute)
        if self._ptr != (live.data_ptr(), live.device):
            self._bind(live)
        out = self._out
        base = self._base if self._base is not None else self.base.to(out.device, non_blocking=True).view(out.shape)
        if len(roles) == 1:
            (role,) = roles
            single = self._single.get(role)
            if single is not None:
                A, B, scale = single
                torch.addmm(base, B, A, alpha=scale * lora_scale, out=out)  # one rounding, in the weight's dtype
                return
        terms = [t for role in sorted(roles) for t in self._live.get(role, ())]
        if not terms:
            out.copy_(base)
        else:  # several parts (both LoRAs under "merge", full-weight parts): sum in float32, round once
            total = base.to(torch.float32, copy=True)  # never .float(): a no-op on float32, it would add into W0
            _add_terms(total, terms, lora_scale)
            out.copy_(total)


def _matrix(tensor) -> tuple[int, ...]:
    """The 2-D view a parameter is written through (a bias or norm weight stays 1-D)."""
    return (tensor.shape[0], -1) if tensor.dim() > 1 else tuple(tensor.shape)


def _add_terms(total, terms, lora_scale: float) -> None:
    for kind, *tensors, scale in terms:
        if kind == "lowrank":
            A, B = tensors
            total.addmm_(B.float(), A.float(), alpha=scale * lora_scale)
        else:
            total.add_(tensors[0].float().view(total.shape), alpha=scale * lora_scale)


def _storage(module, name: str):
    """The tensor that holds ``module.<name>``: the parameter itself, or, when sequential CPU
    offload keeps it on the meta device, the host copy the offload hook loads it from."""
    tensor = getattr(module, name)
    if tensor is None or tensor.device.type != "meta":
        return tensor
    weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights_map is not None:
        try:
            return weights_map[name]
        except KeyError:
            pass
    raise KLoRAError(f"a {type(module).__name__} weight is on the meta device with no offloaded copy to write to; "
                     "attach K-LoRA with switching='adapters'")


def _backup_device(weight, switching: bool) -> torch.device:
    if switching and weight.device.type == "cuda" and _fits_on(weight.device, weight.numel() * weight.element_size()):
        return weight.device
    return torch.device("cpu") if weight.device.type != "cpu" else weight.device


def _fits_on(device, nbytes: int) -> bool:
    """Leave a margin for activations: 2 GB or a tenth of the card, whichever is more."""
    free, total = torch.cuda.mem_get_info(device)
    return nbytes + max(2 << 30, total // 10) < free


def _why_not_fused(denoiser, adapters) -> str | None:
    """Why the weights ``adapters`` ({role: DenoiserAdapter}) change cannot be rewritten in place, or None."""
    paths = sorted(set().union(*(a.modules for a in adapters.values())))
    biased = {p for a in adapters.values() for p in a.modules if f"{p}.lora_B.bias" in a.state_dict}
    return _why_not_rewritable(denoiser, paths, biased)


def _why_not_rewritable(denoiser, paths, biased=()) -> str | None:
    """Why the weights of layers ``paths`` (with LoRA biases on ``biased``) cannot be rewritten in place."""
    modules = dict(denoiser.named_modules())
    for path in paths:
        module = modules[path]
        module = getattr(module, "base_layer", module)
        weight = getattr(module, "weight", None)
        reason = _why_not_writable_tensor(module, "weight", f"layer '{path}'")
        if reason is not None:
            return reason
        if type(module) not in (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d):
            return f"layer '{path}' is {type(module).__name__} with {weight.dtype} weights, e.g. a quantized model"
        if path in biased and module.bias is None:
            return f"a LoRA has a bias for layer '{path}', which has none"
    return None


def _why_not_writable(denoiser, full: dict) -> str | None:
    """Why the parameters full-weight parts change cannot be written in place, or None when they can."""
    modules = {name.replace(".base_layer", ""): m for name, m in denoiser.named_modules()}
    for path in sorted(full):
        owner, _, attribute = path.rpartition(".")
        module = modules[owner]
        reason = _why_not_writable_tensor(getattr(module, "base_layer", module), attribute, f"parameter '{path}'")
        if reason is not None:
            return reason
    return None


def _why_not_writable_tensor(module, attribute: str, what: str) -> str | None:
    tensor = getattr(module, attribute, None)
    if tensor is not None and tensor.device.type == "meta":
        try:
            tensor = _storage(module, attribute)
        except KLoRAError:
            return "weights on the meta device with no offloaded copy"
    if tensor is None:
        return f"{what} does not exist"
    if not tensor.is_contiguous():
        return f"{what} is not one contiguous block of memory"
    if type(tensor) not in (torch.nn.Parameter, torch.Tensor) or not tensor.is_floating_point() \
            or tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"{what} holds {type(tensor).__name__} {tensor.dtype} values, e.g. a quantized model"
    return None


# --- helpers -----------------------------------------------------------------

def resolve_target(target) -> tuple[object, Family, dict[str, torch.nn.Module]]:
    """(pipeline or None, family row, {component: denoiser}) for a pipeline or a bare denoiser."""
    if isinstance(target, torch.nn.Module):
        family = family_of(target)
        return None, family, {family.denoisers[0]: target}
    try:
        family = family_of(target)
    except KLoRAError:
        # A pipeline without a LoRA loader whose denoiser still takes PEFT adapters.
        for attr in ("unet", "transformer"):
            denoiser = getattr(target, attr, None)
            if isinstance(denoiser, torch.nn.Module):
                family = family_of(denoiser)
                return target, family, {attr: denoiser}
        raise
    return target, family, denoisers_of(target, family)


def split_target(target):
    """(pipeline or None, first denoiser) for a pipeline or a denoiser."""
    pipeline, _, denoisers = resolve_target(target)
    return pipeline, next(iter(denoisers.values()))


def _copy_adapter(adapter: loras.DenoiserAdapter) -> loras.DenoiserAdapter:
    return loras.DenoiserAdapter(state_dict=dict(adapter.state_dict), config=json.loads(json.dumps(adapter.config)),
                                 text_encoder_state_dicts=adapter.text_encoder_state_dicts,
                                 text_encoder_alphas=adapter.text_encoder_alphas, scales=dict(adapter.scales),
                                 full_parts=dict(adapter.full_parts), full=dict(adapter.full),
                                 strength=adapter.strength)


def _as_lora_file(source, weight_name, role) -> loras.LoRAFile:
    if isinstance(source, loras.LoRAFile):
        return source
    if isinstance(source, dict):
        from pathlib import Path

        return loras.LoRAFile(label=f"{role} (state dict)", path=Path("<memory>"), tensors=dict(source))
    return loras.load_file(source, weight_name, role)


def _stats_device(denoiser) -> torch.device:
    for parameter in denoiser.parameters():
        if parameter.device.type not in ("meta", "cpu"):
            return parameter.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _layer_stats(adapters, path: str, device) -> tuple[rule.LayerStats, tuple[float, float]]:
    """K-LoRA's statistics of one layer and EST-LoRA's energies (content, style), one dense |dW| in
    memory at a time (a FLUX.2 or Wan layer's update is a gigabyte in float32)."""
    ranks = [adapters[role].state_dict[f"{path}.lora_A.weight"].shape[0] for role in ROLES]
    k = ranks[0] * ranks[1]
    sums, energies = [], []
    for role in ROLES:
        magnitudes = _delta_from_adapter(adapters[role], path, device).abs_()
        sums.append(rule.magnitude_sums(magnitudes, k))
        energies.append(est_lora.energy(magnitudes))
        del magnitudes
    (content_topk, content_sum), (style_topk, style_sum) = sums
    return rule.LayerStats(k=k, content_topk_sum=content_topk, style_topk_sum=style_topk,
                           content_abs_sum=content_sum, style_abs_sum=style_sum), tuple(energies)


def _np_correction(adapters, paths: list[str], mu: float, device) -> loras.DenoiserAdapter:
    """NP-LoRA's correction of the content LoRA as one more adapter on ``paths`` (the layers both adapt):
    ``-c * scale_c * B_c (A_c V V^T)``, so that content + style + correction is ``klora.np_lora``'s merge.
    Convolution factors are projected in their flattened input space."""
    content, style = adapters["content"], adapters["style"]
    strength = np_lora.projection_strength(mu)
    state = {}
    with torch.no_grad():
        for path in paths:
            A = content.state_dict[f"{path}.lora_A.weight"]
            directions = np_lora.style_directions(style.state_dict[f"{path}.lora_A.weight"].flatten(1).to(device),
                                                  style.state_dict[f"{path}.lora_B.weight"].flatten(1).to(device))
            part = np_lora.style_part(A.flatten(1).to(device), directions)
            state[f"{path}.lora_A.weight"] = part.reshape(A.shape).to(A.device, A.dtype)
            state[f"{path}.lora_B.weight"] = content.state_dict[f"{path}.lora_B.weight"]
    config = dict(content.config, target_modules=list(paths))
    config.pop("lora_bias", None)
    unscaled = loras.DenoiserAdapter(state_dict=state, config=config, text_encoder_state_dicts={},
                                     scales={path: content.scales[path] for path in paths}, strength=content.strength)
    return loras.scaled(unscaled, -strength)


def _delta_from_adapter(adapter, path: str, device) -> torch.Tensor:
    """``scale * B @ A`` of one layer (convolution factors flattened), in float32."""
    A = adapter.state_dict[f"{path}.lora_A.weight"]
    B = adapter.state_dict[f"{path}.lora_B.weight"]
    return rule.dense_delta(A.flatten(1).to(device), B.flatten(1).to(device), adapter.scales[path])


# --- progress through the denoising schedule -----------------------------------

def _timestep_value(timestep) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.flatten()[0]) if timestep.numel() else None
    return float(timestep)


_TIMESTEP_NAMES = ("timestep", "timesteps", "t")  # what denoisers call it (Z-Image: t)


def _timestep_argument(module, args, kwargs):
    for name in _TIMESTEP_NAMES:
        if name in kwargs:
            return kwargs[name]
    signature = getattr(module, "_klora_signature", None)
    if signature is None:
        import inspect

        signature = module._klora_signature = inspect.signature(module.forward)
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return None
    return next((bound[name] for name in _TIMESTEP_NAMES if name in bound), None)


class _SchedulerProgress:
    """Progress from the pipeline's scheduler, whatever timestep convention the denoiser sees.

    ``steps`` (the paper's): p = step / steps, counted over the steps this run takes
    (an img2img run at strength 0.5 goes through the whole K-LoRA schedule in its
    half of the steps). ``noise``: p = 1 - t / T, where t is the scheduler's current
    timestep and T its number of training timesteps; on flow-matching models
    (timesteps 1000 * sigma) that is 1 - sigma. A run that starts part-way through
    the schedule then sees only the part of the K-LoRA schedule that matches its noise.
    """

    def __init__(self, pipeline, family: Family, mode: str, fallback):
        self.pipeline, self.family, self.mode, self.fallback = pipeline, family, mode, fallback
        self._timesteps = None
        self._values: list[float] = []
        self._begin = 0
        self._last = -1
        self.steps_taken = 0  # scheduler.step calls seen, for schedulers that keep no step index
        self._first = None  # (index, steps_taken) at the first call of this generation
        self._counters: list[_CountingStep] = []

    def __call__(self, module, args, kwargs):
        scheduler = getattr(self.pipeline, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return self.fallback(module, args, kwargs)
        new = timesteps is not self._timesteps
        if new:  # one host copy per generation; none per step or layer
            self._values = [float(t) for t in timesteps.detach().float().cpu()]
        index = getattr(scheduler, "step_index", None)
        if index is None and not hasattr(scheduler, "step_index"):
            index = self._counted(scheduler, new, module, args, kwargs)
        elif index is None:  # before the scheduler's first step
            begin = getattr(scheduler, "begin_index", None)
            index = begin if begin is not None else self._lookup(module, args, kwargs)
        index = max(0, min(int(index), len(self._values) - 1))
        if not new and index < self._last:
            new = True  # the same schedule run again from its start
        if new:
            begin = getattr(scheduler, "begin_index", None)
            self._begin = begin if begin is not None and begin <= index else index
        self._timesteps, self._last = timesteps, index
        total = len(self._values) - self._begin
        step = max(0, min(index - self._begin, total - 1))
        if self.mode == "noise":
            train = float(getattr(getattr(scheduler, "config", None), "num_train_timesteps", None) or 1000)
            progress = min(max(1.0 - self._values[index] / train, 0.0), 1.0 - 1e-9)
        else:
            progress = step / total
        return new, step, total, progress

    def schedule(self) -> list[float]:
        """The progress of every step of the current generation."""
        if self.mode == "noise":
            train = float(getattr(self.pipeline.scheduler.config, "num_train_timesteps", None) or 1000)
            return [min(max(1.0 - t / train, 0.0), 1.0 - 1e-9) for t in self._values[self._begin:]]
        total = len(self._values) - self._begin
        return [step / total for step in range(total)]

    def _counted(self, scheduler, new, module, args, kwargs) -> int:
        """Schedulers that keep no step index (DDIM, PNDM, DDPM): the index of the first step is
        looked up once per generation, then the scheduler's own step() calls are counted, so no
        step reads a timestep off the GPU (a device sync that stalls the pipeline)."""
        if not any(counter.scheduler is scheduler for counter in self._counters):
            self._counters.append(_CountingStep(self, scheduler))
        if new or self._first is None:
            self._first = (self._lookup(module, args, kwargs), self.steps_taken)
        first, taken = self._first
        return first + self.steps_taken - taken

    def release(self) -> None:
        """Give the schedulers their own step() back."""
        for counter in self._counters:
            counter.remove()
        self._counters = []

    def _lookup(self, module, args, kwargs) -> int:
        """Index of the current timestep, read off the timestep itself (once per generation)."""
        value = getattr(self.pipeline, "_current_timestep", None)
        value = _timestep_value(value) if value is not None else None
        if value is None:
            value = _timestep_value(_timestep_argument(module, args, kwargs))
            if value is None:
                return max(self._last, 0)
            value *= self.family.timestep_unit
            if self.family.timestep_reversed:
                value = 1000.0 - value
        distances = [abs(t - value) for t in self._values]
        return distances.index(min(distances))


class _CountingStep:
    """Stands in for ``scheduler.step`` (an instance attribute over the class method) and counts
    the calls. A plain object, not a closure, so a deep copy of the pipeline steps its own copy."""

    def __init__(self, progress: _SchedulerProgress, scheduler):
        import inspect

        self.progress, self.scheduler = progress, scheduler
        self._before = scheduler.__dict__.get("step")  # another wrapper already there, if any
        # Pipelines read step()'s signature to decide whether to pass eta and generator.
        self.__signature__ = inspect.signature(scheduler.step)
        scheduler.step = self

    def __call__(self, *args, **kwargs):
        self.progress.steps_taken += 1
        step = self._before if self._before is not None else type(self.scheduler).step.__get__(self.scheduler)
        return step(*args, **kwargs)

    def remove(self) -> None:
        if self.scheduler.__dict__.get("step") is self:
            if self._before is None:
                del self.scheduler.step
            else:
                self.scheduler.step = self._before


class _TimestepProgress:
    """Without a scheduler: count distinct timesteps; a noisier one starts over."""

    def __init__(self, num_inference_steps: int, family: Family, mode: str):
        self.total = int(num_inference_steps)
        self.family, self.mode = family, mode
        self._last = None
        self._step = 0
        self._warned = False

    def __call__(self, module, args, kwargs):
        value = _timestep_value(_timestep_argument(module, args, kwargs))
        if value is not None and self.family.timestep_reversed:
            value = -value  # Z-Image: the timestep it is handed grows as the noise falls
        new = self._last is None or (value is not None and value > self._last)
        if new:
            self._step = 0
        elif value is not None and value < self._last:
            self._step += 1
        if value is not None:
            self._last = value
        if self._step >= self.total and not self._warned:
            warnings.warn(f"the denoiser ran more than num_inference_steps={self.total} steps; "
                          "K-LoRA keeps the last step's choice (pass the pipeline for exact progress)")
            self._warned = True
        step = min(self._step, self.total - 1)
        progress = step / self.total
        if self.mode == "noise" and value is not None:
            raw = abs(value) * self.family.timestep_unit
            t = 1000.0 - raw if self.family.timestep_reversed else raw
            progress = min(max(1.0 - t / 1000.0, 0.0), 1.0 - 1e-9)
        return new, step, self.total, progress

    def schedule(self) -> list[float]:
        return [step / self.total for step in range(self.total)] if self.mode == "steps" else []

    def release(self) -> None:
        pass


def _progress_source(pipeline, family, num_inference_steps, mode):
    if num_inference_steps is not None and int(num_inference_steps) < 1:
        raise KLoRAError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    fallback = _TimestepProgress(num_inference_steps or 50, family, mode)
    if pipeline is None:
        return fallback
    return _SchedulerProgress(pipeline, family, mode, fallback)
