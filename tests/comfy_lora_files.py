"""LoRA files for ComfyUI's tiny models, in the layouts people publish, written from known tensors.

A ``Layer`` is one low-rank update of known (A, B, alpha) on rows of one ComfyUI weight key. The
writers give every layer a file name by a layout's naming (``names_*``) and write lora_down/lora_up
+ ``.alpha``, PEFT lora_A/lora_B with the alpha in the metadata, and so on. The names of the
diffusers layouts of Wan and HunyuanVideo come from the hand-written tables of ``video_lora_files``
(ground truth the library's ``klora.formats`` tables are checked against), HunyuanVideo's
original -> ComfyUI renames from ``HUNYUAN_VIDEO_TO_COMFY`` below; the UNet, FLUX and SD3 diffusers
names from ComfyUI's own diffusers key maps (what "ComfyUI maps it" means).

``expected_*`` recompute the K-LoRA rule from the layers (dense float64 deltas, top-K, the trimmed
mean): independent of ``klora.rule`` and ``klora.comfyui``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from video_lora_files import HUNYUAN_VIDEO_FUSED, HUNYUAN_VIDEO_TO_ORIGINAL, WAN_TO_ORIGINAL


@dataclass
class Layer:
    key: str  # ComfyUI weight key ("diffusion_model....weight")
    rows: tuple[int, int] | None  # the rows of the key it adapts; None: all
    A: torch.Tensor  # rank x in (flattened for convolutions)
    B: torch.Tensor  # rows x rank
    alpha: float | None  # None: no alpha anywhere (scale 1)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def module(self) -> str:
        return self.key[: -len(".weight")]

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B.double() @ self.A.double())

    def log_key(self, cut: bool) -> str:
        return f"{self.module}[{self.rows[0]}:{self.rows[1]}]" if cut else self.module


def targets(model, pattern: str, rows: dict | None = None) -> list[tuple[str, tuple | None]]:
    """(key, rows) of every 2-D+ denoiser weight whose key matches ``pattern``; ``rows``:
    {key: [(start, stop), ...]} cuts those keys into several layers."""
    out = []
    for key, value in model.state_dict().items():
        if key.startswith("diffusion_model.") and key.endswith(".weight") and value.dim() >= 2 \
                and re.search(pattern, key):
            for span in (rows or {}).get(key, [None]):
                out.append((key, span))
    return out


def random_layers(model, chosen, rank=4, alpha=None, seed=0, scale=0.1) -> list[Layer]:
    """Random factors for each (key, rows); ``rank``/``alpha`` may be callables of the index."""
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    layers = []
    for i, (key, span) in enumerate(chosen):
        weight = state[key]
        r = rank(i) if callable(rank) else rank
        a = alpha(i) if callable(alpha) else alpha
        out = weight.shape[0] if span is None else span[1] - span[0]
        A = torch.randn(r, math.prod(weight.shape[1:]), generator=gen) * scale
        B = torch.randn(out, r, generator=gen) * scale
        layers.append(Layer(key, span, A, B, None if a is None else float(a)))
    return layers


# --- names ------------------------------------------------------------------------

def names_comfy(layers, prefix="diffusion_model."):
    """ComfyUI's own generic names: ``diffusion_model.<path>`` (also ``lora_unet_<path with _>``)."""
    if prefix == "lora_unet_":
        return {id(l): "lora_unet_" + l.module.removeprefix("diffusion_model.").replace(".", "_") for l in layers}
    return {id(l): prefix + l.module.removeprefix("diffusion_model.") for l in layers}


def names_from_map(layers, diffusers_map, prefix="transformer."):
    """Names from a {diffusers weight key: ComfyUI target} map (ComfyUI's ``*_to_diffusers``)."""
    inverse = {}
    for name, target in diffusers_map.items():
        if not name.endswith(".weight"):
            continue
        if isinstance(target, str):
            inverse[(target, None)] = name[: -len(".weight")]
        elif target[1] is not None:
            start, length = target[1][1], target[1][2]
            inverse[(target[0], (start, start + length))] = name[: -len(".weight")]
        else:
            inverse[(target[0], None)] = name[: -len(".weight")]
    return {id(l): prefix + inverse[(l.key, l.rows)] for l in layers}


