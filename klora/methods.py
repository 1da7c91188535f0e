"""The fusion methods every entry point offers, their knobs and the checks of those knobs.

Per step, per layer both LoRAs adapt (the choice is worked out once per run and switched in):
    klora   K-LoRA (``klora.rule``): top-K magnitudes against a step-dependent scale
    est     EST-LoRA (``klora.est_lora``): K-LoRA's choice on the energies ||dW||_F^2
    switch  LoRA Switch (``klora.lora_switch``): content for ``switch_every`` steps, then style, ...
One static merge, applied once (a picture costs what the base model costs):
    np      NP-LoRA (``klora.np_lora``): the content projected off the style's directions, plus the style
    merge   both LoRAs added
    content / style   one LoRA alone

The diffusers engine (``klora.fusion``), the ComfyUI engine (``klora.comfyui``), the command lines,
the gradio page and the ComfyUI node all take their names and checks from here.
"""

from __future__ import annotations

import math

from . import lora_switch, np_lora
from .errors import KLoRAError

METHODS = ("klora", "est", "switch", "np", "merge", "content", "style")
PER_STEP = ("klora", "est", "switch")  # a choice per layer and step
CHOOSING = ("klora", "est")  # the choice compares the two LoRAs' statistics with the schedule s(p)
STATIC = ("np", "merge", "content", "style")
EXPORTABLE = ("np", "merge")  # --export_lora writes their merged LoRA as one file
SUMMARY = {
    "klora": "K-LoRA: per layer and step, the LoRA with the larger top-K magnitudes against the step's scale",
    "est": "EST-LoRA: K-LoRA's choice on the energies ||dW||_F^2 (no K)",
    "switch": "LoRA Switch: the content LoRA for N steps, then the style LoRA for N, and so on",
    "np": "NP-LoRA: one static merge, the content projected off the style's directions",
    "merge": "both LoRAs added everywhere",
    "content": "the content LoRA alone",
    "style": "the style LoRA alone",
}
DIFFUSERS_PROGRESS = ("steps", "noise")
COMFYUI_PROGRESS = ("steps", "percent")
DEFAULT_NP_MU = np_lora.DEFAULT_MU
DEFAULT_SWITCH_EVERY = lora_switch.DEFAULT_EVERY
AUTO = "auto"  # --beta auto: EST-LoRA's style discrepancy


def check_method(method, name: str = "method") -> str:
    if method not in METHODS:
        raise KLoRAError(f"{name} must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def check_beta(beta, name: str = "beta") -> float:
    """A finite number >= 0 (the style side's weight at p = 0; a negative one has no meaning)."""
    try:
        value = float(beta)
    except (TypeError, ValueError):
        raise KLoRAError(f"{name} must be a finite number >= 0, got {beta!r}") from None
    if not (0.0 <= value < math.inf):
        raise KLoRAError(f"{name} must be a finite number >= 0, got {beta!r}")
    return value


def check_np_mu(mu, name: str = "np_mu") -> float:
    """mu >= 0: 0 is the direct merge, inf the hard projection."""
    try:
        value = float(mu)
    except (TypeError, ValueError):
        raise KLoRAError(f"{name} must be a number >= 0 or inf, got {mu!r}") from None
    if math.isnan(value) or value < 0:
        raise KLoRAError(f"{name} must be a number >= 0 or inf, got {mu!r}")
    return value


def check_switch_every(every, name: str = "switch_every") -> int:
    if (isinstance(every, bool) or not isinstance(every, (int, float)) or not math.isfinite(every)
            or every != int(every) or every < 1):
        raise KLoRAError(f"{name} must be a whole number of steps >= 1, got {every!r}")
    return int(every)
