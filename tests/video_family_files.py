"""LoRA pairs for the tiny video pipelines, and the layouts ``video_lora_files`` does not write.

Ground truth is what ``lora_files`` uses: {diffusers module path: (A, B, alpha)}, the delta of a
layer being ``alpha / rank * B @ A``. Layers that one original (fused) module feeds share their A,
so the same pair can be written in any layout, fused or not.
"""

from __future__ import annotations

import re

import torch
from safetensors.torch import save_file


def units_of(denoiser, pattern: str, fused=None) -> list[tuple[str, ...]]:
    """LoRA units of ``denoiser``: linears matching ``pattern`` in module order, one per unit, except
    that ``fused(path)`` (a tuple of paths, or None) groups the parts of one original fused module."""
    units, done = [], set()
    for path, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Linear) and re.search(pattern, path) and path not in done:
            group = (fused(path) if fused else None) or (path,)
            units.append(tuple(group))
            done.update(group)
    return units


def tilted_pair(denoiser, units, style_extra=(), seed=0, content_rank=lambda i: 2 + i % 3,
                content_alpha=lambda i: (1.0, 2.0, 4.0)[i % 3], style_rank=8, style_alpha=4.0, outlier=1):
    """(content, style) ground-truth layers whose K-LoRA choices switch during a run.

    Content adapts ``units[:-1]`` with ranks and alphas that vary per unit; style adapts
    ``units[1:]`` and ``style_extra`` with one rank and alpha. So the first unit is content-only,
    the last unit and ``style_extra`` style-only. Content grows stronger with depth and style
    weaker, so the content/style ratio crosses the rising K-LoRA scale somewhere; content unit
    ``outlier`` is ten times stronger, a ratio gamma's trimmed mean drops.
    """
    gen = torch.Generator().manual_seed(seed)
    table = dict(denoiser.named_modules())

    def unit_factors(unit, rank, strength):
        A = torch.randn(rank, table[unit[0]].in_features, generator=gen) * strength
        return {path: (A, torch.randn(table[path].out_features, rank, generator=gen) * strength) for path in unit}

    content, style = {}, {}
    last = max(1, len(units) - 1)
    for i, unit in enumerate(units):
        position = i / last
        if i < len(units) - 1:
            strength = 0.1 * (0.4 + position) * (10.0 if i == outlier else 1.0)
            for path, (A, B) in unit_factors(unit, content_rank(i), strength).items():
                content[path] = (A, B, float(content_alpha(i)))
        if i > 0:
            for path, (A, B) in unit_factors(unit, style_rank, 0.1 * (1.4 - position)).items():
                style[path] = (A, B, float(style_alpha))
    for path in style_extra:
        for path, (A, B) in unit_factors((path,), style_rank, 0.1).items():
            style[path] = (A, B, float(style_alpha))
    return content, style


def write_prefixed_lora_a(path, layers, prefix="diffusion_model"):
    """ComfyUI-style diffusers names under ``prefix`` (LTX-Video), alpha / rank baked into A, no alpha key."""
    tensors = {}
    for name, (A, B, alpha) in layers.items():
        tensors[f"{prefix}.{name}.lora_A.weight"] = (A * (alpha / A.shape[0])).contiguous()
        tensors[f"{prefix}.{name}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(path))


def write_sd15_kohya(path, layers, text_encoder=None, text_rank=4, seed=0):
    """kohya / A1111 SD 1.5 LoRA: ``lora_unet_down_blocks_0_attentions_0_..._to_q.lora_down.weight``
    + ``.alpha``; with ``text_encoder``, also ``lora_te_`` factors for the q/k/v/out projections of
    its first layer, as most SD 1.5 LoRAs carry."""
    tensors = {}
    for name, (A, B, alpha) in layers.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = A.contiguous()
        tensors[f"{key}.lora_up.weight"] = B.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    if text_encoder is not None:
        gen = torch.Generator().manual_seed(seed)
        modules = dict(text_encoder.named_modules())
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear = modules[f"encoder.layers.0.self_attn.{proj}"]
            key = f"lora_te_text_model_encoder_layers_0_self_attn_{proj}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(text_rank, linear.in_features, generator=gen) * 0.1
            tensors[f"{key}.lora_up.weight"] = torch.randn(linear.out_features, text_rank, generator=gen) * 0.1
            tensors[f"{key}.alpha"] = torch.tensor(float(text_rank))
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