def _inverse_template(table: dict[str, str]):
    """original template -> diffusers template, as a lookup of a concrete original name."""
    patterns = [(re.compile(re.escape(o).replace(re.escape("{i}"), r"(\d+)") + "$"), d) for d, o in table.items()]

    def lookup(name):
        for pattern, target in patterns:
            m = pattern.match(name)
            if m:
                return target.replace("{i}", m[1]) if m.groups() else target
        raise KeyError(name)

    return lookup


def names_wan_diffusers(layers, prefix="transformer."):
    lookup = _inverse_template(WAN_TO_ORIGINAL)
    return {id(l): prefix + lookup(l.module.removeprefix("diffusion_model.")) for l in layers}


# Original HunyuanVideo module name parts -> ComfyUI's (supported_models.HunyuanVideo renames them on load).
HUNYUAN_VIDEO_TO_COMFY = (
    ("_attn_qkv", "_attn.qkv"), ("_attn_proj", "_attn.proj"), ("_mod.linear", "_mod.lin"),
    ("modulation.linear", "modulation.lin"), ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2"),
    ("t_embedder.mlp.0", "t_embedder.in_layer"), ("t_embedder.mlp.2", "t_embedder.out_layer"),
    ("c_embedder.linear_1", "c_embedder.in_layer"), ("c_embedder.linear_2", "c_embedder.out_layer"),
    ("time_in.mlp.0", "time_in.in_layer"), ("time_in.mlp.2", "time_in.out_layer"),
    ("guidance_in.mlp.0", "guidance_in.in_layer"), ("guidance_in.mlp.2", "guidance_in.out_layer"),
)


def hunyuan_video_comfy(original: str) -> str:
    for a, b in HUNYUAN_VIDEO_TO_COMFY:
        original = original.replace(a, b)
    return original


def hunyuan_video_originals(model) -> dict[str, str]:
    """{ComfyUI module: original module} for every original HunyuanVideo linear of ``model``."""
    modules = {k[: -len(".weight")].removeprefix("diffusion_model.") for k in model.state_dict() if k.endswith(".weight")}
    out = {}
    numbers = sorted({int(n) for m in modules for n in re.findall(r"\.(\d+)\.", m)} | {0})
    templates = list(HUNYUAN_VIDEO_TO_ORIGINAL.values()) + list(HUNYUAN_VIDEO_FUSED)
    for template in templates:
        for i in numbers:
            original = template.replace("{i}", str(i))
            if hunyuan_video_comfy(original) in modules:
                out[hunyuan_video_comfy(original)] = original
    return out


def hunyuan_video_rows(model) -> dict[str, list[tuple[int, int]]]:
    """{ComfyUI weight key: row ranges of its diffusers modules} for the fused HunyuanVideo weights."""
    state, out = model.state_dict(), {}
    for comfy_module, original in hunyuan_video_originals(model).items():
        template = next((t for t in HUNYUAN_VIDEO_FUSED if re.fullmatch(
            re.escape(t).replace(re.escape("{i}"), r"\d+"), original)), None)
        if template is None:
            continue
        key = f"diffusion_model.{comfy_module}.weight"
        out_features, in_features = state[key].shape
        sizes = [in_features] * 3 + ([out_features - 3 * in_features] if len(HUNYUAN_VIDEO_FUSED[template]) == 4 else [])
        edges = [0]
        for size in sizes:
            edges.append(edges[-1] + size)
        out[key] = list(zip(edges, edges[1:]))
    return out


def names_hunyuan_video_original(model, layers, prefix="diffusion_model."):
    originals = hunyuan_video_originals(model)
    if prefix == "lora_unet_":
        return {id(l): "lora_unet_" + originals[l.module.removeprefix("diffusion_model.")].replace(".", "_")
                for l in layers}
    return {id(l): prefix + originals[l.module.removeprefix("diffusion_model.")] for l in layers}


