"""Tiny offline pipelines: each family builds, reloads from its folder like a real
model, generates, and takes the demo LoRAs through its own diffusers loader."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from klora.tiny import (IMAGE_PROJECTIONS, TEXT_PROJECTIONS, TINY_BUILDERS, TINY_CALL_KWARGS, TINY_SIZES,
                        build_tiny, write_demo_loras)

FAMILIES = list(TINY_BUILDERS)
PIPELINE_CLASS = {
    "sdxl": "StableDiffusionXLPipeline", "sd": "StableDiffusionPipeline", "flux": "FluxPipeline",
    "sd3": "StableDiffusion3Pipeline", "qwen-image": "QwenImagePipeline", "z-image": "ZImagePipeline",
    "flux2-klein": "Flux2KleinPipeline", "chroma": "ChromaPipeline", "sana": "SanaPipeline",
    "lumina2": "Lumina2Pipeline", "sdxl-controlnet": "StableDiffusionXLControlNetPipeline",
}


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory) -> tuple[str, str]:
    family = request.param
    return family, build_tiny(family, tmp_path_factory.mktemp("tiny") / family)


def load(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def control_image(size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def generate(pipe, family: str, seed: int = 0, **extra) -> np.ndarray:
    size = TINY_SIZES[family]
    kwargs = dict(TINY_CALL_KWARGS[family], **extra)
    if family == "sdxl-controlnet":
        kwargs.setdefault("image", control_image(size))
    # prompt by keyword: FLUX.2 klein's first parameter is an image
    return pipe(prompt="a photo of a cat", num_inference_steps=2, guidance_scale=4.0, height=size, width=size,
                generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def test_reloads_offline_and_generates_reproducibly(built):
    family, folder = built
    pipe = load(folder)
    assert type(pipe).__name__ == PIPELINE_CLASS[family]
    first = generate(pipe, family)
    size = TINY_SIZES[family]
    assert first.shape == (1, size, size, 3)
    assert np.isfinite(first).all() and first.std() > 0.01
    np.testing.assert_array_equal(generate(pipe, family), first)
    assert not np.array_equal(generate(pipe, family, seed=1), first)


def test_controlnet_image_changes_the_output(tmp_path):
    pipe = load(build_tiny("sdxl-controlnet", tmp_path / "m"))
    size = TINY_SIZES["sdxl-controlnet"]
    one = generate(pipe, "sdxl-controlnet", image=control_image(size, 0))
    other = generate(pipe, "sdxl-controlnet", image=control_image(size, 1))
    assert np.abs(one - other).max() > 1e-3


def _lora_layers(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    prefix = keys[0].split(".", 1)[0]
    layers = sorted({k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in keys})
    assert sorted(metadata[f"{prefix}.target_modules"]) == layers
    return layers


@pytest.mark.parametrize("projections", ["image", "image+text"])
def test_demo_loras_load_through_the_family_loader(built, projections, tmp_path):
    from safetensors.torch import load_file

    family, folder = built
    pipe = load(folder)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    chosen = IMAGE_PROJECTIONS if projections == "image" else IMAGE_PROJECTIONS + TEXT_PROJECTIONS
    content, style = write_demo_loras(denoiser, tmp_path, projections=chosen)
    layers = _lora_layers(content)
    assert layers == _lora_layers(style)
    # every attention of the denoiser gets its projections: query, key, value and output
    attentions = {re.sub(r"\.(to_q|to_k|to_v|to_out\.0|to_qkv_mlp_proj|to_out|add_\w+|to_add_out)$", "", n)
                  for n in layers}
    for name, module in denoiser.named_modules():
        if type(module).__name__.endswith("Attention"):
            assert name in attentions, f"{family}: attention {name} has no LoRA layer"
    prefix = "unet" if hasattr(pipe, "unet") else "transformer"
    tensors = load_file(content)

    pipe.load_lora_weights(content, adapter_name="x")
    modules = dict(denoiser.named_modules())
    for layer in layers:
        module = modules[layer]
        assert "x" in getattr(module, "lora_A", {}), f"{family}: {layer} is not a LoRA layer"
        torch.testing.assert_close(module.lora_B["x"].weight, tensors[f"{prefix}.{layer}.lora_B.weight"])
    has_text_stream = any(n.endswith(".add_q_proj") for n in modules)
    assert any(".add_" in n for n in layers) == (projections == "image+text" and has_text_stream)


def test_demo_lora_strengths_tilt_opposite_ways_through_depth(tmp_path):
    """Content grows and style shrinks with depth, so each wins at one end."""
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import load_file

    denoiser = Flux2Transformer2DModel.from_pretrained(build_tiny("flux2-klein", tmp_path / "m"),
                                                       subfolder="transformer")
    content, style = write_demo_loras(denoiser, tmp_path, projections=IMAGE_PROJECTIONS + TEXT_PROJECTIONS)
    layers = _lora_layers(content)
    order = [n for n, _ in denoiser.named_modules() if n in layers]
    a, b = load_file(content), load_file(style)

    def ratio(layer):
        key = f"transformer.{layer}.lora_A.weight"
        return a[key].abs().mean() / b[key].abs().mean()

    assert ratio(order[0]) < 0.6 and ratio(order[-1]) > 1.6


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_demo_loras_of_sdxl_and_flux_are_unchanged(family, tiny_sdxl_dir, tiny_flux_dir, tmp_path):
    """The demo's LoRAs as first written: to_q/to_k/to_v/to_out.0 in module order, one
    generator drawing A then B per layer, content then style, strength 0.05 +- 40 %."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from safetensors.torch import load_file

    if family == "sdxl":
        denoiser, prefix = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet"), "unet"
    else:
        denoiser = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
        prefix = "transformer"
    content, style = write_demo_loras(denoiser, tmp_path, rank=4, seed=3)
    linears = [(n, m) for n, m in denoiser.named_modules()
               if isinstance(m, torch.nn.Linear) and re.search(r"\.(to_q|to_k|to_v|to_out\.0)$", n)]
    assert len(linears) == {"sdxl": 64, "flux": 14}[family]
    gen = torch.Generator().manual_seed(3)
    for path, tilt in ((content, 1.0), (style, -1.0)):
        got = load_file(path)
        assert len(got) == 2 * len(linears)
        for i, (name, linear) in enumerate(linears):
            strength = 0.05 * (1.0 + 0.8 * tilt * (i / (len(linears) - 1) - 0.5))
            want_a = torch.randn(4, linear.in_features, generator=gen) * strength
            want_b = torch.randn(linear.out_features, 4, generator=gen) * strength
            torch.testing.assert_close(got[f"{prefix}.{name}.lora_A.weight"], want_a, rtol=0, atol=0)
            torch.testing.assert_close(got[f"{prefix}.{name}.lora_B.weight"], want_b, rtol=0, atol=0)


