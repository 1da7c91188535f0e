"""Wan and HunyuanVideo LoRA files in the layouts people publish, written from known tensors.

Every writer takes ``layers``: {diffusers module path: (A, B, alpha)} (as ``lora_files`` does for
images) and writes the same LoRA in one on-disk layout. The diffusers -> original name tables
below are written out by hand from the original model code (Wan2.1 ``wan/modules/model.py``,
HunyuanVideo ``hyvideo/modules/models.py``), so the ground truth does not depend on diffusers'
converters or on ``klora.formats``, which the tests check.
"""

from __future__ import annotations

import re

import torch
from safetensors.torch import save_file

from lora_files import write_peft

# diffusers module -> original Wan module; {i} is a block index.
WAN_TO_ORIGINAL = {
    "blocks.{i}.attn1.to_q": "blocks.{i}.self_attn.q",
    "blocks.{i}.attn1.to_k": "blocks.{i}.self_attn.k",
    "blocks.{i}.attn1.to_v": "blocks.{i}.self_attn.v",
    "blocks.{i}.attn1.to_out.0": "blocks.{i}.self_attn.o",
    "blocks.{i}.attn2.to_q": "blocks.{i}.cross_attn.q",
    "blocks.{i}.attn2.to_k": "blocks.{i}.cross_attn.k",
    "blocks.{i}.attn2.to_v": "blocks.{i}.cross_attn.v",
    "blocks.{i}.attn2.to_out.0": "blocks.{i}.cross_attn.o",
    "blocks.{i}.attn2.add_k_proj": "blocks.{i}.cross_attn.k_img",
    "blocks.{i}.attn2.add_v_proj": "blocks.{i}.cross_attn.v_img",
    "blocks.{i}.ffn.net.0.proj": "blocks.{i}.ffn.0",
    "blocks.{i}.ffn.net.2": "blocks.{i}.ffn.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "proj_out": "head.head",
}

