"""Attach K-LoRA to any diffusers pipeline (or a bare denoiser) and choose per step.

Before every call of a denoiser a forward pre-hook works out the step progress
from the pipeline's own scheduler and makes every layer that both LoRAs adapt
apply the one LoRA that ``klora.rule`` picks for that step. The choice is made
before the forward on purpose: several denoisers rescale the *active* adapters
inside their forward (``cross_attention_kwargs["scale"]``) and undo it afterwards.

Two ways to apply the choice (``switching``):
- ``"fused"`` (default): each layer's weight holds ``W0 + delta`` of the chosen
  LoRA, so a step costs what the base model costs. A switch rewrites the weight
  from an exact copy of ``W0`` (never by subtracting the old delta, which drifts
  in half precision), in place, so compiled graphs see it without recompiling.
- ``"adapters"``: both LoRAs stay PEFT adapters and ``set_adapter`` picks one;
  works where weights cannot be written (sequential CPU offload, quantized models).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch

from . import loras, rule
from .errors import KLoRAError, LoRAError
from .pipelines import Family, check_supported, denoisers_of, family_of

METHODS = ("klora", "merge", "content", "style")
ROLES = ("content", "style")
ADAPTER_NAMES = {"content": "klora_content", "style": "klora_style"}
SWITCHING = ("fused", "adapters")
PROGRESS = ("steps", "noise")
_NOTHING, _CONTENT, _STYLE, _BOTH = frozenset(), frozenset({"content"}), frozenset({"style"}), frozenset(ROLES)


@dataclass
class _Generation:
    num_inference_steps: int
    steps: list  # (step, progress, scale, component, tuple of bools for that component: True = content)


@dataclass
class _Layer:
    """One adapted layer of one denoiser."""

    key: str  # its name in the selection log: the module path, or "<component>.<path>" with two denoisers
    component: str
    path: str
    roles: frozenset  # which LoRAs adapt it
    klora_roles: frozenset  # what it applies under "klora" where K-LoRA does not choose per step
    chosen: bool = False  # K-LoRA chooses here per step


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
    every denoiser. ``progress``: "steps" (p = step / steps, the paper's) or "noise"
    (p = 1 - t / T from the scheduler's current timestep; see ``_SchedulerProgress``).
    ``compile``: True or a dict of ``torch.compile`` options; compiles the
    denoiser's repeated blocks (the per-step control stays outside the graph).
    """

    def __init__(self, target, content, style, *, content_2=None, style_2=None, content_weight_name=None,
                 style_weight_name=None, content_2_weight_name=None, style_2_weight_name=None,
                 pattern="s*", alpha=rule.DEFAULT_ALPHA, beta=None, method="klora", progress="steps",
                 switching="fused", compile=False, num_inference_steps=None, text_encoder_lora=False,
                 max_logged_generations=64):
        self.pipeline, self.family, self.denoisers = resolve_target(target)
        if self.pipeline is not None:
            check_supported(self.family, type(self.pipeline).__name__)
        self.pattern, self.alpha, self.beta = pattern, alpha, beta
        self.set_schedule(pattern, alpha, beta)
        for name, value, allowed in (("method", method, METHODS), ("progress", progress, PROGRESS),
                                     ("switching", switching, SWITCHING)):
            if value not in allowed:
                raise KLoRAError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        for component, denoiser in self.denoisers.items():
            existing = getattr(denoiser, "peft_config", {}) or {}
            if any(name in existing for name in ADAPTER_NAMES.values()) or hasattr(denoiser, "_klora_attached"):
                raise KLoRAError("K-LoRA is already attached to this model; call detach() on it first")
        self.multi = len(self.denoisers) > 1
        self.progress_mode = progress
        self._max_generations = max_logged_generations
        self.generations: list[_Generation] = []

        files = self._read_files(content, style, content_2, style_2, content_weight_name, style_weight_name,
                                 content_2_weight_name, style_2_weight_name)
        self.labels = {role: f.label for role, f in files.items()}
        self._adapters = self._convert(files)
        self.switching = self._choose_switching(switching)
        self._collect_layers()
        self._text_encoders = []
        loaded = []
        try:
            if self.switching == "adapters":
                self._switch = _AdapterSwitch(self, loaded)
            else:
                self._switch = _FusedSwitch(self)
            self._handle_text_encoders(text_encoder_lora)
        except BaseException:
            self._remove_text_encoder_adapters()
            if self.switching == "adapters":
                _AdapterSwitch.remove_names(self.denoisers, loaded)
            elif hasattr(self, "_switch"):
                self._switch.remove()
            raise
        del self._adapters  # the tensors now live in the adapters or the fused switch

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
                    content_2_weight_name, style_2_weight_name) -> dict:
        files = {"content": _as_lora_file(content, content_weight_name, "content LoRA"),
                 "style": _as_lora_file(style, style_weight_name, "style LoRA")}
        for role, source, weight_name in (("content", content_2, content_2_weight_name),
                                          ("style", style_2, style_2_weight_name)):
            if source is None:
                continue
            if not self.multi:
                raise _one_denoiser(f"{role}_2", self._model_name())
            files[f"{role}_2"] = _as_lora_file(source, weight_name, f"{role} LoRA (second expert)")
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
        return adapters

    def _choose_switching(self, switching: str) -> str:
        if switching == "adapters":
            return switching
        reason = None
        for component, denoiser in self.denoisers.items():
            reason = reason or _why_not_fused(denoiser, {r: self._adapters[component, r] for r in ROLES})
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
        self._shared: dict[str, list[_Layer]] = {}
        zero_sides = {"content": 0, "style": 0}
        for component, denoiser in self.denoisers.items():
            adapters = {role: self._adapters[component, role] for role in ROLES}
            device = _stats_device(denoiser)
            modules = {role: set(adapters[role].modules) for role in ROLES}
            shared, stats = [], []
            adapted = modules["content"] | modules["style"]
            with torch.no_grad():
                for path in (name for name, _ in denoiser.named_modules() if name in adapted):  # model order
                    key = f"{component}.{path}" if self.multi else path
                    roles = frozenset(role for role in ROLES if path in modules[role])
                    if roles == _BOTH:
                        layer_stats = _layer_stats(adapters, path, device)
                        zero = [role for role, total in zip(ROLES, (layer_stats.content_abs_sum,
                                                                   layer_stats.style_abs_sum)) if total == 0]
                        if not zero:
                            layer = _Layer(key, component, path, roles, roles, chosen=True)
                            shared.append(layer)
                            stats.append(layer_stats)
                            self.stats[key] = layer_stats
                            self.layers.append(layer)
                            continue
                        # An all-zero weight update never competes: the other LoRA is used there at every
                        # step (the zero side's bias, if it has one, still applies under its own method).
                        for role in zero:
                            zero_sides[role] += 1
                        used = _STYLE if zero == ["content"] else _CONTENT
                    else:
                        used = roles
                    self.only[key] = next(iter(used))
                    self.layers.append(_Layer(key, component, path, roles, used))
            self._shared[component] = shared
            self._gamma[component] = rule.gamma_from_ratios([s.ratio for s in stats])
            self._content_topk[component] = torch.tensor([s.content_topk_sum for s in stats], dtype=torch.float64)
            self._style_topk[component] = torch.tensor([s.style_topk_sum for s in stats], dtype=torch.float64)
        for role, count in zero_sides.items():
            if count:
                other = "style" if role == "content" else "content"
                warnings.warn(f"{count} layers both LoRAs adapt are all zero in the {self.labels[role]}: the "
                              f"{other} LoRA is used there at every step", stacklevel=4)
        if not any(layer.roles == _BOTH for layer in self.layers):
            warnings.warn("the content and style LoRAs adapt no layer in common: K-LoRA has nothing to "
                          "choose, each LoRA is applied on its own layers", stacklevel=4)

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
        carrying = [(role, adapter) for (component, role), adapter in self._adapters.items()
                    if adapter.text_encoder_state_dicts and component == next(iter(self.denoisers))]
        if not carrying:
            return
        if not apply:
            names = " and ".join(self.labels[role] for role, _ in carrying)
            warnings.warn(f"{names} also hold text-encoder weights; they are not applied "
                          "(text_encoder_lora=True / --text_encoder_lora applies them)", stacklevel=4)
            return
        if self.pipeline is None or not hasattr(self.pipeline, "load_lora_into_text_encoder"):
            raise KLoRAError("text-encoder LoRA weights need a pipeline whose LoRA loader handles text encoders")
        done = self._text_encoders
        for role, adapter in carrying:
            for te_name, part in adapter.text_encoder_state_dicts.items():
                encoder = getattr(self.pipeline, te_name, None)
                if encoder is None:
                    raise LoRAError(f"{self.labels[role]}: has '{te_name}' weights but the pipeline has no {te_name}")
                prefixed = {f"{te_name}.{k}": v for k, v in part.items()}
                alphas = {k: v for k, v in (adapter.text_encoder_alphas or {}).items() if k.startswith(te_name + ".")}
                try:
                    with loras.quiet_libraries():
                        self.pipeline.load_lora_into_text_encoder(
                            prefixed, network_alphas=alphas or None, text_encoder=encoder, prefix=te_name,
                            adapter_name=ADAPTER_NAMES[role], _pipeline=self.pipeline)
                except Exception as exc:
                    done.append((encoder, ADAPTER_NAMES[role]))  # removed again by the caller
                    raise LoRAError(f"{self.labels[role]}: its {te_name} weights could not be loaded "
                                    f"({type(exc).__name__}: {loras._short(exc)})") from None
                done.append((encoder, ADAPTER_NAMES[role]))
        from peft.tuners.tuners_utils import BaseTunerLayer

        for encoder in {id(e): e for e, _ in done}.values():
            names = [n for e, n in done if e is encoder]
            for module in encoder.modules():
                if isinstance(module, BaseTunerLayer):
                    module.set_adapter([n for n in names if n in module.lora_A], inference_mode=True)

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
        """Change pattern / alpha / beta; beta=None takes the pattern's default."""
        pattern = self.pattern if pattern is None else pattern
        if pattern not in rule.PATTERNS:
            raise KLoRAError(f"pattern must be one of {', '.join(rule.PATTERNS)}, got {pattern!r}")
        alpha = rule.DEFAULT_ALPHA if alpha is None else float(alpha)
        if not (alpha > 0 and alpha < float("inf")):
            raise KLoRAError(f"alpha must be a positive number, got {alpha}")
        beta = rule.default_beta(pattern, alpha) if beta is None else float(beta)
        if beta != beta or abs(beta) == float("inf"):
            raise KLoRAError(f"beta must be a finite number, got {beta}")
        self.pattern, self.alpha, self.beta = pattern, alpha, beta
        self._plan = None  # re-plan on the next call

    def set_method(self, method: str) -> None:
        """klora (the rule), merge (both LoRAs everywhere), content or style (one LoRA only)."""
        if method not in METHODS:
            raise KLoRAError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.method = method
        wanted = {}
        for layer in self.layers:
            if method in ("content", "style"):
                wanted[layer.key] = layer.roles & {method}
            elif method == "merge":
                wanted[layer.key] = layer.roles
            elif not layer.chosen:
                wanted[layer.key] = layer.klora_roles
        self._show(wanted)
        self._mask = {component: None for component in self.denoisers}
        if method == "klora":  # until the first step: the choice at p = 0
            for component in self.denoisers:
                self._apply_mask(component, self._mask_at(component, 0.0))
        self._plan = None

    def scale_at(self, progress: float) -> float:
        return rule.scale_at(progress, self.pattern, self.alpha, self.beta)

    def choices_at(self, progress: float) -> dict[str, str]:
        """Which LoRA each shared layer uses at ``progress`` in [0, 1)."""
        chosen = {}
        for component, layers in self._shared.items():
            mask = self._mask_at(component, progress)
            chosen.update({layer.key: ("content" if c else "style") for layer, c in zip(layers, mask)})
        return chosen

    def _mask_at(self, component: str, progress: float) -> tuple:
        return tuple(rule.content_mask(self._content_topk[component], self._style_topk[component],
                                       self._gamma[component], self.scale_at(progress)).tolist())

    # --- per step ----------------------------------------------------------

    def _hook_for(self, component: str):
        def before_forward(module, args, kwargs):
            self._before_forward(component, module, args, kwargs)
            return None

        return before_forward

    def _before_forward(self, component, module, args, kwargs) -> None:
        if self.switching == "fused":
            self._follow_lora_scale(kwargs)
        if self.method != "klora":
            return
        new_generation, step, total, progress = self._progress(module, args, kwargs)
        if new_generation or self._plan is None:
            if new_generation:
                self.generations.append(_Generation(num_inference_steps=total, steps=[]))
                del self.generations[:-self._max_generations]
                self._switch.prepare()
            self._plan = {"masks": {}, "canonical": {}, "logged": set()}
            for value in self._progress.schedule():  # every step's choice, worked out once per generation
                for c in self.denoisers:
                    self._planned_mask(c, value)
        mask = self._planned_mask(component, progress)
        if mask is not self._mask[component]:
            self._apply_mask(component, mask)
        if (step, component) not in self._plan["logged"] and self.generations:
            self._plan["logged"].add((step, component))
            self.generations[-1].steps.append((step, progress, self.scale_at(progress), component, mask))

    def _follow_lora_scale(self, kwargs) -> None:
        """Fused weights hold the deltas, so the pipeline's LoRA scale (which PEFT adapters would apply
        in the forward) is folded into them: a changed scale rewrites every adapted layer."""
        scale = 1.0
        for name in ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs"):
            extra = kwargs.get(name)
            if isinstance(extra, dict) and extra.get("scale") is not None:
                scale = float(extra["scale"])
                break
        if scale != self._switch.lora_scale:
            self._switch.lora_scale = scale
            self._switch.show([(layer, roles) for layer in self.layers
                               if (roles := self._state[layer.key]) is not None])

    def _planned_mask(self, component: str, progress: float) -> tuple:
        """The choice at ``progress``; steps with the same choice share one object, so a step
        that changes nothing costs one identity check."""
        masks = self._plan["masks"]
        mask = masks.get((component, progress))
        if mask is None:
            mask = self._mask_at(component, progress)
            mask = masks[(component, progress)] = self._plan["canonical"].setdefault((component, mask), mask)
        return mask

    def _apply_mask(self, component: str, mask: tuple) -> None:
        self._mask[component] = mask
        self._show({layer.key: (_CONTENT if use_content else _STYLE)
                    for layer, use_content in zip(self._shared[component], mask)})

    def _show(self, wanted: dict) -> None:
        """Make each layer in ``wanted`` apply exactly the LoRAs named there."""
        changes = [(layer, wanted[layer.key]) for layer in self.layers
                   if layer.key in wanted and self._state[layer.key] != wanted[layer.key]]
        if changes:
            self._switch.show(changes)
            for layer, roles in changes:
                self._state[layer.key] = roles

    # --- reporting ---------------------------------------------------------

    def selection_log(self) -> dict:
        """Everything needed to audit the choices, as plain JSON-able data."""
        log = {
            "pattern": self.pattern, "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
            "method": self.method, "progress": self.progress_mode, "switching": self.switching,
        }
        log.update(self.labels)
        if self.multi:
            log["denoisers"] = list(self.denoisers)
        log["layers"] = {key: {"k": s.k, "content_topk_sum": s.content_topk_sum,
                               "style_topk_sum": s.style_topk_sum} for key, s in self.stats.items()}
        log["only"] = dict(self.only)
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
        _atomic_write_text(path, json.dumps(self.selection_log(), indent=1))

    def memory(self) -> dict[str, int]:
        """Bytes of exact weight copies fused switching keeps, by device ({} with adapters)."""
        return self._switch.memory()

    # --- removal -----------------------------------------------------------

    def detach(self) -> None:
        """Remove the hooks and both LoRAs; every weight is exactly as before."""
        if getattr(self, "_detached", True):
            return
        for hook in self._hooks:
            hook.remove()
        self._progress.release()
        self._switch.remove()
        self._remove_text_encoder_adapters()
        for component, denoiser in self.denoisers.items():
            if hasattr(denoiser, "_klora_attached"):
                del denoiser._klora_attached
            if self._compiled:
                for name, parameter in denoiser.named_parameters():
                    parameter.requires_grad_(self._requires_grad.get((component, name), parameter.requires_grad))
        self._detached = True

    def _remove_text_encoder_adapters(self) -> None:
        for encoder, _ in self._text_encoders:
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
                f"shared_layers={len(self.paths)}, single_lora_layers={len(self.only)})")


