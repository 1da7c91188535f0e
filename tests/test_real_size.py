"""The most used families at their real size, with real-dimension LoRAs in every common format.

Each denoiser is built on the meta device from its published transformer ``config.json`` (written out below, with
the checkpoint it comes from): the architecture is the real one, no weight memory is used. LoRAs with the real layer
shapes are written in each layout the family's files come in, from known factors (``real_size_files``; Wan and
HunyuanVideo reuse ``video_lora_files``), then go through the engine as a user's file does: ``loras.read`` (with its
file checks), ``loras.to_denoiser_adapter`` and ``loras.check_fits``. Checked for every file:

- the adapted modules are exactly the diffusers paths derived by hand from the original names (the tables in
  ``real_size_files`` / ``video_lora_files``, expanded over the real block counts), which are first checked to be
  exactly the model's linear layers;
- every factor fits its module, and the update PEFT will apply, ``alpha / r * lora_B @ lora_A`` with alpha from the
  adapter's config, equals ``alpha / rank * B @ A`` of the file on a random input (no real-size dense delta is formed).

One content/style pair per family (both Wan 2.2 experts with HIGH/LOW pairs) is attached with
``KLoRA(model_on_meta, ..., switching="adapters")``, the content LoRA on the first, a middle and the last block of
each kind and every layer outside the blocks: PEFT wraps exactly the real modules the LoRAs name, and the selection
log names real module paths, with statistics and choices equal to the rule recomputed in closed form from rank-1
factors (top-1 of ``s * b a^T`` is ``s * max|b| * max|a|``). Nothing is materialized: the statistics read the LoRA
tensors, and PEFT's copies into meta weights are no-ops.

Coverage: every linear layer of every model, in every format, except where a format itself covers less (musubi Wan:
the 400 block linears; attention-only musubi: 320). Factors are float32 of rank 1 (every 50th layer rank 2); the
largest file (Qwen-Image, 846 layers) is about 40 MB.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch

from klora import loras, pipelines
from lora_files import write_kohya, write_old_diffusers, write_peft
from real_size_files import (expand, flux2_units, layers_for, linears, probe_mismatches, qwen_image_linears,
                             sd3_kohya_units, sd3_linears, write_flux2_kohya, write_flux2_original, write_fused_kohya,
                             write_peft_alpha_keys, write_qwen_image_original)
from video_lora_files import (HUNYUAN_VIDEO_FUSED, HUNYUAN_VIDEO_TO_ORIGINAL, WAN_TO_ORIGINAL, hunyuan_video_units,
                              write_hunyuan_video_musubi, write_hunyuan_video_original, write_hunyuan_video_peft,
                              write_wan_musubi, write_wan_original, write_wan_peft)

# --- the real configurations: transformer/config.json of each published diffusers checkpoint --------------------

QWEN_IMAGE = dict(  # Qwen/Qwen-Image
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
_FLUX2_COMMON = dict(patch_size=1, in_channels=128, out_channels=None, attention_head_dim=128,
                     timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000,
                     eps=1e-6)
FLUX2 = {  # the block counts and widths also stand in Black Forest Labs' flux2 Klein4BParams / Klein9BParams
    "dev": dict(_FLUX2_COMMON, num_layers=8, num_single_layers=48, num_attention_heads=48,  # FLUX.2-dev
                joint_attention_dim=15360, guidance_embeds=True),
    "klein-4B": dict(_FLUX2_COMMON, num_layers=5, num_single_layers=20, num_attention_heads=24,  # FLUX.2-klein-4B
                     joint_attention_dim=7680, guidance_embeds=False),
    "klein-9B": dict(_FLUX2_COMMON, num_layers=8, num_single_layers=24, num_attention_heads=32,  # FLUX.2-klein-9B
                     joint_attention_dim=12288, guidance_embeds=False),
}
SD35_LARGE = dict(  # stabilityai/stable-diffusion-3.5-large
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm")
WAN_14B = dict(  # Wan-AI/Wan2.1-T2V-14B-Diffusers; Wan2.2-T2V-A14B-Diffusers transformer/ and transformer_2/ alike
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
WAN_21_I2V_14B = dict(WAN_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)  # Wan2.1-I2V-14B-480P-Diffusers
HUNYUAN_VIDEO = dict(  # hunyuanvideo-community/HunyuanVideo
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56))


def on_meta(class_name, config):
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, class_name)(**config)


@pytest.fixture(scope="module")
def qwen_image():
    return on_meta("QwenImageTransformer2DModel", QWEN_IMAGE)


@pytest.fixture(scope="module", params=list(FLUX2))
def flux2(request):
    return request.param, on_meta("Flux2Transformer2DModel", FLUX2[request.param])


@pytest.fixture(scope="module")
def klein_4b():
    return on_meta("Flux2Transformer2DModel", FLUX2["klein-4B"])


@pytest.fixture(scope="module")
def sd35_large():
    return on_meta("SD3Transformer2DModel", SD35_LARGE)


@pytest.fixture(scope="module")
def wan_14b():
    return on_meta("WanTransformer3DModel", WAN_14B)


@pytest.fixture(scope="module")
def wan_i2v_14b():
    return on_meta("WanTransformer3DModel", WAN_21_I2V_14B)


@pytest.fixture(scope="module")
def hunyuan_video():
    return on_meta("HunyuanVideoTransformer3DModel", HUNYUAN_VIDEO)


# --- the layers each family has, derived from the original names ------------------------------------------------

QWEN_IMAGE_ALL = qwen_image_linears(60)
SD35_LARGE_ALL = sd3_linears(38)
WAN_I2V_ONLY = r"(attn2\.add_[kv]_proj|image_embedder)"
WAN_T2V_ALL = expand([m for m in WAN_TO_ORIGINAL if not re.search(WAN_I2V_ONLY, m)], {"blocks.": 40})
WAN_I2V_ALL = expand(WAN_TO_ORIGINAL, {"blocks.": 40})
HUNYUAN_COUNTS = {"transformer_blocks.": 20, "single_transformer_blocks.": 40,
                  "context_embedder.token_refiner.refiner_blocks.": 2}
HUNYUAN_VIDEO_ALL = expand([m for parts in HUNYUAN_VIDEO_FUSED.values() for m in parts]
                           + list(HUNYUAN_VIDEO_TO_ORIGINAL), HUNYUAN_COUNTS)


def flux2_all(name):
    config = FLUX2[name]
    units = flux2_units(config["num_layers"], config["num_single_layers"], config["guidance_embeds"])
    return [m for parts in units.values() for m in parts]


@pytest.mark.parametrize("model, expected, count, billions", [
    ("qwen_image", QWEN_IMAGE_ALL, 60 * 14 + 6, 20.0),
    ("sd35_large", SD35_LARGE_ALL, 37 * 14 + 11 + 7, 8.1),
    ("wan_14b", WAN_T2V_ALL, 40 * 10 + 6, 14.0),
    ("wan_i2v_14b", WAN_I2V_ALL, 40 * 12 + 8, None),  # sold as 14B; k_img/v_img add 2.1B
    ("hunyuan_video", HUNYUAN_VIDEO_ALL, 20 * 14 + 40 * 6 + 2 * 7 + 13, 13.0),
])
def test_the_real_architectures_have_the_layers_derived_from_the_original_names(model, expected, count, billions,
                                                                                request):
    model = request.getfixturevalue(model)
    assert len(expected) == len(set(expected)) == count
    assert sorted(linears(model)) == sorted(expected)
    if billions:  # a wrong width or depth in the config would show here
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(billions * 1e9, rel=0.05)


@pytest.mark.parametrize("name, count, billions", [("dev", 8 * 12 + 48 * 2 + 11, 32.0),
                                                   ("klein-4B", 5 * 12 + 20 * 2 + 9, 4.0),
                                                   ("klein-9B", 8 * 12 + 24 * 2 + 9, 9.0)])
def test_the_real_flux2_architectures_have_the_layers_derived_from_the_bfl_names(name, count, billions):
    model = on_meta("Flux2Transformer2DModel", FLUX2[name])
    assert len(flux2_all(name)) == count
    assert sorted(linears(model)) == sorted(flux2_all(name))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(billions * 1e9, rel=0.05)


# --- conversion by the engine --------------------------------------------------------------------------------------


def rank(i):
    return 2 if i % 50 == 7 else 1


def alpha(i):
    """Mostly scale 2; a few layers with their own alpha (a per-module alpha_pattern in PEFT terms)."""
    return 0.5 if i % 97 == 3 else 2.0 * rank(i)


def convert(path, model, role="content LoRA"):
    """What the engine makes of a file on this model: (adapter, every warning and note it gives)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora = loras.read(Path(path), role)
        family = pipelines.family_of(model)
        adapter = loras.to_denoiser_adapter(lora, model, family)
        notes = loras.check_fits(adapter, model, lora.label, family, lora)
    return adapter, [line.replace(str(path), "<file>") for line in [str(w.message) for w in caught] + notes]