def names_hunyuan_video_diffusers(model, layers, prefix="transformer."):
    originals = hunyuan_video_originals(model)
    whole = _inverse_template(HUNYUAN_VIDEO_TO_ORIGINAL)
    rows = hunyuan_video_rows(model)
    out = {}
    for l in layers:
        original = originals[l.module.removeprefix("diffusion_model.")]
        for template, members in HUNYUAN_VIDEO_FUSED.items():
            m = re.fullmatch(re.escape(template).replace(re.escape("{i}"), r"(\d+)"), original)
            if m:  # a q, k, v (or MLP) layer of a fused weight: its rows say which
                out[id(l)] = prefix + members[rows[l.key].index(tuple(l.rows))].replace("{i}", m[1])
                break
        else:
            out[id(l)] = prefix + whole(original)
    return out


def swapped_in_diffusers(layer) -> bool:
    """Whether diffusers' module for this HunyuanVideo layer has its two output halves exchanged."""
    return layer.module == "diffusion_model.final_layer.adaLN_modulation.1"


def names_ltxv_diffusers(layers, prefix="transformer."):
    renames = (("patchify_proj", "proj_in"), ("adaln_single.", "time_embed."))
    out = {}
    for l in layers:
        name = l.module.removeprefix("diffusion_model.")
        for a, b in renames:
            name = name.replace(a, b)
        out[id(l)] = prefix + name
    return out


# --- writing ---------------------------------------------------------------------

def write(path, layers, names, style="lora_down", alpha_in="keys", swap=lambda layer: False, extra=None):
    """One LoRA file. ``style``: "lora_down" (lora_down/lora_up), "lora_A" (lora_A/lora_B), "old"
    (``<name>_lora.down``/``_lora.up``, the old diffusers attention-processor form); ``alpha_in``: "keys"
    (``.alpha`` tensors), "metadata" (a PEFT config in ``lora_adapter_metadata``), "baked" (alpha / rank
    folded into A, no alpha), "none"; ``swap(layer)``: exchange the halves of B (diffusers' final-layer
    order); ``extra``: more tensors, written as they are."""
    tensors = {}
    down, up = {"lora_down": ("lora_down.weight", "lora_up.weight"), "lora_A": ("lora_A.weight", "lora_B.weight"),
                "old": (None, None)}[style]
    for layer in layers:
        name = names[id(layer)]
        A, B = layer.A, layer.B
        if swap(layer):
            B = torch.cat(B.chunk(2)[::-1])
        if alpha_in == "baked":
            A = A * layer.scale
        if style == "old":
            tensors[f"{name}_lora.down.weight"] = A.clone()
            tensors[f"{name}_lora.up.weight"] = B.clone()
        else:
            tensors[f"{name}.{down}"] = A.clone()
            tensors[f"{name}.{up}"] = B.clone()
        if alpha_in == "keys" and layer.alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(layer.alpha)
    tensors.update(extra or {})
    metadata = {"format": "pt"}
    if alpha_in == "metadata":
        component = names[id(layers[0])].split(".")[0]
        modules = {names[id(l)].removeprefix(component + "."): l for l in layers}
        r0, a0 = layers[0].rank, layers[0].alpha if layers[0].alpha is not None else layers[0].rank
        exact = {m: f"^{re.escape(m)}$" for m in modules}  # PEFT patterns match name endings: make them exact
        config = {"r": r0, "lora_alpha": a0, "target_modules": sorted(modules),
                  "rank_pattern": {exact[m]: l.rank for m, l in modules.items() if l.rank != r0},
                  "alpha_pattern": {exact[m]: (l.alpha or l.rank) for m, l in modules.items()
                                    if (l.alpha or l.rank) != a0}}
        metadata["lora_adapter_metadata"] = json.dumps({f"{component}.{k}": v for k, v in config.items()})
    save_file(tensors, str(path), metadata=metadata)
    return path