def attach(target, content, style, **kwargs) -> KLoRA:
    """Attach K-LoRA to a pipeline or denoiser; ``detach()`` the result to remove it."""
    return KLoRA(target, content, style, **kwargs)


def check_loras(name_or_path, files: dict[str, loras.LoRAFile]) -> list[str]:
    """Check LoRA files against a model before its weights are loaded: the model's denoisers are
    built on the meta device from their configs. ``files``: {"content": ..., "style": ...,
    "content_2"?: ..., "style_2"?: ...}. Raises ``LoRAError``; returns the warning lines
    ``KLoRA`` will give. Does nothing when the configs cannot be read (the load reports that)."""
    from .pipelines import empty_denoisers, family_for_model

    family, _ = family_for_model(name_or_path)
    denoisers = empty_denoisers(name_or_path, family)
    if not denoisers:
        return []
    for key in files:
        if key.endswith("_2") and len(denoisers) < 2:
            raise _one_denoiser(key, f"{family.name} '{name_or_path}'")
    return _convert_all(family, denoisers, files)[1]


def _one_denoiser(key: str, model: str) -> KLoRAError:
    return KLoRAError(f"a {key} LoRA was given, but {model} has one denoiser; the _2 LoRAs are for the second "
                      "(low-noise) expert of two-expert models such as Wan 2.2 A14B")