def check_exact(path, model, layers, expected, biases=None, notes=()):
    """The file maps onto exactly ``expected`` with the file's own update; it says only the ``notes`` (regexes)."""
    adapter, said = convert(path, model)
    assert sorted(adapter.modules) == sorted(expected)
    assert probe_mismatches(adapter, {m: layers[m] for m in expected}, model, biases) == []
    assert len(said) == len(notes) and all(re.search(n, line) for n, line in zip(notes, said)), said
    return adapter


NO_ALPHA = r"no alpha"  # the file check's note where alpha / rank is baked into the factors


def with_alpha_rank(layers):
    """The same factors as a file without alphas reads them (alpha = rank)."""
    return {m: (A, B, float(A.shape[0])) for m, (A, B, _) in layers.items()}


# Qwen-Image: 846 layers; its non-diffusers files use the diffusers module names.

@pytest.fixture(scope="module")
def qwen_layers(qwen_image):
    return layers_for(qwen_image, [(m,) for m in QWEN_IMAGE_ALL], rank=rank, alpha=alpha, seed=0)


@pytest.mark.parametrize("layout", ["peft", "comfyui lora_down + alpha", "diffusion_model lora_A + alpha",
                                    "ai-toolkit lora_A, alpha baked", "kohya/musubi lora_unet_ + alpha"])
