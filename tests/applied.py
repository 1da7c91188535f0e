"""What a K-LoRA attachment really adds to each layer, read off the model (not off K-LoRA's bookkeeping)."""

from __future__ import annotations

import torch


def base_weights(denoiser) -> dict[str, torch.Tensor]:
    """Copies of every weight before anything is attached: {module path: weight}."""
    return {path: _weight(module).detach().clone() for path, module in denoiser.named_modules()
            if _weight(module) is not None}


def applied_delta(denoiser, path: str, before: dict, adapter: str | None = None) -> torch.Tensor:
    """The update layer ``path`` applies now, in float64.

    PEFT adapter layers: ``scaling * B @ A`` of ``adapter`` (what the forward adds).
    Fused weights: the weight now minus the weight before attaching.
    """
    module = dict(denoiser.named_modules())[path]
    if hasattr(module, "lora_A") and adapter is not None:
        A = module.lora_A[adapter].weight.double()
        B = module.lora_B[adapter].weight.double()
        return float(module.scaling[adapter]) * (B.flatten(1) @ A.flatten(1))
    weight = _weight(module).double()
    return (weight - before[path].double()).flatten(1)


def _weight(module):
    module = getattr(module, "base_layer", module)
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and module is not None and not list(module.children()) \
        else None