def _files_for(components: list[str], component: str, files) -> dict[str, str]:
    """{role: file key} used for ``component``: the ``_2`` files go to the second denoiser."""
    second = len(components) > 1 and component == components[1]
    return {role: (f"{role}_2" if second and f"{role}_2" in files else role) for role in ROLES}


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


# --- applying a choice: PEFT adapters or fused weights ---------------------------

class _AdapterSwitch:
    """Both LoRAs as PEFT adapters; a layer applies the adapters set active on it."""

    def __init__(self, klora: KLoRA, loaded: list):
        self.denoisers = klora.denoisers
        self._had_adapters = {c: bool(getattr(d, "peft_config", {}) or {}) for c, d in self.denoisers.items()}
        from diffusers import DiffusionPipeline

        pipeline = klora.pipeline if isinstance(klora.pipeline, DiffusionPipeline) else None  # offload handling
        for component, denoiser in self.denoisers.items():
            for role in ROLES:
                key = klora.files_for(component)[role]
                loras.load_adapter(denoiser, klora._adapters[component, role], ADAPTER_NAMES[role],
                                   klora.labels[key], pipeline=pipeline)
                loaded.append((component, ADAPTER_NAMES[role]))
        by_component = {c: dict(d.named_modules()) for c, d in self.denoisers.items()}
        self._modules = {layer.key: by_component[layer.component][layer.path] for layer in klora.layers}

    def prepare(self) -> None:
        pass

    def show(self, changes) -> None:
        for layer, roles in changes:
            self._modules[layer.key].set_adapter([ADAPTER_NAMES[r] for r in ROLES if r in roles],
                                                 inference_mode=True)

    def memory(self) -> dict:
        return {}

    def remove(self) -> None:
        for component, denoiser in self.denoisers.items():
            if not self._had_adapters[component]:
                denoiser.unload_lora()  # unwraps every LoRA layer: the original modules come back
            else:
                denoiser.delete_adapters(list(ADAPTER_NAMES.values()))

    @staticmethod
    def remove_names(denoisers, loaded) -> None:
        for component, name in loaded:
            if name in getattr(denoisers[component], "peft_config", {}):
                denoisers[component].delete_adapters(name)


