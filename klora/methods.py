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
    "switch": "LoRA Switch: the content LoRA for steps 0-N, then the style LoRA for N steps, and so on",
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
    return _number(beta, name, "a finite number >= 0", lambda value: 0.0 <= value < math.inf)


def check_np_mu(mu, name: str = "np_mu") -> float:
    """mu >= 0: 0 is the direct merge, inf the hard projection."""
    return _number(mu, name, "a number >= 0 or inf", lambda value: value >= 0.0)


def _number(given, name: str, requirement: str, accepts) -> float:
    try:
        value = float(given)
    except (TypeError, ValueError):
        value = math.nan  # refused below: NaN passes no comparison
    if not accepts(value):
        raise KLoRAError(f"{name} must be {requirement}, got {given!r}")
    return value


def check_switch_every(every, name: str = "switch_every") -> int:
    if (isinstance(every, bool) or not isinstance(every, (int, float)) or not math.isfinite(every)
            or every != int(every) or every < 1):
        raise KLoRAError(f"{name} must be a whole number of steps >= 1, got {every!r}")
    return int(every)


# --- the selection log's method fields, one schema for both engines -------------------------------------

def log_knobs(method: str, np_mu: float, switch_every: int) -> dict:
    """The knob of ``method`` the selection log records (NP-LoRA's mu, LoRA Switch's block), if any."""
    if method == "np":
        return {"np_mu": np_mu}
    if method == "switch":
        return {"switch_every": switch_every}
    return {}


def log_layers(stats: dict, energies: dict) -> dict:
    """{layer: K-LoRA's K and top-K sums, EST-LoRA's energies} for the layers both LoRAs adapt
    (``stats``: {key: rule.LayerStats}; ``energies``: {key: (content, style)})."""
    return {key: {"k": s.k, "content_topk_sum": s.content_topk_sum, "style_topk_sum": s.style_topk_sum,
                  "content_energy": energies[key][0], "style_energy": energies[key][1]} for key, s in stats.items()}
