"""LoRA files that diffusers 0.42.1 cannot read, or reads wrongly, rewritten so that it reads them exactly; and
the full-weight parts of any LoRA file, taken out for K-LoRA to apply itself.

``split_full_parts(tensors, loader)`` runs first. Full-weight parts are deltas of whole parameters rather than
low-rank factors: ``.diff`` (a weight), ``.diff_b`` (a bias), ``.w_norm`` / ``.b_norm`` (a norm's weight and bias).
musubi-tuner, ai-toolkit and ComfyUI's trainer write them (norms, modulation tables, biases, the patch embedding),
ComfyUI's loader adds each one to its parameter, and diffusers' converters drop most of them with at most a log
line. They come out of the file named for the denoiser: original Wan and HunyuanVideo names (read against the
tables ``WAN_MODULES`` + ``WAN_OTHER_MODULES`` + ``WAN_PARAMETERS`` and ``HUNYUAN_VIDEO_MODULES`` +
``HUNYUAN_VIDEO_OTHER_MODULES``) for ``klora.loras`` to rename with diffusers' own checkpoint converters; FLUX.1 in
Black Forest Labs' or kohya names through the table ``_FLUX1`` (fused q, k, v rows cut, final modulation halves
swapped); anything else as the file names it, for a direct look-up in the denoiser. All-zero parts are left out (the
zeroed norm deltas of distilled LoRAs change nothing). A Wan or HunyuanVideo ``diff_b`` on a layer the file also
gives factors stays with them: diffusers turns it into that layer's ``lora_B.bias``.

``prepare(tensors, loader, label)`` runs right before ``<Pipeline>.lora_state_dict(tensors)``. It renames keys
(and folds ``alpha / rank`` where diffusers ignores it) so that diffusers' own converters do the conversion; it does
not replace them. Families other than Wan, HunyuanVideo and FLUX.2 pass through unchanged.

Wan (``WanLoraLoaderMixin``; SkyReels-V2 and Helios use the same converters):

- musubi-tuner files (``lora_unet_blocks_0_self_attn_q.lora_down.weight`` + ``.alpha``): diffusers' musubi converter
  needs all ten linears of every block 0..n-1 and raises ``KeyError`` on attention-only or block-subset files. Files
  it accepts pass through; the others are renamed to the original Wan names
  (``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` + ``.alpha``), which the non-diffusers converter takes
  in any subset. Names are read against the table ``WAN_MODULES``, never by a blind ``_`` -> ``.`` replace.
- Original/ComfyUI names: diffusers ignores ``.alpha`` outside the blocks (``time_projection``, ``head.head``,
  ``text_embedding``, ``time_embedding``, ``img_emb``) and then raises; those alphas are folded into the factors.
  Diffusers scales cross-attention and FFN factors in place (``*=``), which would change the caller's tensors:
  those are copied first.
- What is left that diffusers would drop (full parts reach ``prepare`` only when it is called on a whole file)
  is **loaded with a warning** that names how many changes are not applied and which layers they belong to. A file
  with no low-rank layer left is refused. ``diff_b`` of mapped linears stay: diffusers turns them into
  ``lora_B.bias``.

HunyuanVideo (``HunyuanVideoLoraLoaderMixin``): diffusers converts original names only with ``lora_A``/``lora_B``,
no ``.alpha``, and only when some key contains ``img_attn_qkv``. musubi-tuner files (``lora_unet_double_blocks_0_
img_attn_qkv.lora_down.weight`` + ``.alpha``) and original names with ``lora_down``/``lora_up`` + ``.alpha`` raise
"not enough values to unpack". They are rewritten to ``diffusion_model.<original module>.lora_A/lora_B.weight``
with ``alpha / rank`` folded in. Two layers diffusers converts wrongly are written in the form its converter passes
through: the token refiner's fused ``self_attn_qkv`` (diffusers splits lora_A along the rank) becomes three layers
sharing A, and ``final_layer.adaLN_modulation.1`` (diffusers swaps the halves of lora_A as well as of lora_B, a
silently wrong delta) becomes ``norm_out.linear`` with only B's (shift, scale) halves swapped. ``diff_b`` becomes
``lora_B.bias``; a ``.diff`` left in the file is dropped with the same warning as for Wan. A file without
``img_attn_qkv`` is converted here with diffusers' own converter, which ``lora_state_dict`` would skip.

Folding ``alpha / rank``: A takes ``alpha / rank * 2**k`` and B ``2**-k`` (k balances their magnitudes), so B stays
exact and A is rounded once, in its own dtype. ``prepare`` never changes the caller's dict or tensors. It raises
``klora.errors.LoRAError`` for musubi-tuner names that are no layer of the model, a layer with only one factor, and a
file with no low-rank layer.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from .errors import LoRAError

WAN_LOADERS = ("WanLoraLoaderMixin", "SkyReelsV2LoraLoaderMixin", "HeliosLoraLoaderMixin")
HUNYUAN_VIDEO_LOADERS = ("HunyuanVideoLoraLoaderMixin",)

# Every linear of the original Wan model (Wan2.1 repo, wan/modules/model.py) that diffusers'
# non-diffusers converter maps; {i} is a block index.
WAN_MODULES = (
    *(f"blocks.{{i}}.{attn}.{p}" for attn in ("self_attn", "cross_attn") for p in ("q", "k", "v", "o")),
    "blocks.{i}.cross_attn.k_img", "blocks.{i}.cross_attn.v_img",  # Wan 2.1 I2V only
    "blocks.{i}.ffn.0", "blocks.{i}.ffn.2",
    "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
    "head.head", "img_emb.proj.1", "img_emb.proj.3",
)
# The ten per-block linears diffusers' musubi converter requires in every block 0..n-1.
_MUSUBI_WAN_BLOCK = tuple(m.removeprefix("blocks.{i}.").replace(".", "_") for m in WAN_MODULES
                          if m.startswith("blocks.") and "_img" not in m)

# Every linear of the original HunyuanVideo model (HunyuanVideo repo, hyvideo/modules/models.py).
HUNYUAN_VIDEO_MODULES = (
    *(f"double_blocks.{{i}}.{s}_{m}" for s in ("img", "txt")
      for m in ("attn_qkv", "attn_proj", "mlp.fc1", "mlp.fc2", "mod.linear")),
    "single_blocks.{i}.linear1", "single_blocks.{i}.linear2", "single_blocks.{i}.modulation.linear",
    "txt_in.input_embedder", "txt_in.t_embedder.mlp.0", "txt_in.t_embedder.mlp.2",
    "txt_in.c_embedder.linear_1", "txt_in.c_embedder.linear_2",
    *(f"txt_in.individual_token_refiner.blocks.{{i}}.{m}"
      for m in ("self_attn_qkv", "self_attn_proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")),
    "time_in.mlp.0", "time_in.mlp.2", "guidance_in.mlp.0", "guidance_in.mlp.2",
    "vector_in.in_layer", "vector_in.out_layer", "img_in.proj",
    "final_layer.linear", "final_layer.adaLN_modulation.1",
)

# Every linear of the original FLUX.2 model (Black Forest Labs' flux2 repository, src/flux2/model.py).
FLUX2_MODULES = (
    *(f"double_blocks.{{i}}.{s}_{m}" for s in ("img", "txt") for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")),
    "single_blocks.{i}.linear1", "single_blocks.{i}.linear2",
    "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
    "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
    "final_layer.linear", "final_layer.adaLN_modulation.1",
)

# loader -> (regex over module paths inside the denoiser, without "transformer.", anchored so that re.search and
#            re.fullmatch agree; why those layers may be missing from a model the LoRA is otherwise fine for)
_WAN_OPTIONAL = (
    r"^(blocks\.\d+\.attn2\.(add_[kv]_proj|norm_added_k)|condition_embedder\.image_embedder\..+)$",
    "Wan 2.1 image-to-video layers (image cross-attention k_img/v_img, image embedder), "
    "which text-to-video and Wan 2.2 models do not have",
)
OPTIONAL_LAYERS: dict[str, tuple[str, str]] = {
    **{loader: _WAN_OPTIONAL for loader in WAN_LOADERS},
    "HunyuanVideoLoraLoaderMixin": (
        r"^time_text_embed\.guidance_embedder\..+$",
        "HunyuanVideo guidance embedder, which models built with guidance_embeds=False do not have",
    ),
}

_SUFFIX = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight"
                     r"|alpha|diff|diff_b|w_norm|b_norm|dora_scale)")
_DOWN = ("lora_A.weight", "lora_down.weight")
_UP = ("lora_B.weight", "lora_up.weight")


def prepare(tensors: dict[str, torch.Tensor], loader: str, label: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(tensors ready for ``loader``'s ``lora_state_dict``, one-line warnings starting with ``label``)."""
    if loader in WAN_LOADERS:
        return _prepare_wan(tensors, label)
    if loader in HUNYUAN_VIDEO_LOADERS:
        return _prepare_hunyuan_video(tensors, label)
    if loader == "Flux2LoraLoaderMixin":
        return _prepare_flux2(tensors, label), []
    return tensors, []