class _FusedSwitch:
    """Each layer's weight is ``W0 + sum of the applied LoRAs' deltas``, rewritten in place from ``W0``.

    Layers both LoRAs adapt keep ``W0`` on the weight's device when it fits (else on
    the host): they switch during a generation. Layers one LoRA adapts are merged
    once; their ``W0`` waits on the host for ``detach`` and method changes.
    """

    def __init__(self, klora: KLoRA):
        self._entries: dict[str, _Entry] = {}
        self._bytes = {}
        self.lora_scale = 1.0  # the pipeline's LoRA scale (cross_attention_kwargs["scale"] and the like)
        shared_keys = set(klora.paths)
        modules = {c: dict(d.named_modules()) for c, d in klora.denoisers.items()}
        for layer in klora.layers:
            module = modules[layer.component][layer.path]
            module = getattr(module, "base_layer", module)
            weight = _storage(module, "weight")
            switching = layer.key in shared_keys
            home = _backup_device(weight, switching)
            factors = {}
            for role in layer.roles:
                adapter = klora._adapters[layer.component, role]
                A = adapter.state_dict[f"{layer.path}.lora_A.weight"]
                B = adapter.state_dict[f"{layer.path}.lora_B.weight"]
                bias = adapter.state_dict.get(f"{layer.path}.lora_B.bias")
                to = dict(device=home, dtype=weight.dtype)
                factors[role] = (A.flatten(1).to(**to).contiguous(), B.flatten(1).to(**to).contiguous(),
                                 float(adapter.scales[layer.path]), None if bias is None else bias.to(**to))
            with torch.no_grad():
                backup = weight.detach().to(home, copy=True)
                if home.type == "cpu" and weight.device.type == "cuda":
                    backup = backup.pin_memory()
                bias_backup = None
                if any(f[3] is not None for f in factors.values()):
                    bias_backup = _storage(module, "bias").detach().to(home, copy=True)
            self._entries[layer.key] = _Entry(module, backup, bias_backup, factors, switching)
            size = backup.numel() * backup.element_size()
            self._bytes[str(home)] = self._bytes.get(str(home), 0) + size

    def prepare(self) -> None:
        """Before a generation: move copies next to weights that moved to a GPU after attaching."""
        for entry in self._entries.values():
            device = _storage(entry.module, "weight").device
            if entry.backup.device == device or device.type != "cuda" or entry.backup.device.type != "cpu":
                continue
            if entry.switching and _fits_on(device, entry.backup.numel() * entry.backup.element_size()):
                entry.move_to(device)

    def show(self, changes) -> None:
        entries, lora_scale = self._entries, self.lora_scale
        with torch.no_grad():
            for layer, roles in changes:
                entries[layer.key].write(roles, lora_scale)

    def memory(self) -> dict:
        return dict(self._bytes)

    def remove(self) -> None:
        with torch.no_grad():
            for entry in self._entries.values():
                _storage(entry.module, "weight").copy_(entry.backup)
                if entry.bias_backup is not None:
                    _storage(entry.module, "bias").copy_(entry.bias_backup)
        self._entries = {}


