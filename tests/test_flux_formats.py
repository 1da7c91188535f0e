"""K-LoRA on a tiny FLUX.1 with every community LoRA layout diffusers reads.

Ground truth comes from ``flux_lora_files``: the tensors written to each file
and a hand-written BFL -> diffusers layer table. The rule, the dense updates
and the images are recomputed from it, never from ``klora``'s own output.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from applied import applied_delta, base_weights
from flux_lora_files import (ATTENTION, block_linears, diffusers_units, expected_choices, expected_gamma,
                             fused_units, truth, write_diffusers, write_kohya, write_xlabs)
from klora.fusion import ADAPTER_NAMES, KLoRA
from klora.loras import LoRAError

PROGRESS = [i / 10 for i in range(10)]


@pytest.fixture(scope="module")
def flux_pipe(tiny_flux_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_flux_dir)


def fresh_pipe(flux_pipe):
    """An independent copy of the tiny pipeline (cheaper than loading it again)."""
    return copy.deepcopy(flux_pipe)


# Each layout: (writer, units maker). Ranks, alphas and layer sets differ on purpose.
LAYOUTS = {
    # diffusers save_lora_weights: every block linear, per-layer ranks and alphas in the PEFT metadata
    "diffusers": lambda t, seed: (write_diffusers, diffusers_units(
        t, block_linears(t), rank=lambda i: 2 + i % 3, alpha=lambda i: 1.0 + i % 4, seed=seed)),
    # ai-toolkit: q/k/v/out only, alphas as 0-dim ".alpha" tensors, no metadata
    "ai-toolkit": lambda t, seed: (lambda p, u: write_diffusers(p, u, metadata=False, alpha_keys=True),
                                   diffusers_units(t, block_linears(t, ATTENTION), rank=4,
                                                   alpha=lambda i: 0.5 * (1 + i % 5), seed=seed)),
    # PEFT keys without any alpha: scale 1
    "peft-no-alpha": lambda t, seed: (lambda p, u: write_diffusers(p, u, metadata=False),
                                      diffusers_units(t, block_linears(t, ATTENTION), rank=8, seed=seed)),
    # kohya: fused qkv, mod_lin, mlp; alpha 2 on rank 4 (linear1 needs the real FLUX sizes: see test_flux_real_size)
    "kohya": lambda t, seed: (write_kohya, fused_units(t, "kohya", rank=4, alpha=2.0, seed=seed,
                                                       keep=lambda name: name != "linear1")),
    # XLabs: fused qkv in double and single blocks, no alpha
    "xlabs": lambda t, seed: (write_xlabs, fused_units(t, "xlabs", rank=6, seed=seed)),
}


def write_layout(name, transformer, path, seed):
    writer, units = LAYOUTS[name](transformer, seed)
    writer(path, units)
    return truth(units, transformer)


@pytest.mark.parametrize("content_layout,style_layout", [
    ("diffusers", "kohya"), ("ai-toolkit", "diffusers"), ("peft-no-alpha", "xlabs"),
    ("kohya", "xlabs"), ("xlabs", "ai-toolkit"),
])
@pytest.mark.parametrize("switching", ["fused", "adapters"])
def test_every_layout_gives_exact_updates_and_the_rule(flux_pipe, tmp_path, content_layout, style_layout, switching):
    pipe = fresh_pipe(flux_pipe)
    t = pipe.transformer
    content = write_layout(content_layout, t, tmp_path / "content.safetensors", seed=1)
    style = write_layout(style_layout, t, tmp_path / "style.safetensors", seed=2)

    before = base_weights(t)
    klora = KLoRA(pipe, str(tmp_path / "content.safetensors"), str(tmp_path / "style.safetensors"),
                  switching=switching)
    modules = dict(t.named_modules())
    for role, expected in (("content", content), ("style", style)):
        klora.set_method(role)
        for path, (delta, rank) in expected.items():
            if switching == "adapters":
                assert modules[path].r[ADAPTER_NAMES[role]] == rank, path
            got = applied_delta(t, path, before, ADAPTER_NAMES[role])
            assert torch.allclose(got, delta, rtol=1e-5, atol=3e-8), (role, path)
    klora.set_method("klora")

    shared = set(content) & set(style)
    assert set(klora.paths) == shared
    assert klora.only == {**{p: "content" for p in set(content) - shared}, **{p: "style" for p in set(style) - shared}}
    assert klora.gamma == pytest.approx(expected_gamma(content, style), rel=1e-6)
    seen = set()
    for p in PROGRESS:
        expected = expected_choices(content, style, "s*", 1.5, 1.275, p)
        assert klora.choices_at(p) == expected, p
        seen |= set(expected.values())
    assert seen == {"content", "style"}  # the comparison is not trivially one-sided
    klora.detach()


def merged_reference(pipe, updates):
    """The pipeline with ``updates`` ({module: dW}) added to its base weights: no LoRA code involved."""
    reference = copy.deepcopy(pipe)
    modules = dict(reference.transformer.named_modules())
    with torch.no_grad():
        for path, delta in updates.items():
            modules[path].weight += delta.to(modules[path].weight.dtype)
    return reference


def generate(pipe, steps=4, **kwargs):
    out = pipe("a cat in a style", num_inference_steps=steps, height=64, width=64, guidance_scale=3.5,
               output_type="np", generator=torch.Generator().manual_seed(0), **kwargs)
    return out.images


@pytest.fixture(scope="module")
def mixed_loras(flux_pipe, tmp_path_factory):
    """kohya content and XLabs style: different formats, ranks and layer sets."""
    folder = tmp_path_factory.mktemp("mixed")
    t = flux_pipe.transformer
    content = write_layout("kohya", t, folder / "content.safetensors", seed=11)
    style = write_layout("xlabs", t, folder / "style.safetensors", seed=12)
    return str(folder / "content.safetensors"), str(folder / "style.safetensors"), content, style


@pytest.mark.parametrize("forced", ["content", "style"])
def test_forced_schedule_equals_the_single_lora_model(flux_pipe, mixed_loras, forced):
    content_file, style_file, content, style = mixed_loras
    shared = set(content) & set(style)
    # A layer only one LoRA adapts keeps that LoRA; shared layers take the forced one.
    winner, other = (content, style) if forced == "content" else (style, content)
    updates = {**{p: d for p, (d, _) in other.items() if p not in shared}, **{p: d for p, (d, _) in winner.items()}}
    expected = generate(merged_reference(flux_pipe, updates))
    opposite = {**{p: d for p, (d, _) in winner.items() if p not in shared},
                **{p: d for p, (d, _) in other.items()}}
    assert np.abs(generate(merged_reference(flux_pipe, opposite)) - expected).max() > 1e-2

    pipe = fresh_pipe(flux_pipe)
    # pattern s, beta 0, alpha ~0: scale ~0, content always wins; beta huge: style always wins.
    klora = KLoRA(pipe, content_file, style_file, pattern="s", alpha=1e-9,
                  beta=0.0 if forced == "content" else 1e9)
    images = generate(pipe)
    steps = klora.selection_log()["generations"][-1]["steps"]
    assert {c for s in steps for c in s["choices"].values()} == {forced}
    assert np.abs(images - expected).max() < 2e-4


def test_true_cfg_and_any_step_count_follow_the_pipeline_schedule(flux_pipe, mixed_loras):
    content_file, style_file, content, style = mixed_loras
    pipe = fresh_pipe(flux_pipe)
    klora = KLoRA(pipe, content_file, style_file)
    calls = []
    counter = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    generate(pipe, steps=5, true_cfg_scale=2.0, negative_prompt="blurry")
    assert len(calls) == 10  # true CFG: two transformer calls per step
    generate(pipe, steps=3)
    generate(pipe, steps=7)
    counter.remove()

    generations = klora.selection_log()["generations"]
    assert [g["num_inference_steps"] for g in generations] == [5, 3, 7]
    seen = set()
    for g in generations:
        total = g["num_inference_steps"]
        assert [s["step"] for s in g["steps"]] == list(range(total))
        for s in g["steps"]:
            assert s["progress"] == pytest.approx(s["step"] / total)
            expected = expected_choices(content, style, "s*", 1.5, 1.275, s["step"] / total)
            assert s["choices"] == expected
            seen |= set(expected.values())
    assert seen == {"content", "style"}


@pytest.fixture(scope="module")
def klora_reference(flux_pipe, mixed_loras):
    content_file, style_file, _, _ = mixed_loras
    pipe = fresh_pipe(flux_pipe)
    klora = KLoRA(pipe, content_file, style_file)
    images = generate(pipe)
    return images, klora.selection_log()["generations"][-1]


def offload(pipe, how):
    if how == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    elif how == "sequential":
        # What enable_sequential_cpu_offload does per component. The pipeline-level call
        # fails on a CPU-only machine with these library versions even without any LoRA
        # (accelerate cannot move the T5/CLIP weights back to meta), so the transformer,
        # where K-LoRA lives, is offloaded on its own.
        from accelerate import cpu_offload

        cpu_offload(pipe.transformer, torch.device("cpu"), offload_buffers=True)
    else:
        pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                  offload_type="leaf_level")


@pytest.mark.parametrize("how,when", [("model", "after"), ("sequential", "after"),
                                      ("group", "after"), ("group", "before")])
def test_cpu_offload_gives_the_same_images_and_choices(flux_pipe, mixed_loras, klora_reference, how, when):
    content_file, style_file, _, _ = mixed_loras
    pipe = fresh_pipe(flux_pipe)
    if when == "before":
        offload(pipe, how)
    klora = KLoRA(pipe, content_file, style_file)
    if when == "after":
        offload(pipe, how)
    images = generate(pipe)
    expected_images, expected_log = klora_reference
    assert klora.selection_log()["generations"][-1] == expected_log
    assert np.abs(images - expected_images).max() < 1e-5
    klora.detach()
    assert not any("lora" in type(m).__name__.lower() for m in pipe.transformer.modules())


def test_an_sdxl_lora_on_flux_is_a_clear_error(flux_pipe, tiny_sdxl_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from lora_files import attention_linears, random_layers, write_peft

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    write_peft(tmp_path / "sdxl.safetensors", random_layers(unet, attention_linears(unet), 4))
    write_layout("diffusers", flux_pipe.transformer, tmp_path / "flux.safetensors", seed=3)
    pipe = fresh_pipe(flux_pipe)
    with pytest.raises(LoRAError) as error:
        KLoRA(pipe, str(tmp_path / "sdxl.safetensors"), str(tmp_path / "flux.safetensors"))
    message = str(error.value)
    assert "content LoRA" in message and "sdxl.safetensors" in message
    assert "this LoRA is for Stable Diffusion; the model is FLUX.1" in message
    assert "\n" not in message
    assert not any("lora" in type(m).__name__.lower() for m in pipe.transformer.modules())


def test_an_sdxl_kohya_lora_on_flux_names_the_mismatch(flux_pipe, tiny_sdxl_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from lora_files import attention_linears, random_layers, write_kohya as write_sd_kohya

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    write_sd_kohya(tmp_path / "sdxl_kohya.safetensors", random_layers(unet, attention_linears(unet), 4))
    write_layout("diffusers", flux_pipe.transformer, tmp_path / "flux.safetensors", seed=3)
    with pytest.raises(LoRAError, match="Stable Diffusion|another base model"):
        KLoRA(fresh_pipe(flux_pipe), str(tmp_path / "sdxl_kohya.safetensors"), str(tmp_path / "flux.safetensors"))