def _prepare_flux2(tensors, label):
    """FLUX.2 files in original (BFL) or kohya names reach diffusers' non-diffusers converter as
    ``diffusion_model.<BFL module>.lora_A/lora_B`` with alpha / rank folded in: its kohya converter
    drops the modulation, final and guidance layers with only a log line, it sends original-name
    lora_down/lora_up files to that kohya converter, and it raises on .alpha keys. BFL's final layer
    outputs (shift, scale) where diffusers' norm_out has (scale, shift): B's halves are swapped."""
    if any(k.startswith("lora_unet_") for k in tensors):
        kohya = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
        rest = {k: v for k, v in tensors.items() if not k.startswith("lora_unet_")}
        tensors = {**rest, **{f"diffusion_model.{k}": v
                              for k, v in _from_musubi(kohya, FLUX2_MODULES, "FLUX.2", label).items()}}
    if not any(k.startswith("diffusion_model.") for k in tensors):
        return tensors
    out = {k: v for k, v in tensors.items() if not k.startswith("diffusion_model.")}
    original = {k.removeprefix("diffusion_model."): v for k, v in tensors.items() if k.startswith("diffusion_model.")}
    for module, parts in _by_module(original).items():
        if module == "final_layer.adaLN_modulation.1":
            parts = {s: (torch.cat(t.chunk(2)[::-1]) if s in (*_UP, "diff_b") else t) for s, t in parts.items()}
        down, up = _pair(parts)
        alpha = parts.get("alpha")
        if down is None or up is None:
            out.update({f"diffusion_model.{module}.{s}": t for s, t in parts.items()})
            continue
        A, B = _fold(parts[down], parts[up], None if alpha is None else float(alpha))
        out[f"diffusion_model.{module}.lora_A.weight"], out[f"diffusion_model.{module}.lora_B.weight"] = A, B
        out.update({f"diffusion_model.{module}.{s}": t for s, t in parts.items()
                    if s not in (down, up, "alpha")})
    return out