def test_qwen_image_files_map_onto_all_846_layers(layout, qwen_image, qwen_layers, tmp_path):
    path, layers, notes = tmp_path / "lora.safetensors", qwen_layers, ()
    if layout == "peft":
        write_peft(path, layers, prefix="transformer")
    elif layout == "comfyui lora_down + alpha":
        write_qwen_image_original(path, layers, style="lora_down")
    elif layout == "diffusion_model lora_A + alpha":
        write_qwen_image_original(path, layers, style="lora_A")
    elif layout == "ai-toolkit lora_A, alpha baked":
        write_qwen_image_original(path, layers, style="lora_A", alpha_keys=False)
        notes = (NO_ALPHA,)
    else:
        write_kohya(path, layers)  # lora_unet_transformer_blocks_0_attn_to_q, lora_unet_norm_out_linear, ...
    check_exact(path, qwen_image, layers, QWEN_IMAGE_ALL, notes=notes)


# FLUX.2: dev, klein 4B and klein 9B.

def flux2_layers(model, name, keep=lambda original: True, seed=0):
    config = FLUX2[name]
    units = {o: p for o, p in flux2_units(config["num_layers"], config["num_single_layers"],
                                          config["guidance_embeds"]).items() if keep(o)}
    return units, layers_for(model, units.values(), rank=rank, alpha=alpha, seed=seed)


@pytest.mark.parametrize("layout", ["peft", "ai-toolkit diffusion_model lora_A, alpha baked",
                                    "comfyui diffusion_model lora_down + alpha", "kohya lora_unet_ + alpha"])
