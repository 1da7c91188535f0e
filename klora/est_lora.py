"""EST-LoRA (Zhang, Xiong, arXiv 2508.02165), as its public code (``Godz-z/EST-LoRA``) computes it.

K-LoRA's per-layer, per-step choice (``klora.rule``) with two changes:

    E_c  = ||dW_c||_F^2               the energy of the update, over all entries (no top-K, no K)
    E_s  = ||dW_s||_F^2
    use the content LoRA if E_c / gamma > E_s * s(p), else the style LoRA

gamma, s(p), the patterns and the tie (style) are K-LoRA's: ``rule.gamma_from_ratios`` (the trimmed
mean of the L1 ratios, as the code keeps it) and ``rule.scale_at``.

The second change is beta, the "style discrepancy": one content-only and one style-only picture, same
prompt and seed, are embedded by DINO ViT-S/16 (the CLS token of ``last_hidden_state``, after the
model's own preprocessing), and ``beta = 1 - cos(e_content, e_style)``. Pictures far apart give a large
beta, so style takes layers earlier. ``klora.dino`` computes the embeddings.
"""

from __future__ import annotations

import torch


# Entries converted to float64 at a time: a whole FLUX.2 or Wan layer's update is a gigabyte in float32,
# and a float64 copy of it would double the peak memory of computing the statistics.
_CHUNK = 1 << 22


def energy(delta: torch.Tensor) -> float:
    """||dW||_F^2, summed in float64 a chunk at a time."""
    flat = delta.detach().reshape(-1)
    return float(sum(chunk.double().square().sum() for chunk in flat.split(_CHUNK)))


def content_mask(content_energies: torch.Tensor, style_energies: torch.Tensor,
                 gamma: float, scale: float) -> torch.Tensor:
    """For many layers at once: True where the content LoRA wins at this step's scale s(p)."""
    return (content_energies / gamma) > (style_energies * scale)


def beta_from_embeddings(content: torch.Tensor, style: torch.Tensor) -> float:
    """``1 - cos`` of two embeddings (no clamp, as the code): 0 for the same picture, up to 2."""
    content, style = content.detach().double().flatten(), style.detach().double().flatten()
    return 1.0 - float(torch.nn.functional.cosine_similarity(content, style, dim=0))
