"""Writers for LoRA files in the formats users bring, plus the ground truth.

Each writer gets ``layers``: {diffusers module path: (A, B, alpha)} and writes
the same LoRA in one on-disk format. The tests recompute the K-LoRA rule from
these tensors directly, independently of ``klora``'s loading code.
"""

from __future__ import annotations

import json
import re

import torch
from safetensors.torch import save_file


def random_layers(model, module_paths, rank, alpha=None, seed=0, scale=0.05):
    """Random A (r x in) and B (out x r) for each named linear of ``model``."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    layers = {}
    for i, path in enumerate(module_paths):
        linear = modules[path]
        r = rank(i) if callable(rank) else rank
        a = alpha(i) if callable(alpha) else (alpha if alpha is not None else r)
        A = torch.randn(r, linear.in_features, generator=gen) * scale
        B = torch.randn(linear.out_features, r, generator=gen) * scale
        layers[path] = (A, B, float(a))
    return layers


def attention_linears(model):
    """to_q/to_k/to_v/to_out.0 module paths of a UNet (the paper's targets)."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and re.search(r"\.(to_q|to_k|to_v|to_out\.0)$", name)]


def delta(layer):
    A, B, alpha = layer
    return (alpha / A.shape[0]) * (B.double() @ A.double())


def write_peft(path, layers, prefix="unet", with_alpha_metadata=True):
    """Current diffusers/PEFT format: ``unet.<path>.lora_A.weight``; alpha in metadata."""
    tensors = {}
    for name, (A, B, _) in layers.items():
        tensors[f"{prefix}.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{prefix}.{name}.lora_B.weight"] = B.contiguous()
    metadata = {"format": "pt"}
    if with_alpha_metadata:
        ranks = {n: l[0].shape[0] for n, l in layers.items()}
        alphas = {n: l[2] for n, l in layers.items()}
        r0 = next(iter(ranks.values()))
        a0 = next(iter(alphas.values()))
        config = {"r": r0, "lora_alpha": a0, "target_modules": sorted(layers),
                  "rank_pattern": {n: r for n, r in ranks.items() if r != r0},
                  "alpha_pattern": {n: a for n, a in alphas.items() if a != a0}}
        metadata["lora_adapter_metadata"] = json.dumps({f"{prefix}.{k}": v for k, v in config.items()})
    save_file(tensors, str(path), metadata=metadata)


def write_old_diffusers(path, layers, prefix="unet", with_alpha_keys=False):
    """Older diffusers naming: ``<path>.lora.down.weight`` / ``.lora.up.weight``.

    ``prefix="unet.unet"`` reproduces what the paper's own training script wrote.
    """
    tensors = {}
    for name, (A, B, alpha) in layers.items():
        tensors[f"{prefix}.{name}.lora.down.weight"] = A.contiguous()
        tensors[f"{prefix}.{name}.lora.up.weight"] = B.contiguous()
        if with_alpha_keys:
            tensors[f"{prefix}.{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))


def write_kohya(path, layers, name_map=None):
    """kohya / A1111: ``lora_unet_<path with _>.lora_down.weight`` plus ``.alpha``."""
    tensors = {}
    for name, (A, B, alpha) in layers.items():
        mapped = name_map(name) if name_map else name
        key = "lora_unet_" + mapped.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = A.contiguous()
        tensors[f"{key}.lora_up.weight"] = B.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})


def sgm_name(unet_config):
    """Map a diffusers UNet module path to the original SDXL (sgm) block name."""
    per_down = unet_config["layers_per_block"]

    def mapped(name):
        m = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name)
        if m:
            i, j, rest = int(m[1]), int(m[2]), m[3]
            return f"input_blocks.{1 + i * (per_down + 1) + j}.1.{rest}"
        m = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name)
        if m:
            i, j, rest = int(m[1]), int(m[2]), m[3]
            return f"output_blocks.{i * (per_down + 1) + j}.1.{rest}"
        m = re.match(r"mid_block\.attentions\.0\.(.*)", name)
        if m:
            return f"middle_block.1.{m[1]}"
        raise ValueError(name)

    return mapped