def test_flux2_files_map_onto_every_layer_they_name(layout, flux2, tmp_path):
    name, model = flux2
    path, notes = tmp_path / "lora.safetensors", ()
    if layout == "peft":
        units, layers = flux2_layers(model, name)
        # q/k/v share one A here; a diffusers file holds a copy per module (safetensors stores no shared tensors)
        write_peft(path, {m: (A.clone(), B, a) for m, (A, B, a) in layers.items()}, prefix="transformer")
    elif layout == "kohya lora_unet_ + alpha":
        # diffusers' own kohya converter would drop the modulation, final and guidance layers with a log line
        units, layers = flux2_layers(model, name)
        write_flux2_kohya(path, layers, units)
    else:  # every BFL linear, the final modulation's (shift, scale) halves included
        units, layers = flux2_layers(model, name)
        if layout == "ai-toolkit diffusion_model lora_A, alpha baked":
            write_flux2_original(path, layers, units)
            notes = (NO_ALPHA,)
        else:  # diffusers alone sends these to its kohya converter, which keeps nothing of them
            write_flux2_original(path, layers, units, style="lora_down", alpha_keys=True)
    check_exact(path, model, layers, [m for parts in units.values() for m in parts], notes=notes)


def test_flux2_final_modulation_keeps_shift_and_scale_apart(klein_4b, tmp_path):
    units, layers = flux2_layers(klein_4b, "klein-4B", keep=lambda o: o == "final_layer.adaLN_modulation.1")
    write_flux2_original(tmp_path / "lora.safetensors", layers, units)
    check_exact(tmp_path / "lora.safetensors", klein_4b, layers, ["norm_out.linear"], notes=(NO_ALPHA,))


def test_flux2_kohya_layers_diffusers_does_not_map_are_not_dropped_silently(klein_4b, tmp_path):
    units, layers = flux2_layers(klein_4b, "klein-4B", keep=lambda o: o.startswith("double_blocks.0.")
                                 or "modulation" in o)
    write_flux2_kohya(tmp_path / "lora.safetensors", layers, units)
    adapter, said = convert(tmp_path / "lora.safetensors", klein_4b)
    mapped = sorted(adapter.modules) == sorted(layers)
    warned = any("modulation" in line for line in said)
    assert mapped or warned, f"{len(layers) - len(adapter.modules)} layers lost; said: {said}"


# SD3.5 Large: diffusers converts no other layout for SD3; the older diffusers naming still loads.

@pytest.fixture(scope="module")
def sd3_layers(sd35_large):
    return layers_for(sd35_large, [(m,) for m in SD35_LARGE_ALL], rank=rank, alpha=alpha, seed=0)


@pytest.mark.parametrize("layout", ["peft", "peft + .alpha keys", "peft without metadata", "old lora.down + alpha"])
def test_sd35_large_files_map_onto_all_536_layers(layout, sd35_large, sd3_layers, tmp_path):
    path, layers, notes = tmp_path / "lora.safetensors", sd3_layers, ()
    if layout == "peft":
        write_peft(path, layers, prefix="transformer")
    elif layout == "peft + .alpha keys":
        write_peft_alpha_keys(path, layers)
    elif layout == "peft without metadata":
        write_peft(path, layers, prefix="transformer", with_alpha_metadata=False)
        layers, notes = with_alpha_rank(layers), (NO_ALPHA,)
    else:
        write_old_diffusers(path, layers, prefix="transformer", with_alpha_keys=True)
    check_exact(path, sd35_large, layers, SD35_LARGE_ALL, notes=notes)


@pytest.fixture
def sd35_kohya_file(sd35_large, tmp_path):
    """kohya sd-scripts SD3 names (``lora_unet_joint_blocks_0_x_block_attn_qkv``): diffusers has no SD3 converter."""
    units = sd3_kohya_units(38)
    write_fused_kohya(tmp_path / "lora.safetensors", layers_for(sd35_large, units.values(), seed=1), units)
    return tmp_path / "lora.safetensors"


