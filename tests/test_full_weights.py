"""Full-weight parts of LoRA files (issue 15): ``.diff``, ``.diff_b``, norm and modulation weights.

They are applied the way ComfyUI applies them: added to their parameter at the LoRA's strength; on a
layer K-LoRA chooses in they come and go with that LoRA's low-rank delta, elsewhere they are always on.
The selection statistics stay those of the low-rank parts. Expected parameters are W0 plus the deltas
read straight from the written tensors, through name tables written out here by hand.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from safetensors.torch import save_file

from klora.fusion import KLoRA
from lora_files import delta, random_layers
from video_lora_files import wan_original_name, write_wan_musubi, write_wan_original

WAN_ATTENTION = r"^blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"

# Original Wan name of a full part -> the diffusers parameter it changes (Wan2.1 model.py vs diffusers).
WAN_PARTS = {
    "blocks.0.norm3.diff": "blocks.0.norm2.weight",  # the cross-attention norm: norm3 there, norm2 here
    "blocks.0.norm3.diff_b": "blocks.0.norm2.bias",
    "blocks.1.modulation.diff": "blocks.1.scale_shift_table",  # a parameter of the block, not a module
    "head.modulation.diff": "scale_shift_table",
    "patch_embedding.diff_b": "patch_embedding.bias",
    "blocks.1.self_attn.norm_q.diff": "blocks.1.attn1.norm_q.weight",
    "blocks.0.self_attn.q.diff": "blocks.0.attn1.to_q.weight",  # on a layer both LoRAs adapt: switches
    "blocks.0.ffn.0.diff_b": "blocks.0.ffn.net.0.proj.bias",  # a bias with no factors beside it
}
STYLE_PARTS = {  # musubi-tuner names
    "lora_unet_blocks_1_norm3.diff": "blocks.1.norm2.weight",
    "lora_unet_blocks_0_self_attn_k.diff": "blocks.0.attn1.to_k.weight",
    "lora_unet_blocks_0_norm3.diff": "blocks.0.norm2.weight",  # both LoRAs change this norm
}


def _params(denoiser) -> dict[str, torch.Tensor]:
    """The model's own parameters (PEFT's wrappers and factors left out), as they are now."""
    return {name.replace(".base_layer.", "."): p.detach().clone() for name, p in denoiser.named_parameters()
            if ".lora_" not in name}


def _random_like(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.fixture
def wan(video_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(video_dir("wan21"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def wan_files(wan, tmp_path):
    tr = wan.transformer
    w0 = _params(tr)
    paths = [p for p, m in tr.named_modules() if isinstance(m, torch.nn.Linear) and re.search(WAN_ATTENTION, p)]
    content = random_layers(tr, paths, rank=4, alpha=2.0, seed=1, scale=0.1)
    style = random_layers(tr, paths[:-2], rank=8, alpha=4.0, seed=2, scale=0.1)
    parts = {"content": {}, "style": {}}
    extra = {}
    for i, (key, target) in enumerate(WAN_PARTS.items()):
        extra[key] = _random_like(w0[target].shape, 10 + i)
        parts["content"][key] = (target, extra[key])
    extra["blocks.1.norm3.diff"] = torch.zeros(w0["blocks.1.norm2.weight"].shape)  # zero: changes nothing
    write_wan_original(tmp_path / "c.safetensors", content, style="lora_down", extra=extra)
    write_wan_musubi(tmp_path / "s.safetensors", style)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "s.safetensors")
    for i, (key, target) in enumerate(STYLE_PARTS.items()):
        tensors[key] = _random_like(w0[target].shape, 30 + i)
        parts["style"][key] = (target, tensors[key])
    save_file(tensors, str(tmp_path / "s.safetensors"))
    return tmp_path / "c.safetensors", tmp_path / "s.safetensors", {"content": content, "style": style}, parts, w0


def _expected(w0, layers, parts, roles_of, lowrank=True) -> dict[str, torch.Tensor]:
    """W0 + the low-rank deltas (if ``lowrank``) and full parts of the roles ``roles_of(parameter)`` names."""
    want = {name: w.double() for name, w in w0.items()}
    for role in ("content", "style"):
        for path, layer in layers[role].items():
            if lowrank and role in roles_of(f"{path}.weight"):
                want[f"{path}.weight"] = want[f"{path}.weight"] + delta(layer)
        for target, tensor in parts[role].values():
            if role in roles_of(target):
                want[target] = want[target] + tensor.double()
    return want


def _assert_params(denoiser, want):
    got = _params(denoiser)
    assert set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name].double(), value, rtol=0, atol=2e-6, msg=name)


@pytest.mark.parametrize("switching", ["fused", "adapters"])
def test_wan_full_weight_parts_apply_with_their_lora(wan, wan_files, switching):
    content_path, style_path, layers, parts, w0 = wan_files
    tr = wan.transformer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        klora = KLoRA(wan, content_path, style_path, pattern="s", switching=switching)
    assert not [w for w in caught if "not applied" in str(w.message)]
    fused = switching == "fused"
    for method, roles in (("content", {"content"}), ("style", {"style"}), ("merge", {"content", "style"})):
        klora.set_method(method)
        _assert_params(tr, _expected(w0, layers, parts, lambda _: roles, lowrank=fused))

    # Under K-LoRA: a full part on a chosen layer goes with its LoRA's choice; elsewhere it is always on.
    klora.set_method("klora")
    wan("a sbu cat", num_inference_steps=6, height=16, width=16, num_frames=5, output_type="np",
        generator=torch.Generator().manual_seed(0))
    log = klora.selection_log()
    last = log["generations"][-1]["steps"][-1]["choices"]
    assert {"blocks.0.attn1.to_q", "blocks.0.attn1.to_k"} <= set(last)
    assert any(a["choices"] != b["choices"] for a, b in zip(log["generations"][-1]["steps"],
                                                            log["generations"][-1]["steps"][1:]))

    def roles_of(parameter):
        layer = parameter.rsplit(".", 1)[0]
        if layer in last:
            return {last[layer]}
        return {"content", "style"}  # outside the choice everything is on

    _assert_params(tr, _expected(w0, layers, parts, roles_of, lowrank=fused))
    assert log["full_weight_deltas"] == {
        "patch_embedding": ["content"], "blocks.0.attn1.to_q": ["content"], "blocks.0.attn1.to_k": ["style"],
        "blocks.0.norm2": ["content", "style"], "blocks.0.ffn.net.0.proj": ["content"],
        "blocks.1.scale_shift_table": ["content"], "blocks.1.attn1.norm_q": ["content"],
        "blocks.1.norm2": ["style"], "scale_shift_table": ["content"]}
    # The statistics are the low-rank parts' alone.
    for path in last:
        dc, ds = delta(layers["content"][path]), delta(layers["style"][path])
        assert log["layers"][path]["content_topk_sum"] == pytest.approx(
            dc.abs().flatten().topk(32).values.sum().item(), rel=1e-5)
        assert log["layers"][path]["style_topk_sum"] == pytest.approx(
            ds.abs().flatten().topk(32).values.sum().item(), rel=1e-5)
    klora.detach()
    assert all(torch.equal(p, w0[name]) for name, p in _params(tr).items())


def test_wan_full_weight_parts_of_an_extra_lora_are_always_on(wan, wan_files, tmp_path):
    content_path, style_path, layers, parts, w0 = wan_files
    tr = wan.transformer
    norm = torch.full(w0["blocks.1.norm2.weight"].shape, 0.25)
    extra_layer = random_layers(tr, ["blocks.1.ffn.net.2"], rank=2, alpha=2.0, seed=7, scale=0.1)
    write_wan_original(tmp_path / "x.safetensors", extra_layer, style="lora_down", extra={"blocks.1.norm3.diff": norm})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        klora = KLoRA(wan, content_path, style_path, method="content", extra_loras=[(tmp_path / "x.safetensors", 0.5)])
    want = _expected(w0, layers, parts, lambda _: {"content"})
    want["blocks.1.norm2.weight"] = want["blocks.1.norm2.weight"] + 0.5 * norm.double()
    want["blocks.1.ffn.net.2.weight"] = want["blocks.1.ffn.net.2.weight"] + 0.5 * delta(extra_layer["blocks.1.ffn.net.2"])
    _assert_params(tr, want)
    klora.detach()
    assert all(torch.equal(p, w0[name]) for name, p in _params(tr).items())


def test_flux_kohya_and_bfl_full_parts_are_cut_and_swapped_like_the_weights(tiny_flux_dir, tmp_path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    tr = pipe.transformer
    w0 = _params(tr)
    heads = w0["transformer_blocks.0.attn.to_q.bias"].shape[0]
    mlp = w0["single_transformer_blocks.0.proj_mlp.weight"].shape[0]
    qkv_bias = _random_like((3 * heads,), 1)
    linear1 = _random_like((3 * heads + mlp, w0["single_transformer_blocks.0.attn.to_q.weight"].shape[1]), 2)
    norm = _random_like(w0["transformer_blocks.0.attn.norm_q.weight"].shape, 3)
    final = _random_like(w0["norm_out.linear.bias"].shape, 4)
    A = _random_like((2, tr.config.joint_attention_dim), 5)
    B = _random_like((heads, 2), 6)
    tensors = {  # kohya names for the factors and two parts, BFL names (ComfyUI's trainer) for the others
        "lora_unet_double_blocks_0_txt_attn_proj.lora_down.weight": A[:, :heads].contiguous(),
        "lora_unet_double_blocks_0_txt_attn_proj.lora_up.weight": B,
        "lora_unet_double_blocks_0_txt_attn_proj.alpha": torch.tensor(2.0),
        "lora_unet_double_blocks_0_img_attn_qkv.diff_b": qkv_bias,
        "lora_unet_single_blocks_0_linear1.diff": linear1,
        "diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff": norm,
        "diffusion_model.final_layer.adaLN_modulation.1.diff_b": final,
    }
    save_file(tensors, str(tmp_path / "c.safetensors"))
    save_file({k: v for k, v in tensors.items() if "txt_attn_proj" in k}, str(tmp_path / "s.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        klora = KLoRA(pipe, tmp_path / "c.safetensors", tmp_path / "s.safetensors", method="content")
    want = {name: w.double() for name, w in w0.items()}
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        want[f"transformer_blocks.0.attn.{part}.bias"] += qkv_bias[i * heads:(i + 1) * heads].double()
        want[f"single_transformer_blocks.0.attn.{part}.weight"] += linear1[i * heads:(i + 1) * heads].double()
    want["single_transformer_blocks.0.proj_mlp.weight"] += linear1[3 * heads:].double()
    want["transformer_blocks.0.attn.norm_q.weight"] += norm.double()
    shift, scale = final.double().chunk(2)  # BFL: (shift, scale); diffusers' norm_out: (scale, shift)
    want["norm_out.linear.bias"] += torch.cat([scale, shift])
    want["transformer_blocks.0.attn.to_add_out.weight"] += B.double() @ A[:, :heads].double()
    _assert_params(tr, want)
    klora.set_method("style")
    want_style = {name: w.double() for name, w in w0.items()}
    want_style["transformer_blocks.0.attn.to_add_out.weight"] += B.double() @ A[:, :heads].double()
    _assert_params(tr, want_style)
    klora.detach()
    assert all(torch.equal(p, w0[name]) for name, p in _params(tr).items())


def test_parts_that_name_no_parameter_are_named_in_a_warning(wan, wan_files, tmp_path):
    content_path, style_path, *_ = wan_files
    from safetensors.torch import load_file

    tensors = load_file(content_path)
    tensors["diffusion_model.blocks.0.no_such_norm.diff"] = torch.ones(24)
    save_file(tensors, str(tmp_path / "odd.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        klora = KLoRA(wan, tmp_path / "odd.safetensors", style_path)
    named = [str(w.message) for w in caught if "name no parameter" in str(w.message)]
    assert len(named) == 1 and "odd.safetensors" in named[0] and "blocks.*.no_such_norm.weight" in named[0]
    klora.detach()


def test_a_part_whose_shape_differs_from_its_parameter_is_refused(wan, wan_files, tmp_path):
    from klora.errors import LoRAError
    from safetensors.torch import load_file

    content_path, style_path, *_ = wan_files
    tensors = load_file(content_path)
    tensors["diffusion_model.blocks.1.self_attn.norm_q.diff"] = torch.ones(7)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoRAError, match=r"^content LoRA '.*bad.safetensors': its full-weight delta for "
                                        r"'blocks.1.attn1.norm_q.weight' is 7 but that parameter is 24"):
        KLoRA(wan, tmp_path / "bad.safetensors", style_path)


def test_original_names_of_the_test_tables_are_the_writers():
    """The hand-written tables above use the same original names the file writers use."""
    assert wan_original_name("blocks.0.attn1.to_q") == "blocks.0.self_attn.q"
    assert wan_original_name("blocks.0.ffn.net.0.proj") == "blocks.0.ffn.0"


def test_hunyuan_video_original_full_parts_reach_diffusers_parameters(video_dir, tmp_path):
    """HunyuanVideo's original names, renamed by diffusers' own checkpoint converter; a single block's linear1
    cut by this model's width (the converter assumes 3072)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(video_dir("hunyuanvideo"))
    tr = pipe.transformer
    w0 = _params(tr)
    inner = tr.config.num_attention_heads * tr.config.attention_head_dim
    mlp = w0["single_transformer_blocks.0.proj_mlp.weight"].shape[0]
    width = w0["single_transformer_blocks.0.attn.to_q.weight"].shape[1]
    layer = random_layers(tr, ["transformer_blocks.0.attn.to_out.0"], rank=2, alpha=2.0, seed=3, scale=0.1)
    A, B, alpha = layer["transformer_blocks.0.attn.to_out.0"]
    parts = {
        "double_blocks.0.img_attn_q_norm.diff": _random_like(w0["transformer_blocks.0.attn.norm_q.weight"].shape, 1),
        "double_blocks.0.txt_attn_k_norm.diff": _random_like(
            w0["transformer_blocks.0.attn.norm_added_k.weight"].shape, 2),
        "double_blocks.0.img_mod.linear.diff": _random_like(w0["transformer_blocks.0.norm1.linear.weight"].shape, 3),
        "single_blocks.0.linear1.diff": _random_like((3 * inner + mlp, width), 4),
        "single_blocks.0.linear1.diff_b": _random_like((3 * inner + mlp,), 5),
        "final_layer.adaLN_modulation.1.diff_b": _random_like(w0["norm_out.linear.bias"].shape, 6),
        "img_in.proj.diff_b": _random_like(w0["x_embedder.proj.bias"].shape, 7),
    }
    tensors = {"diffusion_model.double_blocks.0.img_attn_proj.lora_down.weight": A,
               "diffusion_model.double_blocks.0.img_attn_proj.lora_up.weight": B,
               "diffusion_model.double_blocks.0.img_attn_proj.alpha": torch.tensor(alpha),
               **{f"diffusion_model.{k}": v for k, v in parts.items()}}
    save_file(tensors, str(tmp_path / "c.safetensors"))
    save_file({k: v for k, v in tensors.items() if "img_attn_proj" in k}, str(tmp_path / "s.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        klora = KLoRA(pipe, tmp_path / "c.safetensors", tmp_path / "s.safetensors", method="content")
    want = {name: w.double() for name, w in w0.items()}
    want["transformer_blocks.0.attn.to_out.0.weight"] += delta(layer["transformer_blocks.0.attn.to_out.0"])
    want["transformer_blocks.0.attn.norm_q.weight"] += parts["double_blocks.0.img_attn_q_norm.diff"].double()
    want["transformer_blocks.0.attn.norm_added_k.weight"] += parts["double_blocks.0.txt_attn_k_norm.diff"].double()
    want["transformer_blocks.0.norm1.linear.weight"] += parts["double_blocks.0.img_mod.linear.diff"].double()
    weight, bias = parts["single_blocks.0.linear1.diff"].double(), parts["single_blocks.0.linear1.diff_b"].double()
    for i, target in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
        want[f"single_transformer_blocks.0.{target}.weight"] += weight[i * inner:(i + 1) * inner]
        want[f"single_transformer_blocks.0.{target}.bias"] += bias[i * inner:(i + 1) * inner]
    want["single_transformer_blocks.0.proj_mlp.weight"] += weight[3 * inner:]
    want["single_transformer_blocks.0.proj_mlp.bias"] += bias[3 * inner:]
    shift, scale = parts["final_layer.adaLN_modulation.1.diff_b"].double().chunk(2)
    want["norm_out.linear.bias"] += torch.cat([scale, shift])
    want["x_embedder.proj.bias"] += parts["img_in.proj.diff_b"].double()
    _assert_params(tr, want)
    klora.detach()
    assert all(torch.equal(p, w0[name]) for name, p in _params(tr).items())