# --- Wan -----------------------------------------------------------------------


def _prepare_wan(tensors, label):
    if any(k.startswith("diffusion_model.") for k in tensors):
        original = {k.removeprefix("diffusion_model."): v for k, v in tensors.items()}
    elif any(k.startswith("lora_unet_") for k in tensors):
        if _musubi_converter_accepts(tensors):
            return tensors, []
        original = _from_musubi(tensors, WAN_MODULES, "Wan", label)
    else:
        return tensors, []
    original, warnings = _drop_unapplied_wan(original, label)
    for module, parts in _by_module(original).items():
        if "alpha" not in parts:
            continue
        if module.startswith("blocks."):
            # diffusers multiplies these in place: give it our own copies, not the caller's tensors.
            for suffix in parts:
                original[f"{module}.{suffix}"] = parts[suffix].clone()
        else:  # diffusers ignores alpha outside the blocks, then raises on the leftover key
            down, up = _pair(parts)
            if down is not None and up is not None:
                A, B = _fold(parts[down], parts[up], float(original.pop(f"{module}.alpha")))
                original[f"{module}.{down}"], original[f"{module}.{up}"] = A, B
    return {f"diffusion_model.{k}": v for k, v in original.items()}, warnings


def _musubi_converter_accepts(tensors) -> bool:
    """Whether diffusers' musubi Wan converter reads this file: all ten linears of blocks 0..n-1, nothing else."""
    keys = set(tensors)
    blocks = {m[1] for k in keys if (m := re.match(r"lora_unet_blocks_(\d+)_", k))}
    modules = list(_MUSUBI_WAN_BLOCK)
    if any("k_img" in k for k in keys) and any("v_img" in k for k in keys):
        modules += ["cross_attn_k_img", "cross_attn_v_img"]
    expected = {f"lora_unet_blocks_{i}_{m}.{s}" for i in range(len(blocks)) for m in modules
                for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    return keys == expected


def _drop_unapplied_wan(original, label):
    """Remove what diffusers' Wan converter would drop; warn about the non-zero part of it."""
    linears = {m for m in _by_module(original) if _match(m, WAN_MODULES, ".")}
    has_time_projection = any(k.startswith("time_projection") and k.endswith(".weight") for k in original)
    is_i2v = any("k_img" in k for k in original) and any("v_img" in k for k in original)
    with_up = {m for m, parts in _by_module(original).items() if _pair(parts)[1] is not None}

    def applied(module, suffix):
        if module.startswith("time_projection") and not has_time_projection:
            return False  # diffusers drops every time_projection key when there is no weight
        if suffix == "diff_b":
            return (module in linears and (is_i2v or "_img" not in module)
                    and (module in with_up or not module.startswith("img_emb")))
        if suffix == "diff":  # diffusers turns this one into a LoRA with an identity lora_B
            return module == "head.head" and "head.head.diff_b" in original
        return suffix != "dora_scale"

    kept, dropped = {}, []
    for key, tensor in original.items():
        m = _SUFFIX.fullmatch(key)
        if m is None or applied(m[1], m[2]):
            kept[key] = tensor
        elif m[2] != "alpha" and bool(tensor.count_nonzero()):
            dropped.append(key)
    return kept, _refuse_or_warn(kept, dropped, label)


# --- HunyuanVideo --------------------------------------------------------------


def _prepare_hunyuan_video(tensors, label):
    musubi = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
    original = _from_musubi(musubi, HUNYUAN_VIDEO_MODULES, "HunyuanVideo", label)
    others = {}
    for key, tensor in tensors.items():
        if key in musubi:
            continue
        prefix = next((p for p in ("diffusion_model.", "transformer.") if key.startswith(p)), "")
        m = _SUFFIX.fullmatch(key.removeprefix(prefix))
        if prefix and m and _match(m[1], HUNYUAN_VIDEO_MODULES, "."):
            original[key.removeprefix(prefix)] = tensor
        else:
            others[key] = tensor  # diffusers names (or unknown ones): diffusers reads them as they are
    if not original:
        return tensors, []

    rewritten, dropped = dict(others), []
    for module, parts in _by_module(original).items():
        down, up = _pair(parts)
        if (down is None) != (up is None):
            raise LoRAError(f"{label}: layer '{module}' has only one of its two LoRA factors")
        A = B = None
        if down is not None:
            alpha = parts.get("alpha")
            A, B = _fold(parts[down], parts[up], None if alpha is None else float(alpha))
        dropped += [f"{module}.{s}" for s in ("diff", "dora_scale") if s in parts and parts[s].count_nonzero()]
        for name, (a, b, c) in _hunyuan_video_layers(module, A, B, parts.get("diff_b")).items():
            for suffix, tensor in (("lora_A.weight", a), ("lora_B.weight", b), ("lora_B.bias", c)):
                if tensor is not None:
                    rewritten[f"diffusion_model.{name}.{suffix}"] = tensor
    warnings = _refuse_or_warn(rewritten, dropped, label)
    if not any("img_attn_qkv" in k for k in rewritten):
        # lora_state_dict converts only files with img_attn_qkv; do what it would do.
        from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

        rewritten = _convert_hunyuan_video_lora_to_diffusers(rewritten)
    return rewritten, warnings


def _hunyuan_video_layers(module, A, B, bias):
    """{name diffusers' converter maps exactly: (lora_A, lora_B, lora_B bias)} for one original module."""
    refiner_qkv = re.fullmatch(r"(txt_in\.individual_token_refiner\.blocks\.\d+)\.self_attn_qkv", module)
    if refiner_qkv:  # diffusers would chunk lora_A too; these names pass its converter as they are
        Bs = B.chunk(3) if B is not None else (None,) * 3
        biases = bias.chunk(3) if bias is not None else (None,) * 3
        return {f"{refiner_qkv[1]}.attn.to_{p}": (A, b, c) for p, b, c in zip("qkv", Bs, biases)}
    if module == "final_layer.adaLN_modulation.1":
        # original output is (shift, scale), diffusers' norm_out.linear is (scale, shift): swap B's rows only.
        def swap(t):
            return None if t is None else torch.cat(t.chunk(2)[::-1])

        return {"norm_out.linear": (A, swap(B), swap(bias))}
    return {module: (A, B, bias)}


# --- full-weight parts ------------------------------------------------------------


# Suffixes of whole-parameter deltas and the parameter of their layer each one changes. ComfyUI's loader
# (comfy/lora.py) adds every one of them to that parameter, times the LoRA's strength; diffusers' converters
# drop most of them, so K-LoRA takes them out of the file first (``split_full_parts``) and applies them itself.
FULL_SUFFIXES = {"diff": "weight", "w_norm": "weight", "diff_b": "bias", "b_norm": "bias"}

# What full parts may change in the original models besides their linears (``WAN_MODULES``,
# ``HUNYUAN_VIDEO_MODULES``): norms with weights, the patch embedding, and Wan's modulation tables, which
# are parameters of their block rather than modules.
WAN_OTHER_MODULES = (
    "blocks.{i}.norm3", "blocks.{i}.cross_attn.norm_k_img", "patch_embedding", "img_emb.proj.0", "img_emb.proj.4",
    *(f"blocks.{{i}}.{attention}.{norm}" for attention in ("self_attn", "cross_attn") for norm in ("norm_q", "norm_k")),
)
WAN_PARAMETERS = ("blocks.{i}.modulation", "head.modulation")
HUNYUAN_VIDEO_OTHER_MODULES = (
    *(f"double_blocks.{{i}}.{s}_attn_{n}_norm" for s in ("img", "txt") for n in ("q", "k")),
    "single_blocks.{i}.q_norm", "single_blocks.{i}.k_norm",
    "txt_in.individual_token_refiner.blocks.{i}.norm1", "txt_in.individual_token_refiner.blocks.{i}.norm2",
)

# FLUX.1 in Black Forest Labs' names -> diffusers' FluxTransformer2DModel, for full parts (diffusers' FLUX
# converters map low-rank factors only). Rows: "same"; "thirds" (a fused q, k, v weight); "single" (a single
# block's linear1: q, k, v, then the 4x wider MLP input, so a seventh of the rows each for q, k, v); "swap"
# (BFL's final modulation is (shift, scale), diffusers' norm_out is (scale, shift)).
_FLUX1 = (
    ("double_blocks.{i}.img_attn.qkv", "transformer_blocks.{i}.attn.to_{q,k,v}", "thirds"),
    ("double_blocks.{i}.txt_attn.qkv", "transformer_blocks.{i}.attn.add_{q,k,v}_proj", "thirds"),
    ("double_blocks.{i}.img_attn.proj", "transformer_blocks.{i}.attn.to_out.0", "same"),
    ("double_blocks.{i}.txt_attn.proj", "transformer_blocks.{i}.attn.to_add_out", "same"),
    ("double_blocks.{i}.img_mlp.0", "transformer_blocks.{i}.ff.net.0.proj", "same"),
    ("double_blocks.{i}.img_mlp.2", "transformer_blocks.{i}.ff.net.2", "same"),
    ("double_blocks.{i}.txt_mlp.0", "transformer_blocks.{i}.ff_context.net.0.proj", "same"),
    ("double_blocks.{i}.txt_mlp.2", "transformer_blocks.{i}.ff_context.net.2", "same"),
    ("double_blocks.{i}.img_mod.lin", "transformer_blocks.{i}.norm1.linear", "same"),
    ("double_blocks.{i}.txt_mod.lin", "transformer_blocks.{i}.norm1_context.linear", "same"),
    ("double_blocks.{i}.img_attn.norm.query_norm", "transformer_blocks.{i}.attn.norm_q", "same"),
    ("double_blocks.{i}.img_attn.norm.key_norm", "transformer_blocks.{i}.attn.norm_k", "same"),
    ("double_blocks.{i}.txt_attn.norm.query_norm", "transformer_blocks.{i}.attn.norm_added_q", "same"),
    ("double_blocks.{i}.txt_attn.norm.key_norm", "transformer_blocks.{i}.attn.norm_added_k", "same"),
    ("single_blocks.{i}.linear1", "single_transformer_blocks.{i}.{attn.to_q,attn.to_k,attn.to_v,proj_mlp}",
     "single"),
    ("single_blocks.{i}.linear2", "single_transformer_blocks.{i}.proj_out", "same"),
    ("single_blocks.{i}.modulation.lin", "single_transformer_blocks.{i}.norm.linear", "same"),
    ("single_blocks.{i}.norm.query_norm", "single_transformer_blocks.{i}.attn.norm_q", "same"),
    ("single_blocks.{i}.norm.key_norm", "single_transformer_blocks.{i}.attn.norm_k", "same"),
    ("img_in", "x_embedder", "same"),
    ("txt_in", "context_embedder", "same"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1", "same"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2", "same"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1", "same"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2", "same"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1", "same"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2", "same"),
    ("final_layer.linear", "proj_out", "same"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear", "swap"),
)


@dataclass
class FullParts:
    """The full-weight parts of a LoRA file, each the delta of one whole parameter.

    ``original``: keyed by the parameter's name in the original model (Wan, HunyuanVideo), for the family's
    checkpoint converter to rename. ``named``: keyed by (layer or parameter path as diffusers names it, maybe
    with a prefix such as ``transformer.``; "weight" or "bias"), for a direct look-up in the denoiser.
    """

    original: dict[str, torch.Tensor] = field(default_factory=dict)
    named: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.original or self.named)


def split_full_parts(tensors: dict[str, torch.Tensor], loader: str) -> tuple[dict[str, torch.Tensor], FullParts]:
    """(the file without its full-weight parts, for ``prepare``; the full-weight parts).

    All-zero parts change nothing and are left out (distilled LoRAs ship zeroed norm deltas). A Wan or
    HunyuanVideo ``diff_b`` on a layer the same file gives low-rank factors stays in the file: diffusers
    turns it into that layer's ``lora_B.bias``. Never changes the caller's dict or tensors.
    """
    rest, parts = {}, FullParts()
    paired = {m[1] for key in tensors if (m := _SUFFIX.fullmatch(key)) and m[2] in _DOWN}
    video = loader in WAN_LOADERS or loader in HUNYUAN_VIDEO_LOADERS
    for key, tensor in tensors.items():
        m = _SUFFIX.fullmatch(key)
        if m is None or m[2] not in FULL_SUFFIXES or (video and m[2] == "diff_b" and m[1] in paired):
            rest[key] = tensor
            continue
        name, kind = m[1], FULL_SUFFIXES[m[2]]
        if not tensor.count_nonzero():
            continue
        if loader in WAN_LOADERS and (parameter := _original_parameter(name, kind, WAN_MODULES + WAN_OTHER_MODULES,
                                                                       WAN_PARAMETERS, ("diffusion_model.",))):
            parts.original[parameter] = tensor
        elif loader in HUNYUAN_VIDEO_LOADERS and (parameter := _original_parameter(
                name, kind, HUNYUAN_VIDEO_MODULES + HUNYUAN_VIDEO_OTHER_MODULES, (),
                ("diffusion_model.", "transformer."))):
            parts.original[parameter] = tensor
        elif loader == "FluxLoraLoaderMixin" and (mapped := _flux1_parts(name, kind, tensor)):
            parts.named.update(mapped)
        else:
            parts.named[name, kind] = tensor
    return rest, parts


def _original_parameter(name, kind, modules, parameters, prefixes) -> str | None:
    """The original model's parameter a full part in ``name`` (dotted or musubi's lora_unet_ form) changes."""
    if name.startswith("lora_unet_"):
        dotted, sep = name.removeprefix("lora_unet_"), "_"
    else:
        dotted, sep = next((name.removeprefix(p) for p in ("model.diffusion_model.", *prefixes)
                            if name.startswith(p)), name), "."
    if kind == "weight" and (parameter := _match(dotted, parameters, sep)) is not None:
        return parameter
    module = _match(dotted, modules, sep)
    return None if module is None else f"{module}.{kind}"


def _flux1_parts(name, kind, tensor) -> dict[tuple[str, str], torch.Tensor]:
    """{(diffusers layer, kind): delta} for a full part of FLUX.1 in BFL or kohya names; {} for other names."""
    if name.startswith("lora_unet_"):
        dotted, sep = name.removeprefix("lora_unet_"), "_"
    else:
        dotted, sep = next((name.removeprefix(p) for p in ("model.diffusion_model.", "diffusion_model.")
                            if name.startswith(p)), name), "."
    dotted = re.sub(rf"(query_norm|key_norm){re.escape(sep)}scale$", r"\1", dotted)  # RMSNorm's parameter
    for bfl, diffusers, rows in _FLUX1:
        m = re.fullmatch(_template_regex(bfl, sep), dotted)
        if m is None:
            continue
        target = diffusers.replace("{i}", m[1]) if m.groups() else diffusers
        if rows == "same":
            return {(target, kind): tensor}
        if rows == "swap":
            return {(target, kind): torch.cat(tensor.chunk(2)[::-1])}
        stem, choices, tail = re.fullmatch(r"(.*)\{(.+)\}(.*)", target).groups()
        names = [f"{stem}{choice}{tail}" for choice in choices.split(",")]
        size = tensor.shape[0] // 3 if rows == "thirds" else tensor.shape[0] // 7
        pieces = tensor.split([size] * (len(names) - 1) + [tensor.shape[0] - size * (len(names) - 1)])
        return {(n, kind): piece for n, piece in zip(names, pieces)}
    return {}


# --- shared ----------------------------------------------------------------------


def _template_regex(template: str, sep: str) -> str:
    return re.escape(template.replace(".", sep)).replace(re.escape("{i}"), r"(\d+)")


def _match(name: str, templates, sep: str) -> str | None:
    """The original (dotted) module name for ``name`` written with ``sep`` between parts, or None."""
    for template in templates:
        m = re.fullmatch(_template_regex(template, sep), name)
        if m:
            return template.replace("{i}", m[1]) if m.groups() else template
    return None


def _from_musubi(tensors, templates, family, label):
    """lora_unet_<module with _>.<suffix> -> <original module>.<suffix>."""
    out, unknown = {}, []
    for key, tensor in tensors.items():
        m = re.fullmatch(r"lora_unet_([^.]+)\.(.+)", key)
        module = m and _match(m[1], templates, "_")
        if module is None:
            unknown.append(key)
        else:
            out[f"{module}.{m[2]}"] = tensor
    if unknown:
        raise LoRAError(f"{label}: {len(unknown)} kohya/musubi-tuner key(s) name no layer of the original {family} "
                        f"model: {_summary(unknown)}")
    return out


def _by_module(original):
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in original.items():
        m = _SUFFIX.fullmatch(key)
        if m:
            modules.setdefault(m[1], {})[m[2]] = tensor
    return modules


def _pair(parts):
    down = next((s for s in _DOWN if s in parts), None)
    up = next((s for s in _UP if s in parts), None)
    return down, up


def _fold(down, up, alpha):
    """(A, B) with B @ A = alpha / rank * up @ down; powers of two keep both factors in range and B exact."""
    scale = 1.0 if alpha is None else alpha / down.shape[0]
    if scale == 1.0:
        return down, up
    k = round(-math.log2(abs(scale)) / 2) if scale else 0
    return (down.double() * (scale * 2.0 ** k)).to(down.dtype), (up.double() * 2.0 ** -k).to(up.dtype)


def _refuse_or_warn(kept, dropped, label):
    if not any(_SUFFIX.fullmatch(k) and _SUFFIX.fullmatch(k)[2] in _DOWN for k in kept):
        what = f" ({_summary(dropped)})" if dropped else ""
        raise LoRAError(f"{label}: has no low-rank LoRA layer (lora_A/lora_B or lora_down/lora_up){what}; "
                        "full weight deltas (.diff) cannot be applied as a LoRA")
    if not dropped:
        return []
    return [f"{label}: {len(dropped)} weight change(s) a LoRA adapter cannot hold are not applied "
            f"(full weight deltas .diff, biases of unmapped layers, DoRA scales): {_summary(dropped)}"]


def _summary(names, limit=8) -> str:
    """'blocks.*.self_attn.k.diff (30), patch_embedding.diff': block indices folded, most frequent first."""
    counts = Counter(re.sub(r"(?<=blocks[._])\d+", "*", n) for n in names)
    parts = [f"{n} ({c})" if c > 1 else n for n, c in counts.most_common(limit)]
    return ", ".join(parts) + (f", ... ({len(counts) - limit} more)" if len(counts) > limit else "")



# --- ComfyUI: module names its LoRA key map lacks ---------------------------------
#
# ComfyUI (0.3.64) maps a LoRA file's module names to its own weight keys with
# ``comfy.lora.model_lora_keys_unet``. For Wan, HunyuanVideo and LTX-Video it maps only the original
# (non-diffusers) names, and for the UNet models only the old attention-processor form of diffusers
# names (``attn1.processor.to_q``), not the PEFT form (``attn1.to_q``). The tables below give the
# original module for each diffusers module of those families; ``klora.comfyui`` turns an original
# module into ComfyUI's key (ComfyUI keeps Wan's and LTX-Video's original names and renames
# HunyuanVideo's with its own ``process_unet_state_dict``) and adds the entry to the key map, so that
# ComfyUI's own loader reads the file. A key-map entry can also name rows of a weight, which is how a
# diffusers q, k or v layer lands on the fused qkv weight of the original HunyuanVideo model.

# diffusers module -> original Wan module (Wan2.1 repository, wan/modules/model.py); {i} is a block.
WAN_FROM_DIFFUSERS = {
    **{f"blocks.{{i}}.attn{n}.{d}": f"blocks.{{i}}.{attn}.{o}" for n, attn in ((1, "self_attn"), (2, "cross_attn"))
       for d, o in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"), ("norm_q", "norm_q"),
                    ("norm_k", "norm_k"))},
    "blocks.{i}.attn2.add_k_proj": "blocks.{i}.cross_attn.k_img",
    "blocks.{i}.attn2.add_v_proj": "blocks.{i}.cross_attn.v_img",
    "blocks.{i}.ffn.net.0.proj": "blocks.{i}.ffn.0",
    "blocks.{i}.ffn.net.2": "blocks.{i}.ffn.2",
    "blocks.{i}.norm2": "blocks.{i}.norm3",  # the affine norm before cross-attention
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "patch_embedding": "patch_embedding",
    "proj_out": "head.head",
}