def expected_weights(w0: dict, layers_and_strengths) -> dict:
    """W0 + sum(strength * scale * B @ A) on each layer's rows, in float64 (the truth to compare with)."""
    out = {k: v.double().clone() for k, v in w0.items()}
    for layers, strength in layers_and_strengths:
        for l in layers:
            target = out[l.key].view(out[l.key].shape[0], -1)
            start, stop = l.rows or (0, target.shape[0])
            target[start:stop] += strength * l.delta()
    return out


# --- the rule, recomputed ---------------------------------------------------------

def layer_stats(content: Layer, style: Layer) -> dict:
    k = content.rank * style.rank
    dc, ds = content.delta().abs().flatten(), style.delta().abs().flatten()
    return {"k": k, "content_topk_sum": float(torch.topk(dc, min(k, dc.numel())).values.sum()),
            "style_topk_sum": float(torch.topk(ds, min(k, ds.numel())).values.sum()),
            "ratio": float(dc.sum() / ds.sum())}


def expected_gamma(ratios) -> float:
    ratios = [r for r in ratios if 0 < r < math.inf]
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return sum(kept) / len(kept)


def expected_scale(progress, pattern, alpha, beta) -> float:
    value = alpha * progress + beta
    return value % alpha if pattern == "s*" else value


def expected_choice(stats, gamma, scale) -> str:
    return "content" if stats["content_topk_sum"] / gamma > stats["style_topk_sum"] * scale else "style"


def pair_stats(content_layers, style_layers, cut) -> dict[str, dict]:
    """{log key: stats} for the layers both LoRAs adapt (matched by key and rows)."""
    style = {(l.key, l.rows): l for l in style_layers}
    return {c.log_key(cut(c)): layer_stats(c, style[(c.key, c.rows)]) for c in content_layers
            if (c.key, c.rows) in style}


# --- the other methods, recomputed ------------------------------------------------

def energy(layer: Layer) -> float:
    """EST-LoRA's ||scale * B @ A||_F^2, in float64."""
    return float(layer.delta().square().sum())


def expected_est_choice(content_energy, style_energy, gamma, scale) -> str:
    return "content" if content_energy / gamma > style_energy * scale else "style"


def np_merged(content_layers, style_layers, mu, content_strength=1.0, style_strength=1.0) -> list[Layer]:
    """NP-LoRA's merge recomputed densely in float64, as ordinary low-rank layers.

    Where both adapt the same (key, rows): ``s_s dW_s + s_c dW_c (I - c V V^T)`` with V the right singular
    vectors of dW_s from a full ``torch.linalg.svd`` (those above 1e-6 of the largest singular value) and
    c = mu / (1 + mu) (1 for mu = inf); elsewhere each LoRA's own ``s dW``. Each merged delta is written as
    the factors of its own SVD (up = U S, down = V^T), cut at its rank bound, with no alpha."""
    c = 1.0 if math.isinf(mu) else mu / (1 + mu)
    style = {(l.key, l.rows): l for l in style_layers}
    content = {(l.key, l.rows): l for l in content_layers}
    out = []
    for place in list(content) + [p for p in style if p not in content]:
        c_layer, s_layer = content.get(place), style.get(place)
        if c_layer is not None and s_layer is not None:
            style_delta = s_layer.delta()
            _, singular, right = torch.linalg.svd(style_delta, full_matrices=False)
            V = right[singular > 1e-6 * singular[0]].T
            projector = torch.eye(V.shape[0], dtype=torch.float64) - c * V @ V.T
            merged = style_strength * style_delta + content_strength * c_layer.delta() @ projector
            rank = c_layer.rank + s_layer.rank
        else:
            layer = c_layer or s_layer
            merged = (content_strength if c_layer is not None else style_strength) * layer.delta()
            rank = layer.rank
        U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
        rank = min(rank, S.numel())
        up, down = (U[:, :rank] * S[:rank]).float().contiguous(), Vh[:rank].float().contiguous()
        out.append(Layer(place[0], place[1], down, up, None))
    return out
