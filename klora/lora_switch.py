"""LoRA Switch (Zhong et al., "Multi-LoRA Composition for Image Generation", arXiv 2402.16843), for two LoRAs.

One LoRA is active at a time, in a fixed order, and the active one changes every tau steps. The paper
writes it as i(t) = floor(((t - 1) mod k tau) / tau) + 1 for t = 1 .. N; its code (``callbacks.py``)
switches in a step-end callback, after every step ``i > 0`` with ``i % tau == 0``, so a switch takes
effect one step later and the first block runs tau + 1 steps. Where the paper and its code disagree we
follow the code:

    step s (from 0) uses the content LoRA when  max(s - 1, 0) // tau  is even

With k = 2 and content first (the paper finds a subject LoRA first best and style first worst) and
tau = 5: content for steps 0-5, style for 6-10, content for 11-15, and so on.

Unlike K-LoRA, the whole other LoRA is off while one is active, on every layer it adapts.
"""

from __future__ import annotations

DEFAULT_EVERY = 5


def uses_content(step: int, every: int = DEFAULT_EVERY) -> bool:
    """True when step ``step`` (from 0) runs the content LoRA."""
    switches_before = max(int(step) - 1, 0) // int(every)  # the callbacks after steps every, 2 every, ... < step
    return switches_before % 2 == 0