# Rows of an original HunyuanVideo weight that one diffusers module is: "q", "k", "v" (each as many rows as
# the weight has inputs, in that order), "mlp" (the rows after q, k and v: single blocks' linear1),
# "swapped" (all rows, the two halves exchanged: the original final layer outputs (shift, scale),
# diffusers' norm_out (scale, shift)), or None (the whole weight as it is).
HUNYUAN_VIDEO_FROM_DIFFUSERS = {
    **{f"transformer_blocks.{{i}}.attn.{d}": (f"double_blocks.{{i}}.{side}_attn_qkv", rows)
       for side, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj")))
       for d, rows in zip(names, ("q", "k", "v"))},
    "transformer_blocks.{i}.attn.to_out.0": ("double_blocks.{i}.img_attn_proj", None),
    "transformer_blocks.{i}.attn.to_add_out": ("double_blocks.{i}.txt_attn_proj", None),
    "transformer_blocks.{i}.norm1.linear": ("double_blocks.{i}.img_mod.linear", None),
    "transformer_blocks.{i}.norm1_context.linear": ("double_blocks.{i}.txt_mod.linear", None),
    "transformer_blocks.{i}.ff.net.0.proj": ("double_blocks.{i}.img_mlp.fc1", None),
    "transformer_blocks.{i}.ff.net.2": ("double_blocks.{i}.img_mlp.fc2", None),
    "transformer_blocks.{i}.ff_context.net.0.proj": ("double_blocks.{i}.txt_mlp.fc1", None),
    "transformer_blocks.{i}.ff_context.net.2": ("double_blocks.{i}.txt_mlp.fc2", None),
    **{f"single_transformer_blocks.{{i}}.{d}": ("single_blocks.{i}.linear1", rows)
       for d, rows in (("attn.to_q", "q"), ("attn.to_k", "k"), ("attn.to_v", "v"), ("proj_mlp", "mlp"))},
    "single_transformer_blocks.{i}.proj_out": ("single_blocks.{i}.linear2", None),
    "single_transformer_blocks.{i}.norm.linear": ("single_blocks.{i}.modulation.linear", None),
    **{f"context_embedder.token_refiner.refiner_blocks.{{i}}.attn.to_{p}":
       ("txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv", p) for p in "qkv"},
    **{f"context_embedder.token_refiner.refiner_blocks.{{i}}.{d}": (f"txt_in.individual_token_refiner.blocks.{{i}}.{o}",
                                                                   None)
       for d, o in (("attn.to_out.0", "self_attn_proj"), ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2"),
                    ("norm_out.linear", "adaLN_modulation.1"))},
    "context_embedder.proj_in": ("txt_in.input_embedder", None),
    "context_embedder.time_text_embed.timestep_embedder.linear_1": ("txt_in.t_embedder.mlp.0", None),
    "context_embedder.time_text_embed.timestep_embedder.linear_2": ("txt_in.t_embedder.mlp.2", None),
    "context_embedder.time_text_embed.text_embedder.linear_1": ("txt_in.c_embedder.linear_1", None),
    "context_embedder.time_text_embed.text_embedder.linear_2": ("txt_in.c_embedder.linear_2", None),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.mlp.0", None),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.mlp.2", None),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.mlp.0", None),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.mlp.2", None),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", None),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", None),
    "x_embedder.proj": ("img_in.proj", None),
    "proj_out": ("final_layer.linear", None),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", "swapped"),
}

