"""klora.formats: Wan and HunyuanVideo LoRA files diffusers cannot read, made readable, exactly.

Each test writes a LoRA in one published layout from known tensors (``video_lora_files``), runs
``prepare`` and then the family's own ``lora_state_dict``, loads the result into a tiny real
transformer with ``load_lora_adapter`` and reads back what PEFT applies, layer by layer:
``scaling * lora_B @ lora_A`` (float64) must equal the ground truth ``alpha / rank * B @ A``,
and the set of adapted layers must equal the set the file names.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from klora import formats
from klora.loras import LoRAError
from lora_files import delta, random_layers
from video_lora_files import (HUNYUAN_VIDEO_FUSED, HUNYUAN_VIDEO_TO_ORIGINAL, WAN_TO_ORIGINAL, hunyuan_video_units,
                              random_units, write_hunyuan_video_musubi, write_hunyuan_video_original,
                              write_hunyuan_video_peft, write_wan_musubi, write_wan_original, write_wan_peft)

WAN = "WanLoraLoaderMixin"
HUNYUAN = "HunyuanVideoLoraLoaderMixin"
LABEL = "style LoRA 'x.safetensors'"


def tiny_wan(i2v=True):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    extra = {"image_dim": 16, "added_kv_proj_dim": 24} if i2v else {}
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
                                 **extra).eval()


@pytest.fixture(scope="module")
def wan():
    """Wan 2.1 I2V layout (it has every layer a T2V model has, plus k_img/v_img and the image embedder)."""
    return tiny_wan(i2v=True)


@pytest.fixture(scope="module")
def hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_single_layers=2, num_refiner_layers=2, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)).eval()


def linears(model, pattern=r"."):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.search(pattern, n)]


WAN_ATTENTION = r"^blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
WAN_BLOCKS = r"^blocks\.\d+\.(attn1\.|attn2\.to_|ffn\.)"  # the ten per-block linears
# single_blocks.N.linear1: diffusers splits it with the real model's hidden size 3072 (too big for a tiny test)
def not_linear1(path):
    return not re.fullmatch(r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)", path)


def convert(pipeline_name, tensors, loader):
    """prepare + the family's lora_state_dict, as klora.loras does."""
    import diffusers

    ready, warnings = formats.prepare(tensors, loader, LABEL)
    return getattr(diffusers, pipeline_name).lora_state_dict(ready), warnings


