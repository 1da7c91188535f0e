"""LoRA files with real layer sizes for Qwen-Image, FLUX.2 and SD3.5, and the layer tables behind them.

A LoRA is ``layers``: {diffusers module path: (A, B, alpha)}, as in ``lora_files`` and ``video_lora_files``
(whose Wan and HunyuanVideo writers the real-size tests reuse). Modules that one original module feeds (FLUX.2's
fused q/k/v) share one A. Each writer puts the same LoRA into one published layout.

The tables map the original model code's names to diffusers module paths. They are written out by hand
(FLUX.2: Black Forest Labs' ``flux2`` repository, ``src/flux2/model.py``; Qwen-Image: its release code, which
ComfyUI's ``comfy/ldm/qwen_image/model.py`` keeps name for name; SD3.5: the diffusers layout of the MMDiT
blocks), so the module sets the tests expect do not come from the diffusers converters under test.
"""

from __future__ import annotations

import re

import torch
from safetensors.torch import save_file

from video_lora_files import random_units

# --- Qwen-Image --------------------------------------------------------------------------------
# The released model code uses the diffusers names, so an original/ComfyUI file names the same modules.
QWEN_IMAGE_BLOCK = (
    "img_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
    "txt_mod.1", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)
QWEN_IMAGE_OUTSIDE = ("img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1",
                      "time_text_embed.timestep_embedder.linear_2", "norm_out.linear", "proj_out")


def qwen_image_linears(num_layers: int) -> list[str]:
    return ([f"transformer_blocks.{i}.{m}" for i in range(num_layers) for m in QWEN_IMAGE_BLOCK]
            + list(QWEN_IMAGE_OUTSIDE))


def write_qwen_image_original(path, layers, style="lora_down", alpha_keys=True, prefix="diffusion_model"):
    """ComfyUI / musubi-converted names: ``diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight``.

    ``style``: "lora_down" (lora_down/lora_up) or "lora_A" (lora_A/lora_B); ``alpha_keys``: ``.alpha`` scalars,
    else alpha / rank is baked into A (as ai-toolkit saves it).
    """
    tensors = {}
    down, up = ("lora_down", "lora_up") if style == "lora_down" else ("lora_A", "lora_B")
    for name, (A, B, alpha) in layers.items():
        key = f"{prefix}.{name}"
        tensors[f"{key}.{down}.weight"] = A.contiguous() if alpha_keys else A * (alpha / A.shape[0])
        tensors[f"{key}.{up}.weight"] = B.contiguous()
        if alpha_keys:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))


# --- FLUX.2 ------------------------------------------------------------------------------------
# BFL module -> diffusers modules it feeds, in lora_B row order; {i} is a block index.
FLUX2_DOUBLE = {
    "double_blocks.{i}.img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "double_blocks.{i}.img_attn.proj": ("attn.to_out.0",),
    "double_blocks.{i}.img_mlp.0": ("ff.linear_in",),
    "double_blocks.{i}.img_mlp.2": ("ff.linear_out",),
    "double_blocks.{i}.txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "double_blocks.{i}.txt_attn.proj": ("attn.to_add_out",),
    "double_blocks.{i}.txt_mlp.0": ("ff_context.linear_in",),
    "double_blocks.{i}.txt_mlp.2": ("ff_context.linear_out",),
}
FLUX2_SINGLE = {  # linear1 is q, k, v and the MLP input in one matrix in diffusers too
    "single_blocks.{i}.linear1": ("attn.to_qkv_mlp_proj",),
    "single_blocks.{i}.linear2": ("attn.to_out",),
}
FLUX2_OUTSIDE = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",  # FLUX.2 dev only
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
# BFL's final layer computes (shift, scale); diffusers' norm_out (AdaLayerNormContinuous) computes (scale, shift).
FLUX2_SWAPPED = {"final_layer.adaLN_modulation.1"}