# diffusers LTX-Video renamed these parts of the original names (LTX-Video repository, the transformer).
LTX_VIDEO_FROM_DIFFUSERS = (("proj_in", "patchify_proj"), ("time_embed.", "adaln_single."),
                            (".norm_q", ".q_norm"), (".norm_k", ".k_norm"))

# LoRA module names are file keys without these endings (the parts ComfyUI's loader reads).
COMFY_KEY_ENDINGS = re.compile(
    r"\.(lora_A(?:\.default)?\.weight|lora_B(?:\.default)?\.weight|lora_B\.bias|lora_down\.weight|lora_up\.weight"
    r"|lora_mid\.weight|alpha|diff|diff_b|w_norm|b_norm|dora_scale|set_weight|reshape_weight)$")


def original_module(family: str, module: str) -> tuple[str, str | None] | None:
    """(original module, rows) for a diffusers module name of ``family`` ("wan", "hunyuan_video",
    "ltx_video"), or None when the name is not one of its diffusers modules. ``rows`` is one of
    ``HUNYUAN_VIDEO_FROM_DIFFUSERS``'s row kinds (always None for Wan and LTX-Video)."""
    if family == "wan":
        found = _lookup_template(module, WAN_FROM_DIFFUSERS)
        return None if found is None else (found, None)
    if family == "hunyuan_video":
        for template, (original, rows) in HUNYUAN_VIDEO_FROM_DIFFUSERS.items():
            m = re.fullmatch(_template_regex(template, "."), module)
            if m:
                return (original.replace("{i}", m[1]) if m.groups() else original), rows
        return None
    if family == "ltx_video":
        renamed = module
        for diffusers_part, original_part in LTX_VIDEO_FROM_DIFFUSERS:
            renamed = renamed.replace(diffusers_part, original_part)
        return renamed, None
    return None


def musubi_module(family: str, name: str) -> str | None:
    """The original module a kohya/musubi-tuner name (``double_blocks_0_img_mod_linear``, without
    ``lora_unet_``) is, for "hunyuan_video" and "wan"; None when it names none."""
    templates = {"hunyuan_video": HUNYUAN_VIDEO_MODULES, "wan": WAN_MODULES}.get(family)
    return None if templates is None else _match(name, templates, "_")


def fused_rows(rows: str, in_features: int, out_features: int) -> tuple[int, int]:
    """(first row, row count) of ``rows`` ("q", "k", "v", "mlp") in a fused weight of that shape."""
    if rows == "mlp":
        return 3 * in_features, out_features - 3 * in_features
    return "qkv".index(rows) * in_features, in_features


def _lookup_template(name: str, table: dict[str, str]) -> str | None:
    for template, target in table.items():
        m = re.fullmatch(_template_regex(template, "."), name)
        if m:
            return target.replace("{i}", m[1]) if m.groups() else target
    return None