def applied(model, state_dict, metadata=None):
    """{module: (scaling * B @ A, scaling * lora_B bias or None)} as PEFT holds them after loading."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        model.load_lora_adapter(dict(state_dict), prefix="transformer", adapter_name="probe", metadata=metadata)
        result = {}
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and "probe" in module.lora_A:
                s = module.scaling["probe"]
                A, B = module.lora_A["probe"].weight.detach().double(), module.lora_B["probe"].weight.detach().double()
                bias = module.lora_B["probe"].bias
                result[name] = (s * (B @ A), None if bias is None else s * bias.detach().double())
        return result
    finally:
        model.unload_lora()  # back to plain nn.Linear layers for the next test


def modules_in(state_dict):
    return {k.removeprefix("transformer.").split(".lora_")[0] for k in state_dict}


def assert_exact(got, layers, biases=None):
    """Every layer PEFT applies is a layer of the file, with exactly its delta (and bias)."""
    assert set(got) == set(layers)
    for name, layer in layers.items():
        want = delta(layer)
        torch.testing.assert_close(got[name][0], want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
        if biases and name in biases:
            torch.testing.assert_close(got[name][1], biases[name].double(), rtol=1e-6, atol=1e-9)


def read(path):
    return load_file(str(path))


# --- Wan -----------------------------------------------------------------------


def test_wan_peft_passes_through(wan, tmp_path):
    layers = random_layers(wan, linears(wan, WAN_BLOCKS), rank=lambda i: 2 + i % 3, alpha=lambda i: 1.0 + i % 4)
    write_wan_peft(tmp_path / "peft.safetensors", layers)
    tensors = read(tmp_path / "peft.safetensors")
    ready, warnings = formats.prepare(tensors, WAN, LABEL)
    assert ready is tensors and warnings == []
    from diffusers import WanPipeline

    with safe_open(str(tmp_path / "peft.safetensors"), framework="pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert_exact(applied(wan, WanPipeline.lora_state_dict(ready), metadata), layers)

    # Without alpha metadata the file says alpha = rank.
    layers = random_layers(wan, linears(wan, WAN_ATTENTION), rank=4, seed=1)
    write_wan_peft(tmp_path / "bare.safetensors", layers, with_alpha_metadata=False)
    sd, _ = convert("WanPipeline", read(tmp_path / "bare.safetensors"), WAN)
    assert_exact(applied(wan, sd), layers)


@pytest.mark.parametrize("style", ["lora_A", "lora_down"])
def test_wan_original_every_layer(wan, tmp_path, style):
    """ComfyUI/original names for every linear diffusers maps, Wan 2.1 I2V included, per-layer ranks and alphas."""
    layers = random_layers(wan, linears(wan), rank=lambda i: 2 + i % 4, alpha=lambda i: 0.5 + i % 5)
    write_wan_original(tmp_path / "o.safetensors", layers, style=style)
    if style == "lora_down":
        from diffusers import WanPipeline

        # diffusers folds .alpha only inside the blocks and then refuses the leftover head/embedding alphas
        with pytest.raises(ValueError, match="should be empty"):
            WanPipeline.lora_state_dict(read(tmp_path / "o.safetensors"))
    sd, warnings = convert("WanPipeline", read(tmp_path / "o.safetensors"), WAN)
    assert warnings == []
    assert modules_in(sd) == set(layers)
    assert_exact(applied(wan, sd), layers)


def test_wan_callers_tensors_are_not_scaled_in_place(wan, tmp_path):
    from diffusers import WanPipeline

    layers = random_layers(wan, linears(wan, WAN_BLOCKS), rank=4, alpha=2.0)
    write_wan_original(tmp_path / "o.safetensors", layers, style="lora_down")
    tensors = read(tmp_path / "o.safetensors")
    before = {k: v.clone() for k, v in tensors.items()}
    WanPipeline.lora_state_dict(dict(tensors))  # diffusers alone: cross-attention and FFN factors scaled in place
    assert any(not torch.equal(tensors[k], before[k]) for k in tensors)

    tensors = {k: v.clone() for k, v in before.items()}
    sd, _ = convert("WanPipeline", tensors, WAN)
    assert all(torch.equal(tensors[k], before[k]) for k in tensors)
    assert_exact(applied(wan, sd), layers)


def test_wan_musubi_full_goes_to_diffusers_musubi_converter(wan, tmp_path):
    layers = random_layers(wan, linears(wan, WAN_BLOCKS), rank=lambda i: 2 + i % 3, alpha=lambda i: 1.0 + i % 3)
    write_wan_musubi(tmp_path / "m.safetensors", layers)
    tensors = read(tmp_path / "m.safetensors")
    ready, warnings = formats.prepare(tensors, WAN, LABEL)
    assert ready is tensors and warnings == []
    from diffusers import WanPipeline

    assert_exact(applied(wan, WanPipeline.lora_state_dict(ready)), layers)


MUSUBI_SUBSETS = {
    "attention-only": WAN_ATTENTION,
    "block subset": r"^blocks\.1\.(attn1\.|attn2\.to_|ffn\.)",
    "q and v only": r"^blocks\.\d+\.attn[12]\.to_[qv]$",
    "I2V, every block linear": r"^blocks\.",
    "embeddings and head too": r".",
}


@pytest.mark.parametrize("subset", list(MUSUBI_SUBSETS))
def test_wan_musubi_subsets(wan, tmp_path, subset):
    from diffusers import WanPipeline

    layers = random_layers(wan, linears(wan, MUSUBI_SUBSETS[subset]), rank=lambda i: 2 + i % 3,
                           alpha=lambda i: 0.25 * (1 + i % 7))
    write_wan_musubi(tmp_path / "m.safetensors", layers)
    if subset != "I2V, every block linear":  # that one diffusers reads (k_img/v_img need all ten others)
        with pytest.raises((KeyError, IndexError)):
            WanPipeline.lora_state_dict(read(tmp_path / "m.safetensors"))
    sd, warnings = convert("WanPipeline", read(tmp_path / "m.safetensors"), WAN)
    assert warnings == []
    assert_exact(applied(wan, sd), layers)


def test_wan_diff_b_becomes_lora_bias(wan, tmp_path):
    """diffusers turns <module>.diff_b into <module>.lora_B.bias; PEFT adds it, scaled like the LoRA."""
    layers = random_layers(wan, linears(wan, WAN_ATTENTION), rank=4, alpha=2.0)
    gen = torch.Generator().manual_seed(3)
    table = dict(wan.named_modules())
    with_bias = ["blocks.0.attn1.to_q", "blocks.1.attn2.to_out.0", "blocks.0.ffn.net.2"]  # last one: bias only
    biases = {n: torch.randn(table[n].out_features, generator=gen) * 0.1 for n in with_bias}
    write_wan_original(tmp_path / "b.safetensors", layers, style="lora_down", biases=biases)
    sd, warnings = convert("WanPipeline", read(tmp_path / "b.safetensors"), WAN)
    assert warnings == []
    assert {k for k in sd if k.endswith(".lora_B.bias")} == {f"transformer.{n}.lora_B.bias" for n in with_bias}
    assert "transformer.blocks.0.ffn.net.2.lora_A.weight" not in sd  # bias alone: no factors
    got = applied(wan, sd)
    bias_only = got.pop("blocks.0.ffn.net.2")
    assert float(bias_only[0].abs().max()) == 0.0  # PEFT starts lora_B at zero, so the weight is untouched
    torch.testing.assert_close(bias_only[1], biases["blocks.0.ffn.net.2"].double())
    assert_exact(got, layers, biases)


def test_wan_full_weight_deltas_are_named_not_dropped_silently(wan, tmp_path):
    from diffusers import WanPipeline

    layers = random_layers(wan, linears(wan, WAN_ATTENTION), rank=4, alpha=4.0)
    gen = torch.Generator().manual_seed(4)
    table = dict(wan.named_modules())
    head = table["proj_out"]
    extra = {
        "blocks.0.self_attn.k.diff": torch.randn(24, 24, generator=gen),  # a linear's full delta: not applied
        "blocks.1.self_attn.k.diff": torch.randn(24, 24, generator=gen),
        "blocks.0.modulation.diff": torch.randn(1, 6, 24, generator=gen),  # not a linear: not applied
        "blocks.0.norm3.diff": torch.zeros(24),  # zeroed norm deltas lose nothing: no word about them
        "blocks.0.norm3.diff_b": torch.zeros(24),
        "head.head.diff": torch.randn(head.out_features, head.in_features, generator=gen) * 0.1,
        "head.head.diff_b": torch.randn(head.out_features, generator=gen) * 0.1,
        # biases diffusers drops: time_projection without a LoRA weight (AccVideo), img_emb without lora_up
        "time_projection.1.diff_b": torch.randn(144, generator=gen),
        "img_emb.proj.1.diff_b": torch.randn(16, generator=gen),
    }
    write_wan_original(tmp_path / "d.safetensors", layers, style="lora_down", extra=extra)

    plain = WanPipeline.lora_state_dict(read(tmp_path / "d.safetensors"))
    assert modules_in(plain) == set(layers) | {"proj_out"}  # diffusers: the other deltas vanish (info log)

    sd, warnings = convert("WanPipeline", read(tmp_path / "d.safetensors"), WAN)
    assert len(warnings) == 1 and warnings[0].startswith(LABEL)
    assert "5 weight change(s)" in warnings[0]
    for named in ("blocks.*.self_attn.k.diff (2)", "blocks.*.modulation.diff", "time_projection.1.diff_b",
                  "img_emb.proj.1.diff_b"):
        assert named in warnings[0]
    assert "norm3" not in warnings[0] and "head" not in warnings[0]
    got = applied(wan, sd)
    head_delta, head_bias = got.pop("proj_out")  # diffusers: head.head.diff -> a LoRA with identity lora_B
    torch.testing.assert_close(head_delta, extra["head.head.diff"].double())
    torch.testing.assert_close(head_bias, extra["head.head.diff_b"].double())
    assert_exact(got, layers)


def test_half_precision_files_keep_their_dtype(wan, tmp_path):
    layers = random_layers(wan, linears(wan, r"^(blocks\.0\.attn1|condition_embedder\.time_proj$)"), rank=4, alpha=1.0)
    write_wan_musubi(tmp_path / "m.safetensors", layers)
    tensors = {k: v.to(torch.bfloat16) for k, v in read(tmp_path / "m.safetensors").items()}
    ready, _ = formats.prepare(tensors, WAN, LABEL)
    assert {v.dtype for v in ready.values()} == {torch.bfloat16}
    sd, _ = convert("WanPipeline", tensors, WAN)
    for name, layer in layers.items():  # bf16 keeps 8 bits: the delta to bf16 precision
        A, B = sd[f"transformer.{name}.lora_A.weight"].double(), sd[f"transformer.{name}.lora_B.weight"].double()
        torch.testing.assert_close(B @ A, delta(layer), rtol=0.05, atol=0.02 * float(delta(layer).abs().max()))


def test_wan_file_of_only_full_deltas_is_refused(tmp_path):
    tensors = {"diffusion_model.blocks.0.self_attn.q.diff": torch.ones(24, 24),
               "diffusion_model.blocks.0.self_attn.q.diff_b": torch.ones(24)}
    with pytest.raises(LoRAError, match=r"^style LoRA 'x.safetensors': has no low-rank LoRA layer"):
        formats.prepare(tensors, WAN, LABEL)


def test_wan_unknown_musubi_layer_is_refused():
    tensors = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.ones(2, 24),
               "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.ones(24, 2),
               "lora_unet_blocks_0_modulation_x.lora_down.weight": torch.ones(2, 24),
               "lora_unet_blocks_0_modulation_x.lora_up.weight": torch.ones(24, 2)}
    message = r"^style LoRA 'x.safetensors': 2 kohya/musubi-tuner key\(s\).*blocks_\*_modulation_x"
    with pytest.raises(LoRAError, match=message):
        formats.prepare(tensors, WAN, LABEL)


def test_optional_layers_are_exactly_what_i2v_adds(wan, tmp_path):
    """The regex matches the converted k_img/v_img names and every layer an I2V model has and a T2V model lacks."""
    regex, description = formats.OPTIONAL_LAYERS[WAN]
    assert "k_img" in description
    t2v = set(linears(tiny_wan(i2v=False)))
    i2v = set(linears(wan))
    assert {n for n in i2v if re.fullmatch(regex, n)} == i2v - t2v
    assert not any(re.search(regex, n) for n in t2v)
    assert not re.search(regex, "transformer.blocks.0.attn2.add_k_proj")  # paths inside the denoiser only

    layers = random_layers(wan, linears(wan, r"attn2\.(to_k|add_k_proj|add_v_proj)$"), rank=2)
    write_wan_musubi(tmp_path / "i2v.safetensors", layers)
    sd, _ = convert("WanPipeline", read(tmp_path / "i2v.safetensors"), WAN)
    optional = {m for m in modules_in(sd) if re.fullmatch(regex, m)}
    assert optional == {f"blocks.{i}.attn2.add_{p}_proj" for i in (0, 1) for p in "kv"}


def test_hunyuan_video_optional_layers_are_the_guidance_embedder(hunyuan):
    from diffusers import HunyuanVideoTransformer3DModel

    regex, _ = formats.OPTIONAL_LAYERS[HUNYUAN]
    without = HunyuanVideoTransformer3DModel(**{**hunyuan.config, "guidance_embeds": False})
    with_guidance, no_guidance = set(linears(hunyuan)), set(linears(without))
    assert {n for n in with_guidance if re.search(regex, n)} == with_guidance - no_guidance
    assert not any(re.search(regex, n) for n in no_guidance)


def test_skyreels_v2_uses_the_wan_rules(wan, tmp_path):
    layers = random_layers(wan, linears(wan, WAN_ATTENTION), rank=3, alpha=1.5)
    write_wan_musubi(tmp_path / "m.safetensors", layers)
    wan_sd, _ = convert("WanPipeline", read(tmp_path / "m.safetensors"), WAN)
    sky_sd, _ = convert("SkyReelsV2Pipeline", read(tmp_path / "m.safetensors"), "SkyReelsV2LoraLoaderMixin")
    assert wan_sd.keys() == sky_sd.keys() and all(torch.equal(wan_sd[k], sky_sd[k]) for k in wan_sd)


def test_other_families_pass_through():
    tensors = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(1)}
    assert formats.prepare(tensors, "FluxLoraLoaderMixin", LABEL) == (tensors, [])
    assert formats.prepare(tensors, "FluxLoraLoaderMixin", LABEL)[0] is tensors


def test_name_tables_agree_and_underscore_names_are_unambiguous():
    """The module's original names are exactly the writers' (written independently), and no two
    templates collapse to the same musubi (underscore) name."""
    def instances(templates):
        return {t.replace("{i}", "3") for t in templates}

    assert instances(formats.WAN_MODULES) == instances(WAN_TO_ORIGINAL.values())
    hunyuan_writer = set(HUNYUAN_VIDEO_TO_ORIGINAL.values()) | set(HUNYUAN_VIDEO_FUSED)
    assert instances(formats.HUNYUAN_VIDEO_MODULES) - {"img_in.proj"} == instances(hunyuan_writer)
    for templates in (formats.WAN_MODULES, formats.HUNYUAN_VIDEO_MODULES):
        for name in instances(templates):
            underscored = name.replace(".", "_")
            hits = [t for t in templates if re.fullmatch(formats._template_regex(t, "_"), underscored)]
            assert len(hits) == 1, (underscored, hits)
            assert formats._match(underscored, templates, "_") == name


# --- HunyuanVideo ----------------------------------------------------------------


def hunyuan_layers(model, keep=not_linear1, seed=0):
    return random_units(model, hunyuan_video_units(model, keep), rank=lambda i: 2 + i % 3,
                        alpha=lambda i: 0.5 * (1 + i % 5), seed=seed)


def test_hunyuan_video_peft_passes_through(hunyuan, tmp_path):
    # PEFT names: single-block q/k/v are fine here. One rank and alpha for all: PEFT matches rank/alpha
    # patterns as name suffixes, and "norm_out.linear" / "proj_out" are suffixes of refiner / single-block layers.
    layers = random_units(hunyuan, hunyuan_video_units(hunyuan), rank=4, alpha=2.0)
    write_hunyuan_video_peft(tmp_path / "p.safetensors", layers)
    tensors = read(tmp_path / "p.safetensors")
    ready, warnings = formats.prepare(tensors, HUNYUAN, LABEL)
    assert ready is tensors and warnings == []
    from diffusers import HunyuanVideoPipeline

    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert_exact(applied(hunyuan, HunyuanVideoPipeline.lora_state_dict(ready), metadata), layers)


# PEFT also wraps the refiner's norm_out.linear: its target "norm_out.linear" matches as a name suffix.
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")
def test_hunyuan_video_diffusers_alone_splits_refiner_lora_a_and_scrambles_final_layer(hunyuan, tmp_path):
    from diffusers import HunyuanVideoPipeline

    refiner_qkv = HUNYUAN_VIDEO_FUSED["txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv"]
    units = [tuple(m.replace("{i}", "0") for m in refiner_qkv), ("norm_out.linear",), ("transformer_blocks.0.attn.to_q",
             "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v")]
    layers = random_units(hunyuan, units, rank=6, alpha=3.0)
    write_hunyuan_video_original(tmp_path / "o.safetensors", layers, style="lora_A")
    plain = HunyuanVideoPipeline.lora_state_dict(read(tmp_path / "o.safetensors"))
    refiner_q = "transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_q"
    assert plain[f"{refiner_q}.lora_A.weight"].shape[0] == 2  # rank 6 split in three, B keeps 6 columns
    assert plain[f"{refiner_q}.lora_B.weight"].shape[1] == 6
    plain = {k: v for k, v in plain.items() if "refiner" not in k}
    wrong = applied(hunyuan, plain)
    assert not torch.allclose(wrong["norm_out.linear"][0], delta(layers["norm_out.linear"]), atol=1e-4)
    to_k = "transformer_blocks.0.attn.to_k"  # the double-block qkv diffusers does split right
    torch.testing.assert_close(wrong[to_k][0], delta(layers[to_k]))

    sd, _ = convert("HunyuanVideoPipeline", read(tmp_path / "o.safetensors"), HUNYUAN)
    assert_exact(applied(hunyuan, sd), layers)


@pytest.mark.parametrize("prefix", ["diffusion_model", "transformer"])
def test_hunyuan_video_original_lora_a_b(hunyuan, tmp_path, prefix):
    layers = hunyuan_layers(hunyuan)
    write_hunyuan_video_original(tmp_path / "o.safetensors", layers, style="lora_A", prefix=prefix)
    sd, warnings = convert("HunyuanVideoPipeline", read(tmp_path / "o.safetensors"), HUNYUAN)
    assert warnings == []
    assert modules_in(sd) == set(layers)
    assert_exact(applied(hunyuan, sd), layers)


@pytest.mark.parametrize("writer", ["original lora_down + alpha", "musubi"])
def test_hunyuan_video_kohya_style_files(hunyuan, tmp_path, writer):
    from diffusers import HunyuanVideoPipeline

    layers = hunyuan_layers(hunyuan, seed=1)
    if writer == "musubi":
        write_hunyuan_video_musubi(tmp_path / "k.safetensors", layers)
    else:
        write_hunyuan_video_original(tmp_path / "k.safetensors", layers, style="lora_down")
    with pytest.raises((ValueError, RuntimeError)):  # "not enough values to unpack", or chunk() of an .alpha
        HunyuanVideoPipeline.lora_state_dict(read(tmp_path / "k.safetensors"))
    sd, warnings = convert("HunyuanVideoPipeline", read(tmp_path / "k.safetensors"), HUNYUAN)
    assert warnings == []
    assert_exact(applied(hunyuan, sd), layers)


def test_hunyuan_video_file_without_img_attn_qkv(hunyuan, tmp_path):
    """diffusers converts original names only when some key has img_attn_qkv; prepare converts the others."""
    from diffusers import HunyuanVideoPipeline

    layers = hunyuan_layers(hunyuan, keep=lambda p: p.startswith(("single_transformer_blocks", "context_embedder"))
                            and not_linear1(p), seed=2)
    write_hunyuan_video_musubi(tmp_path / "s.safetensors", layers)
    write_hunyuan_video_original(tmp_path / "s2.safetensors", layers, style="lora_A")
    plain = HunyuanVideoPipeline.lora_state_dict(read(tmp_path / "s2.safetensors"))
    assert not any(k.startswith("transformer.") for k in plain)  # left as is: nothing would load
    for name in ("s.safetensors", "s2.safetensors"):
        sd, warnings = convert("HunyuanVideoPipeline", read(tmp_path / name), HUNYUAN)
        assert warnings == []
        assert_exact(applied(hunyuan, sd), layers)


def test_hunyuan_video_diff_b_and_diff(hunyuan, tmp_path):
    layers = hunyuan_layers(hunyuan, seed=3)
    table = dict(hunyuan.named_modules())
    gen = torch.Generator().manual_seed(5)
    with_bias = [*HUNYUAN_VIDEO_FUSED["double_blocks.{i}.img_attn_qkv"],
                 *HUNYUAN_VIDEO_FUSED["txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv"],
                 "norm_out.linear", "single_transformer_blocks.{i}.proj_out"]
    with_bias = [n.replace("{i}", "1") for n in with_bias]
    biases = {n: torch.randn(table[n].out_features, generator=gen) for n in with_bias}
    write_hunyuan_video_original(tmp_path / "b.safetensors", layers, style="lora_down", biases=biases)
    tensors = read(tmp_path / "b.safetensors")
    tensors["diffusion_model.double_blocks.0.img_mlp.fc1.diff"] = torch.ones(80, 20)
    tensors["diffusion_model.double_blocks.1.img_mlp.fc1.diff"] = torch.zeros(80, 20)  # nothing lost: not named
    sd, warnings = convert("HunyuanVideoPipeline", tensors, HUNYUAN)
    assert len(warnings) == 1 and warnings[0].startswith(LABEL)
    assert "1 weight change(s)" in warnings[0] and "double_blocks.*.img_mlp.fc1.diff" in warnings[0]
    assert_exact(applied(hunyuan, sd), layers, biases)


def test_hunyuan_video_unknown_musubi_layer_is_refused():
    tensors = {"lora_unet_double_blocks_0_img_attn_qkv_x.lora_down.weight": torch.ones(2, 20),
               "lora_unet_double_blocks_0_img_attn_qkv_x.lora_up.weight": torch.ones(60, 2)}
    with pytest.raises(LoRAError, match=r"^style LoRA 'x.safetensors': 2 kohya/musubi-tuner key\(s\) name no layer"):
        formats.prepare(tensors, HUNYUAN, LABEL)