def flux2_units(num_layers: int, num_single_layers: int, guidance: bool) -> dict[str, tuple[str, ...]]:
    """{BFL module: the diffusers modules it feeds} for a whole FLUX.2 transformer."""
    units = {}
    for i in range(num_layers):
        for original, parts in FLUX2_DOUBLE.items():
            units[original.format(i=i)] = tuple(f"transformer_blocks.{i}.{p}" for p in parts)
    for i in range(num_single_layers):
        for original, parts in FLUX2_SINGLE.items():
            units[original.format(i=i)] = tuple(f"single_transformer_blocks.{i}.{p}" for p in parts)
    for original, module in FLUX2_OUTSIDE.items():
        if guidance or not original.startswith("guidance_in"):
            units[original] = (module,)
    return units


def _swap_halves(t):
    return torch.cat(t.chunk(2)[::-1])


def flux2_original(layers, units) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{BFL module: (A, B with the rows of its fused parts stacked, alpha)} for the units ``layers`` covers."""
    out = {}
    for original, parts in units.items():
        if not any(p in layers for p in parts):
            continue
        A, _, alpha = layers[parts[0]]
        if not all(p in layers and layers[p][0] is A and layers[p][2] == alpha for p in parts):
            raise ValueError(f"{original}: the parts of a fused module need one shared A and alpha")
        B = torch.cat([layers[p][1] for p in parts])
        out[original] = (A, _swap_halves(B) if original in FLUX2_SWAPPED else B, alpha)
    return out


def write_flux2_original(path, layers, units, style="lora_A", alpha_keys=False):
    """ai-toolkit / BFL names: ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``.

    ``style``: "lora_A" or "lora_down" factor names; ``alpha_keys``: ``.alpha`` scalars, else alpha / rank in A.
    """
    down, up = ("lora_down", "lora_up") if style == "lora_down" else ("lora_A", "lora_B")
    tensors = {}
    for original, (A, B, alpha) in flux2_original(layers, units).items():
        key = f"diffusion_model.{original}"
        tensors[f"{key}.{down}.weight"] = A.contiguous() if alpha_keys else A * (alpha / A.shape[0])
        tensors[f"{key}.{up}.weight"] = B.contiguous()
        if alpha_keys:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))


def write_flux2_kohya(path, layers, units):
    """kohya sd-scripts / musubi-tuner: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` + ``.alpha``."""
    tensors = {}
    for original, (A, B, alpha) in flux2_original(layers, units).items():
        key = "lora_unet_" + original.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = A.contiguous()
        tensors[f"{key}.lora_up.weight"] = B.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora_flux2"})


# --- SD3 / SD3.5 -------------------------------------------------------------------------------
# Every MMDiT block has an image (x) and a context stream; the last block's context stream only feeds the
# attention of that block (context_pre_only): no output projection, no MLP, a two-way norm.
SD3_BLOCK = (
    "norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2",
    "norm1_context.linear", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff_context.net.0.proj", "ff_context.net.2",
)
SD3_CONTEXT_AFTER_LAST = {"attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2"}
SD3_OUTSIDE = ("context_embedder", "time_text_embed.timestep_embedder.linear_1",  # pos_embed.proj is a convolution
               "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
               "time_text_embed.text_embedder.linear_2", "norm_out.linear", "proj_out")


# Stability's MMDiT names (sd3 reference code, ``joint_blocks.{i}.x_block`` / ``context_block``) -> diffusers modules of
# ``transformer_blocks.{i}``, in lora_B row order: what a kohya sd-scripts SD3 LoRA names.
SD3_ORIGINAL = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.proj": ("attn.to_add_out",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
}


def sd3_kohya_units(num_layers: int) -> dict[str, tuple[str, ...]]:
    """{kohya module name: diffusers modules} for the blocks of an SD3 transformer."""
    units = {}
    for i in range(num_layers):
        for original, parts in SD3_ORIGINAL.items():
            modules = tuple(f"transformer_blocks.{i}.{p}" for p in parts)
            if i < num_layers - 1 or not any(m.endswith(tuple(SD3_CONTEXT_AFTER_LAST)) for m in modules):
                units[f"lora_unet_joint_blocks_{i}_{original.replace('.', '_')}"] = modules
    return units


def write_fused_kohya(path, layers, units):
    """kohya layout of fused modules: one lora_down, the parts' lora_up rows stacked, one ``.alpha``."""
    tensors = {}
    for key, parts in units.items():
        A, _, alpha = layers[parts[0]]
        tensors[f"{key}.lora_down.weight"] = A.contiguous()
        tensors[f"{key}.lora_up.weight"] = torch.cat([layers[p][1] for p in parts])
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})


def sd3_linears(num_layers: int) -> list[str]:
    """The linear layers of an SD3 transformer without dual attention (SD3.5 Large; Medium has dual attention)."""
    blocks = [f"transformer_blocks.{i}.{m}" for i in range(num_layers) for m in SD3_BLOCK
              if i < num_layers - 1 or m not in SD3_CONTEXT_AFTER_LAST]
    return blocks + list(SD3_OUTSIDE)


# --- shared ------------------------------------------------------------------------------------


def write_peft_alpha_keys(path, layers, prefix="transformer"):
    """diffusers names with one ``<prefix>.<module>.alpha`` scalar per layer and no config metadata."""
    tensors = {}
    for name, (A, B, alpha) in layers.items():
        tensors[f"{prefix}.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{prefix}.{name}.lora_B.weight"] = B.contiguous()
        tensors[f"{prefix}.{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))


def expand(templates, counts: dict[str, int]) -> list[str]:
    """Module templates with ``{i}`` filled in for every block; ``counts``: {template prefix: number of blocks}."""
    out = []
    for template in templates:
        if "{i}" not in template:
            out.append(template)
            continue
        prefix = next(p for p in counts if template.startswith(p))
        out += [template.replace("{i}", str(i)) for i in range(counts[prefix])]
    return out


def linears(model, pattern: str = r".") -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.search(pattern, n)]


def layers_for(model, units, rank=1, alpha=None, seed=0, scale=0.1):
    """Random ``layers`` for groups of diffusers modules that share one A (a fused original module),
    rank 1 by default: float32 factors of rank 1-2 keep a whole real-size LoRA at tens of MB."""
    return random_units(model, units, rank=rank, alpha=alpha, seed=seed, scale=scale)


def probe_mismatches(adapter, layers, model, biases=None, seed=0) -> list[str]:
    """Modules whose update, as PEFT will apply it, differs from the ground truth on a random input.

    The adapter applies ``alpha / r * lora_B @ lora_A @ x`` with alpha from its LoRA config (the per-module
    ``alpha_pattern`` entry, else ``lora_alpha``); the truth is ``alpha / rank * B @ A @ x`` from ``layers``.
    Shapes are checked against the real module. Compares ``dW @ x`` so that no dense real-size delta is formed.
    """
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    alphas = {p.strip("^$").replace("\\", ""): a for p, a in adapter.config["alpha_pattern"].items()}
    wrong = []
    for path, (A, B, alpha) in layers.items():
        x = torch.randn(A.shape[1], generator=gen, dtype=torch.float64)
        want = (alpha / A.shape[0]) * (B.double() @ (A.double() @ x))
        a = adapter.state_dict[f"{path}.lora_A.weight"].double()
        b = adapter.state_dict[f"{path}.lora_B.weight"].double()
        got = alphas.get(path, adapter.config["lora_alpha"]) / a.shape[0] * (b @ (a @ x))
        fits = a.shape[1] == modules[path].in_features and b.shape[0] == modules[path].out_features
        if not fits or not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
            wrong.append(path)
        bias = (biases or {}).get(path)
        if bias is not None:
            got_bias = adapter.state_dict.get(f"{path}.lora_B.bias")
            if got_bias is None or not torch.allclose(got_bias.double(), bias.double(), rtol=1e-6, atol=0):
                wrong.append(f"{path} (bias)")
    return wrong