def test_an_sd35_kohya_file_is_refused_not_loaded_empty(sd35_large, sd35_kohya_file):
    with pytest.raises(loras.LoRAError):
        convert(sd35_kohya_file, sd35_large)


def test_the_sd35_kohya_refusal_says_what_the_file_is(sd35_large, sd35_kohya_file):
    with pytest.raises(loras.LoRAError) as refusal:
        convert(sd35_kohya_file, sd35_large)
    said = str(refusal.value).replace(str(sd35_kohya_file), "")  # the path holds this test's name
    assert re.search(r"kohya|joint_blocks", said), said


# Wan 2.1 14B / Wan 2.2 A14B (either expert).

@pytest.fixture(scope="module")
def wan_layers(wan_i2v_14b):
    """Layers of the I2V model: the T2V layers are a subset with the same shapes."""
    return layers_for(wan_i2v_14b, [(m,) for m in WAN_I2V_ALL], rank=rank, alpha=alpha, seed=0)


WAN_BLOCKS = [m for m in WAN_T2V_ALL if m.startswith("blocks.")]
WAN_ATTENTION = [m for m in WAN_BLOCKS if ".attn" in m]


@pytest.mark.parametrize("layout", ["peft", "comfyui lora_down + alpha", "diffusion-pipe lora_A, alpha baked",
                                    "comfyui + diff_b", "musubi lora_unet_ full", "musubi attention only"])
def test_wan_14b_files_map_onto_every_layer_they_name(layout, wan_14b, wan_layers, tmp_path):
    path, expected, biases, notes = tmp_path / "lora.safetensors", WAN_T2V_ALL, None, ()
    t2v = {m: wan_layers[m] for m in WAN_T2V_ALL}
    if layout == "peft":
        write_wan_peft(path, t2v)
    elif layout == "comfyui lora_down + alpha":  # also time_projection, head.head, text/time embeddings
        write_wan_original(path, t2v, style="lora_down")
    elif layout == "diffusion-pipe lora_A, alpha baked":
        write_wan_original(path, t2v, style="lora_A")
        notes = (NO_ALPHA,)
    elif layout == "comfyui + diff_b":
        gen = torch.Generator().manual_seed(9)
        biases = {m: torch.randn(wan_layers[m][1].shape[0], generator=gen) * 0.01 for m in WAN_T2V_ALL}
        write_wan_original(path, t2v, style="lora_down", biases=biases)
    elif layout == "musubi lora_unet_ full":  # all ten linears of every block: diffusers' own musubi converter
        expected = WAN_BLOCKS
        write_wan_musubi(path, {m: t2v[m] for m in expected})
    else:  # diffusers' musubi converter raises KeyError on these; klora.formats renames them first
        expected = WAN_ATTENTION
        write_wan_musubi(path, {m: t2v[m] for m in expected})
    check_exact(path, wan_14b, wan_layers, expected, biases, notes)


def test_a_wan21_i2v_lora_on_wan22_t2v_loads_the_t2v_layers_and_reports_the_image_layers(wan_14b, wan_i2v_14b,
                                                                                        wan_layers, tmp_path):
    write_wan_original(tmp_path / "i2v.safetensors", wan_layers, style="lora_down")
    check_exact(tmp_path / "i2v.safetensors", wan_i2v_14b, wan_layers, WAN_I2V_ALL)  # all 488 on its own model
    skipped = len(WAN_I2V_ALL) - len(WAN_T2V_ALL)
    assert skipped == 40 * 2 + 2  # k_img/v_img in every block, the image embedder's two linears
    check_exact(tmp_path / "i2v.safetensors", wan_14b, wan_layers, WAN_T2V_ALL,
                notes=(rf"\b{skipped}\b.*image-to-video",))


# HunyuanVideo: 547 layers; the original layout fuses q/k/v (and single blocks' q/k/v/MLP input in linear1).

