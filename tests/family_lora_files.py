"""LoRA files for the image families beyond SD and FLUX.1, written from known tensors.

A LoRA is a list of ``flux_lora_files.Unit`` (one (A, B, alpha) as a file stores it,
and the diffusers modules its B rows feed). ``flux_lora_files.truth`` turns units
into the ground truth ``{module: (alpha / rank * B @ A in float64, rank)}``.

The layer tables below (original/kohya names -> diffusers modules) are written out
by hand from the original model code, so the ground truth does not depend on the
diffusers converters under test.
"""

from __future__ import annotations

import math
import re

import torch
from safetensors.torch import save_file

from flux_lora_files import Unit

# Linears inside the repeated blocks of each family's denoiser (embedders and output layers left out).
BLOCKS = r"^(transformer_blocks|single_transformer_blocks|layers|noise_refiner|context_refiner)\.\d+\."

# FLUX.2 original (BFL) names -> diffusers modules, in B-row order. Kohya names are the same with "_".
FLUX2_DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.linear_in"],
    "img_mlp.2": ["ff.linear_out"],
    "txt_mlp.0": ["ff_context.linear_in"],
    "txt_mlp.2": ["ff_context.linear_out"],
}
FLUX2_SINGLE = {
    "linear1": ["attn.to_qkv_mlp_proj"],
    "linear2": ["attn.to_out"],
}


def block_linears(denoiser, pattern: str = r".") -> list[str]:
    """Linear layers of the repeated blocks whose path matches ``pattern``, in module order."""
    return [name for name, module in denoiser.named_modules()
            if isinstance(module, torch.nn.Linear) and re.match(BLOCKS, name) and re.search(pattern, name)]


def _value(v, i):
    return v(i) if callable(v) else v


def units(denoiser, modules, rank=4, alpha=None, seed=0, scale=0.05, key=None) -> list[Unit]:
    """One unit per module; ``rank``, ``alpha`` and ``scale`` may be callables of the module index.

    ``key(module)`` is the name the unit gets in the file (default: the module path).
    """
    gen = torch.Generator().manual_seed(seed)
    table = dict(denoiser.named_modules())
    out = []
    for i, name in enumerate(modules):
        r, s = _value(rank, i), _value(scale, i)
        linear = table[name]
        A = torch.randn(r, linear.in_features, generator=gen) * s
        B = torch.randn(linear.out_features, r, generator=gen) * s
        out.append(Unit(key(name) if key else name, [name], A, B, _value(alpha, i)))
    return out


def kohya_key(module: str) -> str:
    """kohya / musubi naming of a diffusers module path: ``lora_unet_<path with _>``."""
    return "lora_unet_" + module.replace(".", "_")


def z_image_fused_qkv_units(transformer, rank=4, alpha=None, seed=0, scale=0.05) -> list[Unit]:
    """kohya files of the original Z-Image code: one ``attention_qkv`` unit per block feeding to_q, to_k, to_v."""
    gen = torch.Generator().manual_seed(seed)
    table = dict(transformer.named_modules())
    out = []
    blocks = sorted({m.group(1) for name in table if (m := re.match(r"^((?:layers|noise_refiner|context_refiner)"
                                                                    r"\.\d+)\.attention$", name))})
    for i, block in enumerate(blocks):
        modules = [f"{block}.attention.to_{p}" for p in "qkv"]
        in_features = table[modules[0]].in_features
        out_total = sum(table[m].out_features for m in modules)
        r, s = _value(rank, i), _value(scale, i)
        out.append(Unit(kohya_key(f"{block}.attention.qkv"), modules, torch.randn(r, in_features, generator=gen) * s,
                        torch.randn(out_total, r, generator=gen) * s, _value(alpha, i)))
    return out


def flux2_units(transformer, layout, rank=4, alpha=None, seed=0, scale=0.05, keep=None) -> list[Unit]:
    """Units of a FLUX.2 file with fused projections: ``layout`` "kohya"
    (``lora_unet_double_blocks_0_img_attn_qkv``) or "original" (ai-toolkit:
    ``double_blocks.0.img_attn.qkv``, written with the ``diffusion_model.`` prefix).
    ai-toolkit files carry no alpha: pass ``alpha=None`` for them."""
    gen = torch.Generator().manual_seed(seed)
    table = dict(transformer.named_modules())
    out = []
    for blocks, names, prefix, kind in ((transformer.transformer_blocks, FLUX2_DOUBLE, "transformer_blocks", "double"),
                                        (transformer.single_transformer_blocks, FLUX2_SINGLE,
                                         "single_transformer_blocks", "single")):
        for b in range(len(blocks)):
            for name, parts in names.items():
                if keep is not None and not keep(name):
                    continue
                modules = [f"{prefix}.{b}.{part}" for part in parts]
                i = len(out)
                r, s = _value(rank, i), _value(scale, i)
                A = torch.randn(r, table[modules[0]].in_features, generator=gen) * s
                B = torch.randn(sum(table[m].out_features for m in modules), r, generator=gen) * s
                original = f"{kind}_blocks.{b}.{name}"
                key = "lora_unet_" + original.replace(".", "_") if layout == "kohya" else original
                out.append(Unit(key, modules, A, B, _value(alpha, i)))
    return out


def write_original(path, lora_units, prefix="diffusion_model.", down="lora_A", up="lora_B", alpha_keys=True):
    """Original-model names as ComfyUI / ai-toolkit / musubi write them: ``<prefix><key>.<down>.weight``,
    ``.<up>.weight`` and, with ``alpha_keys``, a 0-dim ``<prefix><key>.alpha``."""
    tensors = {}
    for u in lora_units:
        tensors[f"{prefix}{u.key}.{down}.weight"] = u.A.contiguous()
        tensors[f"{prefix}{u.key}.{up}.weight"] = u.B.contiguous()
        if alpha_keys and u.alpha is not None:
            tensors[f"{prefix}{u.key}.alpha"] = torch.tensor(float(u.alpha))
    save_file(tensors, str(path))


def spread(i: int, base: float = 0.05, width: float = 0.8) -> float:
    """A per-layer magnitude that wanders between base*e^-width and base*e^width, so that the
    content/style balance differs from layer to layer and K-LoRA's choices switch."""
    return base * math.exp(width * math.sin(1.7 * i + 0.3))
