"""FLUX LoRA files in the layouts people publish, written from known tensors.

A *unit* is one (A, B, alpha) as a file stores it. kohya and XLabs files fuse
projections: one unit's B rows feed several diffusers modules (q, k, v, and in
single blocks also the MLP input). The tables below are the BFL -> diffusers
layout of FLUX.1 written out by hand, so the ground truth (``truth``) does not
depend on diffusers' converters, which the code under test relies on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

# kohya names (lora_unet_double_blocks_<i>_<name>) -> modules of transformer_blocks.<i>, in B-row order.
KOHYA_DOUBLE = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn_proj": ["attn.to_out.0"],
    "img_mlp_0": ["ff.net.0.proj"],
    "img_mlp_2": ["ff.net.2"],
    "img_mod_lin": ["norm1.linear"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn_proj": ["attn.to_add_out"],
    "txt_mlp_0": ["ff_context.net.0.proj"],
    "txt_mlp_2": ["ff_context.net.2"],
    "txt_mod_lin": ["norm1_context.linear"],
}
# lora_unet_single_blocks_<i>_<name> -> modules of single_transformer_blocks.<i>.
KOHYA_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation_lin": ["norm.linear"],
}
# XLabs: double_blocks.<i>.processor.<name> and single_blocks.<i>.processor.<name>.
XLABS_DOUBLE = {
    "qkv_lora1": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "proj_lora1": ["attn.to_out.0"],
    "qkv_lora2": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "proj_lora2": ["attn.to_add_out"],
}
XLABS_SINGLE = {
    "qkv_lora": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "proj_lora": ["proj_out"],
}

ATTENTION = r"\.attn\.(to_q|to_k|to_v|to_out\.0)$"  # the 190-layer "q/k/v/out" LoRAs


@dataclass
class Unit:
    key: str  # name in the file, without the down/up suffix
    modules: list  # diffusers module paths fed by this unit, in B-row order
    A: torch.Tensor  # r x in
    B: torch.Tensor  # sum(out) x r
    alpha: float | None  # None: the file stores no alpha (scale 1)

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.A.shape[0]


def block_linears(transformer, pattern: str = r".") -> list[str]:
    """Linear layers inside the double and single blocks whose path matches ``pattern``."""
    return [name for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear) and re.match(r"(single_)?transformer_blocks\.", name)
            and re.search(pattern, name)]


def _random(shape, gen, scale, dtype):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def diffusers_units(transformer, modules, rank=4, alpha=None, seed=0, scale=0.1, dtype=torch.float32):
    """One unit per module; ``rank`` and ``alpha`` may be callables of the module index."""
    gen = torch.Generator().manual_seed(seed)
    table = dict(transformer.named_modules())
    units = []
    for i, name in enumerate(modules):
        r = rank(i) if callable(rank) else rank
        a = alpha(i) if callable(alpha) else alpha
        linear = table[name]
        units.append(Unit(name, [name], _random((r, linear.in_features), gen, scale, dtype),
                          _random((linear.out_features, r), gen, scale, dtype), a))
    return units


def fused_units(transformer, layout, rank=4, alpha=None, seed=0, scale=0.1, keep=None, dtype=torch.float32):
    """Units of a kohya (``layout="kohya"``) or XLabs (``"xlabs"``) file for every block.

    ``keep(name)`` filters the unit names (e.g. drop kohya's ``linear1``, whose
    split sizes diffusers hard-codes for the real FLUX.1 and a tiny model lacks).
    """
    gen = torch.Generator().manual_seed(seed)
    table = dict(transformer.named_modules())
    double, single = (KOHYA_DOUBLE, KOHYA_SINGLE) if layout == "kohya" else (XLABS_DOUBLE, XLABS_SINGLE)
    units = []
    for blocks, names, prefix in ((transformer.transformer_blocks, double, "transformer_blocks"),
                                  (transformer.single_transformer_blocks, single, "single_transformer_blocks")):
        kind = "double" if prefix == "transformer_blocks" else "single"
        for i in range(len(blocks)):
            for name, parts in names.items():
                if keep is not None and not keep(name):
                    continue
                modules = [f"{prefix}.{i}.{part}" for part in parts]
                in_features = table[modules[0]].in_features
                out_total = sum(table[m].out_features for m in modules)
                key = (f"lora_unet_{kind}_blocks_{i}_{name}" if layout == "kohya"
                       else f"{kind}_blocks.{i}.processor.{name}")
                units.append(Unit(key, modules, _random((rank, in_features), gen, scale, dtype),
                                  _random((out_total, rank), gen, scale, dtype),
                                  alpha if layout == "kohya" else None))
    return units


def truth(units, transformer) -> dict[str, tuple[torch.Tensor, int]]:
    """``{module: (dense update in float64, rank)}`` straight from the units."""
    table = dict(transformer.named_modules())
    result = {}
    for unit in units:
        row = 0
        for module in unit.modules:
            out = table[module].out_features
            B = unit.B[row:row + out].double()
            result[module] = (unit.scale * (B @ unit.A.double()), unit.A.shape[0])
            row += out
    return result


def probe_truth(units, transformer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``dW @ x`` per module without forming dW (for real-size layers)."""
    table = dict(transformer.named_modules())
    result = {}
    for unit in units:
        row, Ax = 0, unit.A.double() @ x.double()[: unit.A.shape[1]]
        for module in unit.modules:
            out = table[module].out_features
            result[module] = unit.scale * (unit.B[row:row + out].double() @ Ax)
            row += out
    return result


