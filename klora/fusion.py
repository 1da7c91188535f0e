"""Attach K-LoRA to a pipeline (or a bare denoiser) and choose per step.

Both LoRAs are loaded as PEFT adapters ("klora_content", "klora_style") on the
same layers. Before every call of the denoiser a forward pre-hook works out the
step progress from the pipeline's own scheduler and activates, in each layer
both LoRAs adapt, the adapter that ``klora.rule`` picks. The choice is made
before the forward on purpose: the UNet/FLUX forward rescales the *active*
adapters for ``cross_attention_kwargs["scale"]`` and undoes it afterwards.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from dataclasses import dataclass

import torch

from . import loras, rule
from .errors import KLoRAError
from .loras import LoRAError

METHODS = ("klora", "merge", "content", "style")
ROLES = ("content", "style")
ADAPTER_NAMES = {"content": "klora_content", "style": "klora_style"}


@dataclass
class _Generation:
    num_inference_steps: int
    steps: list  # (step, progress, scale, tuple of bools: True = content)


class KLoRA:
    """K-LoRA fusion of a content and a style LoRA on one pipeline or denoiser.

    ``target`` is a diffusers pipeline with a ``unet`` (SD 1.x/2.x/XL) or a
    ``transformer`` (FLUX), or that denoiser itself. With a pipeline, progress
    is ``step / steps`` of the pipeline's scheduler, exact for any step count.
    A bare denoiser has no scheduler to ask: the step is counted from the
    distinct timesteps it is called with (a larger timestep starts a new
    generation) and divided by ``num_inference_steps``.
    """

    def __init__(self, target, content, style, *, content_weight_name=None, style_weight_name=None,
                 pattern="s*", alpha=rule.DEFAULT_ALPHA, beta=None, method="klora",
                 num_inference_steps=None, text_encoder_lora=False, max_logged_generations=64):
        self.pipeline, self.denoiser = split_target(target)
        self.family = loras.family_of(self.denoiser)
        self.pattern, self.alpha, self.beta = pattern, alpha, beta
        self.set_schedule(pattern, alpha, beta)
        if method not in METHODS:
            raise KLoRAError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        existing = getattr(self.denoiser, "peft_config", {}) or {}
        if any(name in existing for name in ADAPTER_NAMES.values()):
            raise KLoRAError("K-LoRA is already attached to this model; call detach() on it first")
        self._had_adapters = bool(existing)
        self._max_generations = max_logged_generations
        self.generations: list[_Generation] = []

        files = {"content": _as_lora_file(content, content_weight_name, "content LoRA"),
                 "style": _as_lora_file(style, style_weight_name, "style LoRA")}
        self.labels = {role: f.label for role, f in files.items()}
        adapters = {role: loras.to_denoiser_adapter(f, self.denoiser) for role, f in files.items()}
        for role in ROLES:
            loras.check_fits(adapters[role], self.denoiser, files[role].label)
        loaded = []
        try:
            for role in ROLES:
                loras.load_adapter(self.denoiser, adapters[role], ADAPTER_NAMES[role], files[role].label,
                                   pipeline=self.pipeline)
                loaded.append(ADAPTER_NAMES[role])
            self._text_encoders = self._handle_text_encoders(adapters, files, text_encoder_lora)
        except BaseException:
            self._remove_adapters(loaded)
            raise

        self._collect_layers(adapters)
        self._progress = _progress_source(self.pipeline, self.denoiser, self.family, num_inference_steps)
        self._signature = inspect.signature(self.denoiser.forward)
        self._hook = self.denoiser.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._detached = False
        self._active_mask: list[bool] | None = None
        self._current_step = None
        self.method = None
        self.set_method(method)

    # --- setup -------------------------------------------------------------

    def _collect_layers(self, adapters) -> None:
        from peft.tuners.lora import LoraLayer

        self.paths: list[str] = []  # layers both LoRAs adapt: K-LoRA chooses here
        self._layers = []
        self.only: dict[str, str] = {}  # layers one LoRA adapts: that one, always
        self._only_layers = []
        for path, module in self.denoiser.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            has = {role: ADAPTER_NAMES[role] in module.lora_A for role in ROLES}
            if has["content"] and has["style"]:
                self.paths.append(path)
                self._layers.append(module)
            elif has["content"] or has["style"]:
                role = "content" if has["content"] else "style"
                self.only[path] = role
                self._only_layers.append((module, role))
        if not self.paths:
            warnings.warn("the content and style LoRAs adapt no layer in common: K-LoRA has nothing to "
                          "choose, each LoRA is applied on its own layers", stacklevel=3)
        # Statistics come from the LoRA tensors as read from the files (not the layers, which
        # may sit on the meta device under sequential offload), on a GPU when there is one.
        device = _stats_device(self.denoiser)
        stats = []
        with torch.no_grad():
            for path, module in zip(self.paths, self._layers):
                deltas = [_delta_from_adapter(adapters[role], path, device) for role in ROLES]
                if any(d is None for d in deltas):  # a non-linear (conv) layer: ask PEFT
                    deltas = [_delta(module, ADAPTER_NAMES[role]) for role in ROLES]
                ranks = [module.r[ADAPTER_NAMES[role]] for role in ROLES]
                stats.append(rule.layer_stats(deltas[0], deltas[1], ranks[0], ranks[1]))
                del deltas
        self.stats: dict[str, rule.LayerStats] = dict(zip(self.paths, stats))
        self.gamma = rule.gamma_from_ratios([s.ratio for s in stats])
        self._content_topk = torch.tensor([s.content_topk_sum for s in stats], dtype=torch.float64)
        self._style_topk = torch.tensor([s.style_topk_sum for s in stats], dtype=torch.float64)

    def _handle_text_encoders(self, adapters, files, apply: bool) -> list:
        carrying = [role for role in ROLES if adapters[role].text_encoder_state_dicts]
        if not carrying:
            return []
        if not apply:
            names = " and ".join(files[role].label for role in carrying)
            warnings.warn(f"{names} also hold text-encoder weights; they are not applied "
                          "(text_encoder_lora=True / --text_encoder_lora applies them)", stacklevel=4)
            return []
        if self.pipeline is None:
            raise KLoRAError("text-encoder LoRA weights need the pipeline, not only its denoiser")
        done = []
        for role in carrying:
            for te_name, part in adapters[role].text_encoder_state_dicts.items():
                encoder = getattr(self.pipeline, te_name, None)
                if encoder is None:
                    raise LoRAError(f"{files[role].label}: has '{te_name}' weights but the pipeline has no {te_name}")
                prefixed = {f"{te_name}.{k}": v for k, v in part.items()}
                alphas = {k: v for k, v in (adapters[role].text_encoder_alphas or {}).items()
                          if k.startswith(te_name + ".")}
                self.pipeline.load_lora_into_text_encoder(
                    prefixed, network_alphas=alphas or None, text_encoder=encoder, prefix=te_name,
                    adapter_name=ADAPTER_NAMES[role], _pipeline=self.pipeline)
                done.append((encoder, ADAPTER_NAMES[role]))
        from peft.tuners.tuners_utils import BaseTunerLayer

        for encoder in {id(e): e for e, _ in done}.values():
            names = [n for e, n in done if e is encoder]
            for module in encoder.modules():
                if isinstance(module, BaseTunerLayer):
                    module.set_adapter([n for n in names if n in module.lora_A], inference_mode=True)
        return done

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
        self._current_step = None  # re-decide on the next call

    def set_method(self, method: str) -> None:
        """klora (the rule), merge (both LoRAs everywhere), content or style (one LoRA only)."""
        if method not in METHODS:
            raise KLoRAError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.method = method
        for module, role in self._only_layers:
            on = method in ("klora", "merge", role)
            module.set_adapter([ADAPTER_NAMES[role]] if on else [], inference_mode=True)
        if method == "klora":
            self._active_mask = None
            self._apply(rule.content_mask(self._content_topk, self._style_topk, self.gamma,
                                          self.scale_at(0.0)).tolist())
        else:
            names = {"merge": list(ADAPTER_NAMES.values()), "content": [ADAPTER_NAMES["content"]],
                     "style": [ADAPTER_NAMES["style"]]}[method]
            for module in self._layers:
                module.set_adapter(names, inference_mode=True)
            self._active_mask = None
        self._current_step = None

    def scale_at(self, progress: float) -> float:
        return rule.scale_at(progress, self.pattern, self.alpha, self.beta)

    def choices_at(self, progress: float) -> dict[str, str]:
        """Which LoRA each shared layer uses at ``progress`` in [0, 1)."""
        mask = rule.content_mask(self._content_topk, self._style_topk, self.gamma, self.scale_at(progress))
        return {path: ("content" if c else "style") for path, c in zip(self.paths, mask.tolist())}

    # --- per step ----------------------------------------------------------

    def _before_forward(self, module, args, kwargs):
        if self.method != "klora":
            return None
        timestep = self._signature.bind_partial(*args, **kwargs).arguments.get("timestep")
        new_generation, step, total = self._progress(timestep)
        if new_generation:
            self.generations.append(_Generation(num_inference_steps=total, steps=[]))
            del self.generations[:-self._max_generations]
            self._current_step = None
        if step == self._current_step:
            return None  # a second call within the same step (true CFG): same choice
        progress = step / total
        scale = self.scale_at(progress)
        mask = rule.content_mask(self._content_topk, self._style_topk, self.gamma, scale).tolist()
        self._apply(mask)
        self._current_step = step
        if self.generations:
            self.generations[-1].steps.append((step, progress, scale, tuple(mask)))
        return None

    def _apply(self, mask: list[bool]) -> None:
        previous = self._active_mask
        for i, (module, use_content) in enumerate(zip(self._layers, mask)):
            if previous is None or previous[i] != use_content:
                module.set_adapter(ADAPTER_NAMES["content" if use_content else "style"], inference_mode=True)
        self._active_mask = list(mask)

    # --- reporting ---------------------------------------------------------

    def selection_log(self) -> dict:
        """Everything needed to audit the choices, as plain JSON-able data."""
        return {
            "pattern": self.pattern, "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
            "method": self.method,
            "content": self.labels["content"], "style": self.labels["style"],
            "layers": {p: {"k": s.k, "content_topk_sum": s.content_topk_sum, "style_topk_sum": s.style_topk_sum}
                       for p, s in self.stats.items()},
            "only": dict(self.only),
            "generations": [
                {"num_inference_steps": g.num_inference_steps,
                 "steps": [{"step": step, "progress": progress, "scale": scale,
                            "choices": {p: ("content" if c else "style") for p, c in zip(self.paths, mask)}}
                           for step, progress, scale, mask in g.steps]}
                for g in self.generations],
        }

    def save_selection_log(self, path: str | os.PathLike) -> None:
        _atomic_write_text(path, json.dumps(self.selection_log(), indent=1))

    # --- removal -----------------------------------------------------------

    def detach(self) -> None:
        """Remove the hook and both adapters; the model is exactly as before."""
        if getattr(self, "_detached", True):
            return
        self._hook.remove()
        self._remove_adapters(list(ADAPTER_NAMES.values()))
        self._detached = True

    def _remove_adapters(self, names: list[str]) -> None:
        if not names:
            return
        if not self._had_adapters:
            self.denoiser.unload_lora()  # unwraps every LoRA layer: the original modules come back
        else:
            self.denoiser.delete_adapters(names)
        for encoder, _ in getattr(self, "_text_encoders", []) or []:
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
        return (f"KLoRA(pattern={self.pattern!r}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma:.4g}, "
                f"method={self.method!r}, shared_layers={len(self.paths)}, single_lora_layers={len(self.only)})")


def attach(target, content, style, **kwargs) -> KLoRA:
    """Attach K-LoRA to a pipeline or denoiser; ``detach()`` the result to remove it."""
    return KLoRA(target, content, style, **kwargs)


# --- helpers -----------------------------------------------------------------

def split_target(target):
    """(pipeline or None, denoiser) for a pipeline, a UNet or a FLUX transformer."""
    for attr in ("unet", "transformer"):
        denoiser = getattr(target, attr, None)
        if isinstance(denoiser, torch.nn.Module):
            return target, denoiser
    if isinstance(target, torch.nn.Module):
        return None, target
    raise TypeError(f"expected a diffusers pipeline, UNet or FLUX transformer, got {type(target).__name__}")


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


def _delta_from_adapter(adapter, path: str, device) -> torch.Tensor | None:
    A = adapter.state_dict.get(f"{path}.lora_A.weight")
    B = adapter.state_dict.get(f"{path}.lora_B.weight")
    if A is None or B is None or A.dim() != 2 or B.dim() != 2:
        return None
    return rule.dense_delta(A.to(device), B.to(device), adapter.scales[path])


def _delta(module, adapter: str) -> torch.Tensor:
    """PEFT's dense update of one (convolution) adapter, in float32."""
    return module.get_delta_weight(adapter).float()