# Original HunyuanVideo modules whose output is several diffusers modules, in lora_B row order.
HUNYUAN_VIDEO_FUSED = {
    "double_blocks.{i}.img_attn_qkv": ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                       "transformer_blocks.{i}.attn.to_v"),
    "double_blocks.{i}.txt_attn_qkv": ("transformer_blocks.{i}.attn.add_q_proj",
                                       "transformer_blocks.{i}.attn.add_k_proj",
                                       "transformer_blocks.{i}.attn.add_v_proj"),
    "single_blocks.{i}.linear1": ("single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks.{i}.attn.to_k",
                                  "single_transformer_blocks.{i}.attn.to_v", "single_transformer_blocks.{i}.proj_mlp"),
    "txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv": (
        "context_embedder.token_refiner.refiner_blocks.{i}.attn.to_q",
        "context_embedder.token_refiner.refiner_blocks.{i}.attn.to_k",
        "context_embedder.token_refiner.refiner_blocks.{i}.attn.to_v"),
}
# diffusers module -> original HunyuanVideo module, one to one.
HUNYUAN_VIDEO_TO_ORIGINAL = {
    "transformer_blocks.{i}.attn.to_out.0": "double_blocks.{i}.img_attn_proj",
    "transformer_blocks.{i}.attn.to_add_out": "double_blocks.{i}.txt_attn_proj",
    "transformer_blocks.{i}.norm1.linear": "double_blocks.{i}.img_mod.linear",
    "transformer_blocks.{i}.norm1_context.linear": "double_blocks.{i}.txt_mod.linear",
    "transformer_blocks.{i}.ff.net.0.proj": "double_blocks.{i}.img_mlp.fc1",
    "transformer_blocks.{i}.ff.net.2": "double_blocks.{i}.img_mlp.fc2",
    "transformer_blocks.{i}.ff_context.net.0.proj": "double_blocks.{i}.txt_mlp.fc1",
    "transformer_blocks.{i}.ff_context.net.2": "double_blocks.{i}.txt_mlp.fc2",
    "single_transformer_blocks.{i}.proj_out": "single_blocks.{i}.linear2",
    "single_transformer_blocks.{i}.norm.linear": "single_blocks.{i}.modulation.linear",
    "context_embedder.proj_in": "txt_in.input_embedder",
    "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
    "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.mlp.2",
    "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
    "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2",
    "context_embedder.token_refiner.refiner_blocks.{i}.attn.to_out.0":
        "txt_in.individual_token_refiner.blocks.{i}.self_attn_proj",
    "context_embedder.token_refiner.refiner_blocks.{i}.ff.net.0.proj":
        "txt_in.individual_token_refiner.blocks.{i}.mlp.fc1",
    "context_embedder.token_refiner.refiner_blocks.{i}.ff.net.2": "txt_in.individual_token_refiner.blocks.{i}.mlp.fc2",
    "context_embedder.token_refiner.refiner_blocks.{i}.norm_out.linear":
        "txt_in.individual_token_refiner.blocks.{i}.adaLN_modulation.1",
    "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# The original final layer computes (shift, scale); diffusers' norm_out.linear computes (scale, shift).
HUNYUAN_VIDEO_SWAPPED = {"norm_out.linear"}


def _lookup(name, table):
    """table[template] for the template ``name`` matches, with its block index filled in."""
    for template, target in table.items():
        m = re.fullmatch(re.escape(template).replace(re.escape("{i}"), r"(\d+)"), name)
        if m:
            return target.replace("{i}", m[1]) if m.groups() else target
    raise KeyError(name)


def random_units(model, units, rank=4, alpha=None, seed=0, scale=0.1):
    """Random layers for groups of diffusers modules that share one lora_A (a fused original module).

    ``units``: list of tuples of module paths; ``rank`` and ``alpha`` may be callables of the unit index.
    """
    gen = torch.Generator().manual_seed(seed)
    table = dict(model.named_modules())
    layers = {}
    for i, unit in enumerate(units):
        r = rank(i) if callable(rank) else rank
        a = float(alpha(i) if callable(alpha) else (alpha if alpha is not None else r))
        A = torch.randn(r, table[unit[0]].in_features, generator=gen) * scale
        for path in unit:
            layers[path] = (A, torch.randn(table[path].out_features, r, generator=gen) * scale, a)
    return layers


def _fused_member(path):
    """(original fused module, row-block index, parts) for a diffusers module fed by a fused one, else None."""
    for original, members in HUNYUAN_VIDEO_FUSED.items():
        for j, member in enumerate(members):
            m = re.fullmatch(re.escape(member).replace(re.escape("{i}"), r"(\d+)"), path)
            if m:
                return original.replace("{i}", m[1]), j, tuple(x.replace("{i}", m[1]) for x in members)
    return None


def hunyuan_video_units(model, keep=lambda path: True):
    """The LoRA units of a HunyuanVideo transformer: the parts of a fused module together, the rest alone."""
    units, done = [], set()
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and keep(path) and path not in done:
            fused = _fused_member(path)
            units.append(fused[2] if fused else (path,))
            done.update(units[-1])
    return units


# --- Wan ----------------------------------------------------------------------


def _put_factors(tensors, key, A, B, alpha, style):
    """lora_A/lora_B with alpha / rank baked into A (diffusion-pipe), or lora_down/lora_up + .alpha (ComfyUI)."""
    if style == "lora_A":
        tensors[f"{key}.lora_A.weight"] = A * (alpha / A.shape[0])
        tensors[f"{key}.lora_B.weight"] = B.contiguous()
    else:
        tensors[f"{key}.lora_down.weight"] = A.contiguous()
        tensors[f"{key}.lora_up.weight"] = B.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(alpha)


def wan_original_name(path: str) -> str:
    return _lookup(path, WAN_TO_ORIGINAL)


def write_wan_peft(path, layers, with_alpha_metadata=True):
    """diffusers / PEFT (diffusers, finetrainers): ``transformer.blocks.0.attn1.to_q.lora_A.weight``."""
    write_peft(path, layers, prefix="transformer", with_alpha_metadata=with_alpha_metadata)


def write_wan_original(path, layers, style="lora_A", biases=None, extra=None):
    """ComfyUI / original Wan names under ``diffusion_model.``.

    ``style="lora_A"``: lora_A/lora_B with alpha / rank baked into A (diffusion-pipe, ai-toolkit);
    ``style="lora_down"``: lora_down/lora_up plus ``.alpha`` scalars.
    ``biases``: {diffusers path: bias delta}, written as ``<module>.diff_b``;
    ``extra``: {original key without prefix: tensor}, written as is (``.diff`` deltas, norm deltas).
    """
    tensors = {}
    for name, (A, B, alpha) in layers.items():
        _put_factors(tensors, f"diffusion_model.{wan_original_name(name)}", A, B, alpha, style)
    for name, bias in (biases or {}).items():
        tensors[f"diffusion_model.{wan_original_name(name)}.diff_b"] = bias.contiguous()
    for key, tensor in (extra or {}).items():
        tensors[f"diffusion_model.{key}"] = tensor.contiguous()
    save_file(tensors, str(path))


def write_wan_musubi(path, layers):
    """musubi-tuner: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``."""
    tensors = {}
    for name, (A, B, alpha) in layers.items():
        key = "lora_unet_" + wan_original_name(name).replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = A.contiguous()
        tensors[f"{key}.lora_up.weight"] = B.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora_wan"})


# --- HunyuanVideo -------------------------------------------------------------


def hunyuan_video_original(layers, biases=None):
    """{original module: (A, B with fused rows, alpha, bias or None)} from diffusers-named layers."""
    biases = biases or {}
    units, fused = {}, {}
    for name, (A, B, alpha) in layers.items():
        bias = biases.get(name)
        member = _fused_member(name)
        if member:
            fused.setdefault(member[0], [None] * len(member[2]))[member[1]] = (A, B, alpha, bias)
            continue
        if name in HUNYUAN_VIDEO_SWAPPED:
            B = torch.cat(B.chunk(2)[::-1])
            bias = None if bias is None else torch.cat(bias.chunk(2)[::-1])
        units[_lookup(name, HUNYUAN_VIDEO_TO_ORIGINAL)] = (A, B, alpha, bias)
    for original, parts in fused.items():
        if any(p is None for p in parts):
            raise ValueError(f"{original}: a fused module needs all of its parts")
        A, _, alpha, bias = parts[0]
        if not all(torch.equal(p[0], A) and p[2] == alpha for p in parts):
            raise ValueError(f"{original}: the parts of a fused module must share lora_A and alpha")
        bias = None if bias is None else torch.cat([p[3] for p in parts])
        units[original] = (A, torch.cat([p[1] for p in parts]), alpha, bias)
    return units


def write_hunyuan_video_peft(path, layers, with_alpha_metadata=True):
    """diffusers / PEFT (finetrainers, diffusers): ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``."""
    layers = {name: (A.clone(), B, alpha) for name, (A, B, alpha) in layers.items()}  # q/k/v share A
    write_peft(path, layers, prefix="transformer", with_alpha_metadata=with_alpha_metadata)


def write_hunyuan_video_original(path, layers, style="lora_A", prefix="diffusion_model", biases=None):
    """Original names (diffusion-pipe; musubi ``convert_lora.py --target other``).

    ``style="lora_A"``: lora_A/lora_B, alpha / rank baked into A; ``"lora_down"``: lora_down/lora_up + ``.alpha``.
    ``biases``: {diffusers path: bias delta} written as ``.diff_b``.
    """
    tensors = {}
    for original, (A, B, alpha, bias) in hunyuan_video_original(layers, biases).items():
        key = f"{prefix}.{original}"
        _put_factors(tensors, key, A, B, alpha, style)
        if bias is not None:
            tensors[f"{key}.diff_b"] = bias.contiguous()
    save_file(tensors, str(path))


def write_hunyuan_video_musubi(path, layers):
    """musubi-tuner default: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` + ``.alpha``."""
    tensors = {}
    for original, (A, B, alpha, _) in hunyuan_video_original(layers).items():
        key = "lora_unet_" + original.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = A.contiguous()
        tensors[f"{key}.lora_up.weight"] = B.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