def test_qwen_image_drops_exactly_the_system_prompt(tmp_path):
    """Qwen-Image drops the first 34 tokens of its template; the tiny tokenizer must
    tokenize the system part into 34 tokens too, or the prompt itself is cut."""
    pipe = load(build_tiny("qwen-image", tmp_path / "m"))
    prompt = "a photo of a cat"
    ids = pipe.tokenizer(pipe.prompt_template_encode.format(prompt))["input_ids"]
    tail = pipe.tokenizer.decode(ids[pipe.prompt_template_encode_start_idx:])
    assert tail.startswith(prompt + "<|im_end|>")


def test_qwen_chat_template_matches_qwen3():
    from klora.tiny import qwen_tokenizer

    tok = qwen_tokenizer()
    messages = [{"role": "user", "content": "a cat"}]
    plain = "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                   enable_thinking=True) == plain
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False) == plain + "<think>\n\n</think>\n\n"
    ids = tok(plain)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[:3] == ["<|im_start|>", "user", "Ċ"]


def test_gemma_tokenizer_marks_word_starts_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    from klora.tiny import gemma_tokenizer

    gemma_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok("a cat, photo")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "a", "\u2581c", "a", "t", ",", "\u2581p", "h", "o", "t", "o"]
    assert tok.decode(ids, skip_special_tokens=True) == "a cat, photo"


def test_unknown_family_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match="flux2-klein"):
        build_tiny("flux3", tmp_path)
    assert not os.listdir(tmp_path)
