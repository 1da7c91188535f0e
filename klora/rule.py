"""The K-LoRA selection rule (Ouyang, Li, Hou, CVPR 2025), in plain torch.

For one linear layer that both LoRAs adapt, with dense updates
``dW_c = scale_c * B_c @ A_c`` and ``dW_s = scale_s * B_s @ A_s``:

    K    = r_c * r_s
    S_c  = sum of the K largest |dW_c|        S_s likewise
    gamma: trimmed mean over layers of sum|dW_c| / sum|dW_s|
    p    = t / T                               (step index over step count)
    s(p) = alpha * p + beta                    pattern "s"
    s(p) = (alpha * p + beta) mod alpha        pattern "s*"
    use the content LoRA if S_c / gamma > S_s * s(p), else the style LoRA.

Nothing here knows about diffusers; ``klora.fusion`` feeds it layers and steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PATTERNS = ("s", "s*")
DEFAULT_ALPHA = 1.5
# Outliers are layers whose ratio is at least this many times the mean ratio.
GAMMA_OUTLIER_FACTOR = 3.0


def default_beta(pattern: str, alpha: float = DEFAULT_ALPHA) -> float:
    """The paper's beta: 0.5 for ``s``; 0.85 * alpha for ``s*`` (1.275 at alpha 1.5)."""
    check_pattern(pattern)
    return 0.5 if pattern == "s" else 0.85 * alpha


def check_pattern(pattern: str) -> None:
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")


def dense_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * B @ A`` in float32, whatever dtype the adapter is stored in."""
    return torch.mm(lora_B.float(), lora_A.float()).mul_(float(scale))


def topk_sum(delta: torch.Tensor, k: int) -> float:
    """Sum of the ``k`` largest absolute values of ``delta`` (all of them if it has fewer)."""
    return _topk_sum_of_abs(delta.detach().float().abs(), k)


def _topk_sum_of_abs(magnitudes: torch.Tensor, k: int) -> float:
    k = min(int(k), magnitudes.numel())
    if magnitudes.dim() == 2 and magnitudes.shape[0] >= k and magnitudes.numel() > 16 * k:
        # Exact shortcut: the k largest row maxima are k distinct entries, so every one of
        # the k largest entries is at least the smallest of them. A full top-k over millions
        # of entries is ~30x slower on a CPU than these two passes.
        row_max = magnitudes.amax(dim=1)
        threshold = torch.topk(row_max, k, sorted=False).values.min()
        rows = magnitudes[row_max >= threshold]  # whole rows first: cheaper than an element mask
        magnitudes = rows[rows >= threshold]
    return float(torch.topk(magnitudes.flatten(), k, sorted=False).values.sum())


@dataclass(frozen=True)
class LayerStats:
    """What the rule needs to know about one layer, computed once from the weights."""

    k: int
    content_topk_sum: float
    style_topk_sum: float
    content_abs_sum: float
    style_abs_sum: float

    @property
    def ratio(self) -> float:
        return self.content_abs_sum / self.style_abs_sum if self.style_abs_sum > 0 else float("inf")


def magnitude_sums(magnitudes: torch.Tensor, k: int) -> tuple[float, float]:
    """(sum of the ``k`` largest, sum of all) of a tensor of absolute values |dW|."""
    return _topk_sum_of_abs(magnitudes, k), float(magnitudes.sum())


def layer_stats(content_delta: torch.Tensor, style_delta: torch.Tensor,
                content_rank: int, style_rank: int) -> LayerStats:
    k = int(content_rank) * int(style_rank)
    content_topk, content_sum = magnitude_sums(content_delta.detach().float().abs(), k)
    style_topk, style_sum = magnitude_sums(style_delta.detach().float().abs(), k)
    return LayerStats(k=k, content_topk_sum=content_topk, style_topk_sum=style_topk,
                      content_abs_sum=content_sum, style_abs_sum=style_sum)


def gamma_from_ratios(ratios: list[float]) -> float:
    """Trimmed mean of per-layer content/style L1 ratios (the official code's gamma).

    One pass: drop ratios at or above 3x their mean, average the rest. Only
    positive, finite ratios count (a layer with an all-zero side never reaches the
    rule: ``klora.fusion`` gives it to the other LoRA), so gamma is never 0, inf or
    NaN. With no layer in common the LoRAs are never compared: 1.0.
    """
    finite = [r for r in ratios if 0 < r < float("inf")]
    if not finite:
        return 1.0
    mean = sum(finite) / len(finite)
    kept = [r for r in finite if r < GAMMA_OUTLIER_FACTOR * mean]
    return sum(kept) / len(kept) if kept else mean


def scale_at(progress: float, pattern: str, alpha: float, beta: float) -> float:
    """The step-dependent weight of the style side, s(p)."""
    check_pattern(pattern)
    value = alpha * progress + beta
    return value % alpha if pattern == "s*" else value


def prefers_content(content_topk_sum: float, style_topk_sum: float, gamma: float, scale: float) -> bool:
    """Eq. of the paper: content wins while S_c / gamma > S_s * s(p)."""
    return content_topk_sum / gamma > style_topk_sum * scale


def content_mask(content_topk_sums: torch.Tensor, style_topk_sums: torch.Tensor,
                 gamma: float, scale: float) -> torch.Tensor:
    """``prefers_content`` for many layers at once (float64, same arithmetic)."""
    return (content_topk_sums / gamma) > (style_topk_sums * scale)