@pytest.fixture(scope="module")
def hunyuan_layers(hunyuan_video):
    return layers_for(hunyuan_video, hunyuan_video_units(hunyuan_video), rank=rank, alpha=alpha, seed=0)


@pytest.mark.parametrize("layout", ["peft", "diffusion_model lora_A, alpha baked", "diffusion_model lora_down + alpha",
                                    "musubi lora_unet_ + alpha"])
def test_hunyuan_video_files_map_onto_all_547_layers(layout, hunyuan_video, hunyuan_layers, tmp_path):
    path, notes = tmp_path / "lora.safetensors", ()
    if layout == "peft":
        write_hunyuan_video_peft(path, hunyuan_layers)
    elif layout == "diffusion_model lora_A, alpha baked":  # single_blocks.N.linear1: 3 x 3072 + 12288 rows
        write_hunyuan_video_original(path, hunyuan_layers, style="lora_A")
        notes = (NO_ALPHA,)
    elif layout == "diffusion_model lora_down + alpha":
        write_hunyuan_video_original(path, hunyuan_layers, style="lora_down")
    else:
        write_hunyuan_video_musubi(path, hunyuan_layers)
    check_exact(path, hunyuan_video, hunyuan_layers, HUNYUAN_VIDEO_ALL, notes=notes)


# --- K-LoRA on the real architectures -------------------------------------------------------------------------------


def rank1_rule(content, style, progresses, pattern_alpha=1.5):
    """The K-LoRA choice per layer and progress, in closed form for rank-1 layers (K = 1 * 1).

    ``s * b a^T`` has top-1 |entry| ``s * max|b| * max|a|`` and L1 norm ``s * sum|b| * sum|a|``; gamma is the mean
    of the content/style L1 ratios without those at or above 3x the mean; pattern s* with beta = 0.85 alpha.
    """
    def top1_and_l1(layer):
        A, B, a = layer
        assert A.shape[0] == 1
        return a * float(B.abs().max() * A.abs().max()), a * float(B.abs().sum() * A.abs().sum())

    stats = {m: (top1_and_l1(content[m]), top1_and_l1(style[m])) for m in style}
    ratios = [c[1] / s[1] for c, s in stats.values()]
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    gamma = sum(kept) / len(kept)
    choices = {}
    for p in progresses:
        scale = (pattern_alpha * p + 0.85 * pattern_alpha) % pattern_alpha
        choices[p] = {m: "content" if c[0] / gamma > s[0] * scale else "style" for m, (c, s) in stats.items()}
    return {m: (c[0], s[0]) for m, (c, s) in stats.items()}, gamma, choices


PROGRESSES = (0.0, 0.2, 0.5, 0.9)


def attach(target, content, style, notes=(), **options):
    """KLoRA on a model on the meta device; besides PEFT's no-op copies into meta weights, only ``notes`` are said."""
    from klora.fusion import KLoRA

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        klora = KLoRA(target, content, style, switching="adapters", **options)
    said = [str(w.message) for w in caught if "copying from a non-meta parameter" not in str(w.message)]
    said = [line.replace(str(content), "<content>").replace(str(style), "<style>") for line in said]
    assert len(said) == len(notes) and all(re.search(n, line) for n, line in zip(notes, said)), said
    return klora


def some_blocks(units):
    """The units outside the blocks, and those of the first, a middle and the last block of each kind.

    Units are module paths or tuples of them (a fused original module). PEFT takes ~5 ms a layer to wrap, so the
    K-LoRA tests take a fifth of each model; ambiguous names stay in (the top-level ``proj_out`` and the single
    blocks' ``proj_out`` of HunyuanVideo, for instance), the full mapping is checked above.
    """
    def block(unit):
        m = re.match(r"(.*?blocks)\.(\d+)\.", unit if isinstance(unit, str) else unit[0])
        return (m[1], int(m[2])) if m else None

    last = {}
    for kind, i in filter(None, map(block, units)):
        last[kind] = max(last.get(kind, 0), i)
    return [u for u in units if block(u) is None or block(u)[1] in (0, last[block(u)[0]] // 2, last[block(u)[0]])]


def wrapped(model):
    from peft.tuners.lora import LoraLayer

    return sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))


