"""LoRA Switch (Zhong et al., "Multi-LoRA Composition for Image Generation", arXiv 2402.16843), for two LoRAs.

One LoRA is active at a time, in a fixed order, and the active one changes every tau steps:

    i(t) = floor(((t - 1) mod k tau) / tau) + 1        t = 1 .. N, k LoRAs

With k = 2, content first (the paper finds a subject LoRA first best and style first worst) and
steps counted from 0, step ``t`` uses the content LoRA when ``(t // tau)`` is even: steps 0..tau-1
content, tau..2 tau-1 style, and so on. The paper's formula gives every block exactly tau steps;
its code switches from a step-end callback, so its first block runs tau + 1 steps. We follow the
formula. tau = 5 by default.

Unlike K-LoRA, the whole other LoRA is off while one is active, on every layer it adapts.
"""

from __future__ import annotations

DEFAULT_EVERY = 5


def uses_content(step: int, every: int = DEFAULT_EVERY) -> bool:
    """True when step ``step`` (from 0) belongs to a content block."""
    return (int(step) // int(every)) % 2 == 0