def _atomic_write_text(path, text: str) -> None:
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _timestep_value(timestep) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.flatten()[0]) if timestep.numel() else None
    return float(timestep)


class _SchedulerProgress:
    """Step index over step count from the pipeline's scheduler (exact, any schedule)."""

    def __init__(self, pipeline, unit: float, fallback):
        self.pipeline, self.unit, self.fallback = pipeline, unit, fallback
        self._timesteps = None
        self._last_step = -1

    def __call__(self, timestep):
        scheduler = getattr(self.pipeline, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return self.fallback(timestep)
        begin = getattr(scheduler, "begin_index", None) or 0
        index = getattr(scheduler, "step_index", None)
        if index is None:
            index = self._lookup(timesteps, timestep, begin)
        step = max(0, min(int(index) - begin, len(timesteps) - begin - 1))
        new = timesteps is not self._timesteps or step < self._last_step
        self._timesteps, self._last_step = timesteps, step
        return new, step, len(timesteps) - begin

    def _lookup(self, timesteps, timestep, begin) -> int:
        value = _timestep_value(timestep)
        if value is None:
            return begin
        distance = (timesteps[begin:].double().cpu() - value * self.unit).abs()
        return begin + int(torch.argmin(distance))


class _TimestepProgress:
    """Without a scheduler: count distinct timesteps; a noisier one starts over."""

    def __init__(self, num_inference_steps: int):
        self.total = int(num_inference_steps)
        self._last = None
        self._step = 0
        self._warned = False

    def __call__(self, timestep):
        value = _timestep_value(timestep)
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
        return new, min(self._step, self.total - 1), self.total


def _progress_source(pipeline, denoiser, family, num_inference_steps):
    if num_inference_steps is not None and int(num_inference_steps) < 1:
        raise KLoRAError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    fallback = _TimestepProgress(num_inference_steps or 50)
    if pipeline is None:
        return fallback
    # FLUX hands the transformer timestep / 1000; its scheduler counts in thousands.
    unit = 1000.0 if family == "transformer" else 1.0
    return _SchedulerProgress(pipeline, unit, fallback)