class _Entry:
    """One layer under fused switching: its module, an exact copy of W0, the LoRA factors, and
    views bound to wherever the weight lives now, so a switch is one ``addmm`` and no Python
    bookkeeping per layer (rebound only when the weight moved: ``pipe.to``, CPU offload)."""

    __slots__ = ("module", "backup", "bias_backup", "factors", "switching", "_ptr", "_out", "_base", "_live")

    def __init__(self, module, backup, bias_backup, factors, switching):
        self.module, self.backup, self.bias_backup = module, backup, bias_backup
        self.factors, self.switching = factors, switching
        self._ptr = None

    def move_to(self, device) -> None:
        self.backup = self.backup.to(device)
        self.bias_backup = None if self.bias_backup is None else self.bias_backup.to(device)
        self.factors = {role: tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in f)
                        for role, f in self.factors.items()}
        self._ptr = None

    def _bind(self, weight) -> None:
        device = weight.device

        def here(t):
            return t if t is None or t.device == device else t.to(device, non_blocking=True)

        self._out = weight.view(weight.shape[0], -1)
        # W0 kept on the host (no room on the GPU) is sent over at each write, never kept here.
        self._base = self.backup.view(self._out.shape) if self.backup.device == device else None
        self._live = {role: (here(A), here(B), scale, here(bias)) for role, (A, B, scale, bias) in self.factors.items()}
        self._ptr = (weight.data_ptr(), device)

    def write(self, roles, lora_scale: float) -> None:
        """weight <- W0 + sum(scale * B @ A) over ``roles``, without reading the weight's old value."""
        weight = self.module._parameters["weight"]
        if weight.is_meta:  # sequential CPU offload: write the host copy the offload hook loads from
            weight = _storage(self.module, "weight")
        if self._ptr != (weight.data_ptr(), weight.device):
            self._bind(weight)
        out = self._out
        base = self._base if self._base is not None else self.backup.to(out.device, non_blocking=True).view(out.shape)
        if len(roles) == 1:
            (role,) = roles
            A, B, scale, _ = self._live[role]
            torch.addmm(base, B, A, alpha=scale * lora_scale, out=out)  # one rounding, in the weight's dtype
        elif not roles:
            out.copy_(base)
        else:  # both LoRAs (the "merge" method): sum in float32, round once
            total = base.to(torch.float32, copy=True)  # never .float(): a no-op on float32, it would add into W0
            for role in sorted(roles):
                A, B, scale, _ = self._live[role]
                total.addmm_(B.float(), A.float(), alpha=scale * lora_scale)
            out.copy_(total)
        if self.bias_backup is not None:
            bias = _storage(self.module, "bias")
            new_bias = self.bias_backup.to(bias.device, torch.float32, copy=True)
            for role in roles:
                lora_bias = self._live[role][3]
                if lora_bias is not None:
                    new_bias.add_(lora_bias.float(), alpha=self._live[role][2] * lora_scale)
            bias.copy_(new_bias)


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
    """Why weights of ``denoiser`` cannot be rewritten in place, or None when they can."""
    modules = dict(denoiser.named_modules())
    for path in sorted(set(adapters["content"].modules) | set(adapters["style"].modules)):
        module = modules[path]
        module = getattr(module, "base_layer", module)
        weight = getattr(module, "weight", None)
        if weight is not None and weight.device.type == "meta":
            try:
                weight = _storage(module, "weight")
            except KLoRAError:
                return "weights on the meta device with no offloaded copy"
        if weight is None:
            return f"layer '{path}' has no weight"
        if not weight.is_contiguous():
            return f"layer '{path}' has weights that are not one contiguous block of memory"
        if type(module) not in (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d) \
                or type(weight) not in (torch.nn.Parameter, torch.Tensor) or not weight.is_floating_point() \
                or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"layer '{path}' is {type(module).__name__} with {weight.dtype} weights, e.g. a quantized model"
        if any(f"{path}.lora_B.bias" in a.state_dict for a in adapters.values()) and module.bias is None:
            return f"a LoRA has a bias for layer '{path}', which has none"
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
                                 text_encoder_alphas=adapter.text_encoder_alphas, scales=dict(adapter.scales))


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