def check_log(klora, model, content, style, prefix=""):
    """Selection log of one denoiser: real paths, the closed-form statistics and choices, the rest content-only."""
    log = klora.selection_log()
    real = {n for n, _ in model.named_modules()}
    ours = {k[len(prefix):]: v for k, v in log["layers"].items() if k.startswith(prefix)}
    assert set(ours) == set(style) <= real
    topk, gamma, choices = rank1_rule(content, style, PROGRESSES)
    for path, (content_top1, style_top1) in topk.items():
        assert ours[path]["k"] == 1
        assert ours[path]["content_topk_sum"] == pytest.approx(content_top1, rel=1e-4)
        assert ours[path]["style_topk_sum"] == pytest.approx(style_top1, rel=1e-4)
    gammas = log["gamma"] if isinstance(log["gamma"], dict) else {"": log["gamma"]}
    assert gammas[prefix.rstrip(".")] == pytest.approx(gamma, rel=1e-4)
    for p, want in choices.items():
        got = {k[len(prefix):]: v for k, v in klora.choices_at(p).items() if k.startswith(prefix)}
        assert got == want, p
    only = {k[len(prefix):]: v for k, v in log["only"].items() if k.startswith(prefix)}
    assert only == {m: "content" for m in content if m not in style}
    assert wrapped(model) == sorted(content)  # every layer either LoRA names, and nothing else


def detach(klora, *models):
    klora.detach()
    for model in models:
        assert wrapped(model) == []


@pytest.mark.slow
def test_klora_on_qwen_image_logs_the_real_module_paths(qwen_image, tmp_path):
    content = layers_for(qwen_image, [(m,) for m in some_blocks(QWEN_IMAGE_ALL)], alpha=2.0, seed=1)
    shared = ["transformer_blocks.0.attn.to_q", "transformer_blocks.29.attn.add_v_proj",
              "transformer_blocks.59.attn.to_out.0", "txt_in"]
    style = layers_for(qwen_image, [(m,) for m in shared], alpha=1.0, seed=2)
    write_qwen_image_original(tmp_path / "content.safetensors", content)
    write_kohya(tmp_path / "style.safetensors", style)
    klora = attach(qwen_image, tmp_path / "content.safetensors", tmp_path / "style.safetensors",
                   num_inference_steps=50)
    try:
        check_log(klora, qwen_image, content, style)
    finally:
        detach(klora, qwen_image)


@pytest.mark.slow
def test_klora_on_flux2_klein_logs_the_real_module_paths(klein_4b, tmp_path):
    config = FLUX2["klein-4B"]
    units = flux2_units(config["num_layers"], config["num_single_layers"], False)
    kept = set(some_blocks(list(units.values())))
    units = {o: p for o, p in units.items() if p in kept}
    content = layers_for(klein_4b, units.values(), alpha=2.0, seed=1)
    style_units = {o: units[o] for o in ("double_blocks.0.img_attn.qkv", "double_blocks.4.txt_attn.proj")}
    style = layers_for(klein_4b, style_units.values(), alpha=1.0, seed=2)
    write_flux2_original(tmp_path / "content.safetensors", content, units)  # ai-toolkit: alpha baked into A
    write_flux2_kohya(tmp_path / "style.safetensors", style, style_units)
    klora = attach(klein_4b, tmp_path / "content.safetensors", tmp_path / "style.safetensors", notes=(NO_ALPHA,),
                   num_inference_steps=4)
    try:
        check_log(klora, klein_4b, content, style)
    finally:
        detach(klora, klein_4b)


