"""NP-LoRA (Chen, Zhou, Zhang, Huang, arXiv 2511.11051): the content LoRA projected off the style's directions.

For one linear layer that both LoRAs adapt, with ``dW_s = scale_s * B_s @ A_s`` (out x in) and
``dW_c = scale_c * B_c @ A_c``:

    dW_s = U S V^T                  V: the right singular vectors of the style delta (its input space),
                                    all of them: k = the style delta's rank (the paper keeps all r_s)
    c    = mu / (1 + mu)            the soft projection's Woodbury form; mu = 0.5 by default,
                                    mu = 0 is the direct merge, mu = inf the hard projection (c = 1)
    dW   = dW_s + dW_c (I - c V V^T)

Layers only one LoRA adapts keep that LoRA as it is. The merged delta is an ordinary LoRA of
rank r_s + r_c, ``B = [scale_s B_s | scale_c B_c]``, ``A = [A_s ; A_c - c (A_c V) V^T]``, applied once:
a picture costs what the base model costs.

V is found without a dense SVD: span(V) is the row space of ``B_s @ A_s``, so a thin QR of A_s^T
(the paper's Supplementary VIII) followed by an SVD of the small out x r factor gives the exact
right singular vectors, and drops directions a rank-deficient LoRA does not have.
"""

from __future__ import annotations

import math

import torch

DEFAULT_MU = 0.5
# A right singular vector counts when its singular value is at least this fraction of the largest.
RANK_TOLERANCE = 1e-6


def projection_strength(mu: float) -> float:
    """c = mu / (1 + mu); mu = inf (the hard projection) gives 1."""
    mu = float(mu)
    if math.isinf(mu) and mu > 0:
        return 1.0
    return mu / (1.0 + mu)


def style_directions(style_A: torch.Tensor, style_B: torch.Tensor) -> torch.Tensor:
    """The right singular vectors (in x k, orthonormal columns) of ``style_B @ style_A`` with non-zero
    singular values, in float64. ``style_A`` is r x in, ``style_B`` out x r (several LoRA parts on one
    layer: stack their A rows and B columns)."""
    A, B = style_A.detach().double(), style_B.detach().double()
    basis, triangle = torch.linalg.qr(A.T)  # A^T = Q R, so B A = (B R^T) Q^T
    _, singular, right = torch.linalg.svd(B @ triangle.T, full_matrices=False)
    if singular.numel() == 0 or float(singular[0]) == 0.0:
        return basis[:, :0]
    keep = singular > RANK_TOLERANCE * singular[0]
    return basis @ right[keep].T


def style_part(content_A: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``A_c V V^T``: the part of the content LoRA's down matrix in the style's input directions (float64;
    ``directions`` from ``style_directions``)."""
    return (content_A.detach().double() @ directions) @ directions.T


def project_content(content_A: torch.Tensor, directions: torch.Tensor, strength: float) -> torch.Tensor:
    """``A_c (I - c V V^T)``: the content LoRA's down matrix with ``c`` of its style-direction part taken
    away (float64; ``strength`` from ``projection_strength``)."""
    return content_A.detach().double() - strength * style_part(content_A, directions)


def merged_factors(content_A, content_B, content_scale, style_A, style_B, style_scale, mu=DEFAULT_MU):
    """(B, A) of the merged layer, rank r_s + r_c, scales folded into B, in float64."""
    directions = style_directions(style_A, style_B)
    up = torch.cat([style_B.detach().double() * style_scale, content_B.detach().double() * content_scale], dim=1)
    down = torch.cat([style_A.detach().double(),
                      project_content(content_A, directions, projection_strength(mu))], dim=0)
    return up, down