def write_diffusers(path, units, metadata=True, alpha_keys=False, prefix="transformer"):
    """diffusers / PEFT / ai-toolkit: ``transformer.<module>.lora_A.weight``.

    ``metadata``: alphas in a PEFT LoraConfig (what ``save_lora_weights`` writes);
    ``alpha_keys``: ai-toolkit style ``transformer.<module>.alpha`` scalars instead.
    """
    tensors = {}
    for u in units:
        tensors[f"{prefix}.{u.key}.lora_A.weight"] = u.A.contiguous()
        tensors[f"{prefix}.{u.key}.lora_B.weight"] = u.B.contiguous()
        if alpha_keys and u.alpha is not None:
            tensors[f"{prefix}.{u.key}.alpha"] = torch.tensor(float(u.alpha))
    info = {"format": "pt"}
    if metadata:
        ranks = {u.key: u.A.shape[0] for u in units}
        alphas = {u.key: (u.alpha if u.alpha is not None else u.A.shape[0]) for u in units}
        r0, a0 = units[0].A.shape[0], alphas[units[0].key]
        config = {"r": r0, "lora_alpha": a0, "target_modules": sorted(ranks),
                  "rank_pattern": {k: v for k, v in ranks.items() if v != r0},
                  "alpha_pattern": {k: v for k, v in alphas.items() if v != a0}}
        info["lora_adapter_metadata"] = json.dumps({f"{prefix}.{k}": v for k, v in config.items()})
    save_file(tensors, str(path), metadata=info)


def write_kohya(path, units):
    tensors = {}
    for u in units:
        tensors[f"{u.key}.lora_down.weight"] = u.A.contiguous()
        tensors[f"{u.key}.lora_up.weight"] = u.B.contiguous()
        if u.alpha is not None:
            tensors[f"{u.key}.alpha"] = torch.tensor(float(u.alpha))
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})


def write_xlabs(path, units):
    tensors = {}
    for u in units:
        tensors[f"{u.key}.down.weight"] = u.A.contiguous()
        tensors[f"{u.key}.up.weight"] = u.B.contiguous()
    save_file(tensors, str(path))


def expected_choices(content_truth, style_truth, pattern, alpha, beta, progress) -> dict[str, str]:
    """The K-LoRA rule recomputed from the ground truth (see KLORA_SPEC.md)."""
    shared = [m for m in content_truth if m in style_truth]
    ratios = [float(content_truth[m][0].abs().sum() / style_truth[m][0].abs().sum()) for m in shared]
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    gamma = sum(kept) / len(kept)
    scale = alpha * progress + beta
    if pattern == "s*":
        scale = scale % alpha
    choices = {}
    for m in shared:
        (dc, rc), (ds, rs) = content_truth[m], style_truth[m]
        k = rc * rs
        sc = float(torch.topk(dc.abs().flatten(), min(k, dc.numel())).values.sum())
        ss = float(torch.topk(ds.abs().flatten(), min(k, ds.numel())).values.sum())
        choices[m] = "content" if sc / gamma > ss * scale else "style"
    return choices


def expected_gamma(content_truth, style_truth) -> float:
    shared = [m for m in content_truth if m in style_truth]
    ratios = [float(content_truth[m][0].abs().sum() / style_truth[m][0].abs().sum()) for m in shared]
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return sum(kept) / len(kept)