@pytest.mark.slow
def test_klora_on_sd35_large_logs_the_real_module_paths(sd35_large, tmp_path):
    content = layers_for(sd35_large, [(m,) for m in some_blocks(SD35_LARGE_ALL)], alpha=2.0, seed=1)
    shared = ["transformer_blocks.0.attn.to_q", "transformer_blocks.18.attn.to_add_out",
              "transformer_blocks.37.attn.add_k_proj"]
    style = layers_for(sd35_large, [(m,) for m in shared], alpha=1.0, seed=2)
    write_peft(tmp_path / "content.safetensors", content, prefix="transformer")
    write_old_diffusers(tmp_path / "style.safetensors", style, prefix="transformer", with_alpha_keys=True)
    klora = attach(sd35_large, tmp_path / "content.safetensors", tmp_path / "style.safetensors",
                   num_inference_steps=28)
    try:
        check_log(klora, sd35_large, content, style)
    finally:
        detach(klora, sd35_large)


@pytest.mark.slow
def test_klora_on_wan22_a14b_logs_both_experts_with_their_own_pairs(wan_14b, tmp_path):
    """Wan 2.2 A14B: two experts of the 14B shape; HIGH/LOW pairs (content_2/style_2 go to transformer_2)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    high, low = wan_14b, copy.deepcopy(wan_14b)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=UniPCMultistepScheduler(flow_shift=5.0),
                       transformer=high, transformer_2=low, boundary_ratio=0.875)
    shared = ["blocks.0.attn1.to_q", "blocks.19.attn2.to_k", "blocks.39.attn2.to_out.0"]
    content = layers_for(high, [(m,) for m in some_blocks(WAN_T2V_ALL)], alpha=2.0, seed=1)
    style = layers_for(high, [(m,) for m in shared], alpha=1.0, seed=2)
    content_2 = layers_for(high, [(m,) for m in some_blocks(WAN_ATTENTION)], alpha=4.0, seed=3)
    style_2 = layers_for(high, [(m,) for m in shared[1:]], alpha=1.0, seed=4)
    write_wan_original(tmp_path / "content_high.safetensors", content, style="lora_down")
    write_wan_musubi(tmp_path / "style_high.safetensors", style)
    write_wan_musubi(tmp_path / "content_low.safetensors", content_2)
    write_wan_peft(tmp_path / "style_low.safetensors", style_2)
    klora = attach(pipe, tmp_path / "content_high.safetensors", tmp_path / "style_high.safetensors",
                   content_2=tmp_path / "content_low.safetensors", style_2=tmp_path / "style_low.safetensors")
    try:
        assert klora.selection_log()["denoisers"] == ["transformer", "transformer_2"]
        check_log(klora, high, content, style, prefix="transformer.")
        check_log(klora, low, content_2, style_2, prefix="transformer_2.")
    finally:
        detach(klora, high, low)


@pytest.mark.slow
def test_klora_on_hunyuan_video_logs_the_real_module_paths(hunyuan_video, tmp_path):
    units = some_blocks(hunyuan_video_units(hunyuan_video))
    content = layers_for(hunyuan_video, units, alpha=2.0, seed=1)
    # q/k/v from a fused qkv (double block, token refiner) and a plain layer; the single blocks' linear1 would add
    # a 12288 x 3072 proj_mlp, whose dense statistics alone take 0.6 GB
    firsts = ("transformer_blocks.0.attn.to_q", "context_embedder.token_refiner.refiner_blocks.1.attn.to_q",
              "transformer_blocks.19.attn.to_add_out")
    shared = [u for u in units if u[0] in firsts]
    style = layers_for(hunyuan_video, shared, alpha=1.0, seed=2)
    write_hunyuan_video_original(tmp_path / "content.safetensors", content, style="lora_down")
    write_hunyuan_video_musubi(tmp_path / "style.safetensors", style)
    klora = attach(hunyuan_video, tmp_path / "content.safetensors", tmp_path / "style.safetensors",
                   num_inference_steps=30)
    try:
        check_log(klora, hunyuan_video, content, style)
    finally:
        detach(klora, hunyuan_video)