def _layer_stats(adapters, path: str, device) -> rule.LayerStats:
    """The rule's statistics of one layer, one dense |dW| in memory at a time (a FLUX.2 or Wan
    layer's update is a gigabyte in float32)."""
    ranks = [adapters[role].state_dict[f"{path}.lora_A.weight"].shape[0] for role in ROLES]
    k = ranks[0] * ranks[1]
    sums = []
    for role in ROLES:
        magnitudes = _delta_from_adapter(adapters[role], path, device).abs_()
        sums.append(rule.magnitude_sums(magnitudes, k))
        del magnitudes
    (content_topk, content_sum), (style_topk, style_sum) = sums
    return rule.LayerStats(k=k, content_topk_sum=content_topk, style_topk_sum=style_topk,
                           content_abs_sum=content_sum, style_abs_sum=style_sum)


def _delta_from_adapter(adapter, path: str, device) -> torch.Tensor:
    """``scale * B @ A`` of one layer (convolution factors flattened), in float32."""
    A = adapter.state_dict[f"{path}.lora_A.weight"]
    B = adapter.state_dict[f"{path}.lora_B.weight"]
    return rule.dense_delta(A.flatten(1).to(device), B.flatten(1).to(device), adapter.scales[path])


def _atomic_write_text(path, text: str) -> None:
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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
