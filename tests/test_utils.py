"""The notebook API (utils.py) with the original's names and arguments."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import utils
from flux_lora_files import (ATTENTION, block_linears, diffusers_units, expected_choices, expected_gamma,
                             fused_units, truth, write_diffusers, write_kohya)
from klora.fusion import KLoRA
from klora.loras import LoRAError


@pytest.fixture(scope="module")
def flux_pipe(tiny_flux_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_flux_dir)


@pytest.fixture(scope="module")
def lora_folder(flux_pipe, tmp_path_factory):
    """A folder holding two LoRAs (so a weight name is needed) plus their ground truth."""
    folder = tmp_path_factory.mktemp("notebook-loras")
    t = flux_pipe.transformer
    content_units = diffusers_units(t, block_linears(t, ATTENTION), rank=4, alpha=lambda i: 1.0 + i % 3, seed=31)
    style_units = fused_units(t, "kohya", rank=8, alpha=4.0, seed=32, keep=lambda n: n != "linear1")
    write_diffusers(folder / "subject.safetensors", content_units, metadata=False, alpha_keys=True)
    write_kohya(folder / "style.safetensors", style_units)
    return folder, truth(content_units, t), truth(style_units, t)


def generate(pipe, steps):
    return pipe("a cat", num_inference_steps=steps, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def check_log_follows_the_rule(klora, content, style, steps, pattern="s*", alpha=1.5, beta=1.275):
    generation = klora.selection_log()["generations"][-1]
    assert generation["num_inference_steps"] == steps
    for s in generation["steps"]:
        assert s["progress"] == pytest.approx(s["step"] / steps)
        assert s["choices"] == expected_choices(content, style, pattern, alpha, beta, s["step"] / steps)
    assert [s["step"] for s in generation["steps"]] == list(range(steps))


def test_flux_insert_with_the_original_arguments_on_the_pipeline(flux_pipe, lora_folder):
    folder, content, style = lora_folder
    pipe = copy.deepcopy(flux_pipe)
    transformer = utils.insert_community_flux_lora_to_unet(
        unet=pipe, lora_weights_content_path=str(folder), lora_weights_style_path=str(folder),
        alpha=1.5, beta=0.9, diffuse_step=28, content_lora_weight_name="subject.safetensors",
        style_lora_weight_name="style.safetensors", patten="s*")
    assert transformer is pipe.transformer
    assert isinstance(transformer.klora, KLoRA)
    assert (transformer.klora.pattern, transformer.klora.alpha, transformer.klora.beta) == ("s*", 1.5, 0.9)
    generate(pipe, steps=5)  # the pipeline's schedule wins over diffuse_step
    check_log_follows_the_rule(transformer.klora, content, style, steps=5, beta=0.9)


def test_flux_insert_on_a_bare_transformer_counts_diffuse_step(flux_pipe, lora_folder):
    folder, content, style = lora_folder
    pipe = copy.deepcopy(flux_pipe)
    transformer = utils.insert_community_flux_lora_to_unet(
        pipe.transformer, str(folder / "subject.safetensors"), str(folder / "style.safetensors"),
        1.5, None, 4)
    generate(pipe, steps=4)
    check_log_follows_the_rule(transformer.klora, content, style, steps=4)


def test_inserting_again_replaces_and_remove_restores_bit_identical(flux_pipe, lora_folder):
    folder, _, _ = lora_folder
    pipe = copy.deepcopy(flux_pipe)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    subject, style = str(folder / "subject.safetensors"), str(folder / "style.safetensors")
    first = utils.insert_community_flux_lora_to_unet(pipe, subject, style, 1.5, 1.275, 28).klora
    second = utils.insert_community_flux_lora_to_unet(pipe, style, subject, 1.5, 1.275, 28).klora
    assert first is not second and pipe.transformer.klora is second
    assert first._detached and not second._detached
    assert second.labels["content"].endswith("style.safetensors'")
    utils.remove_klora(pipe)
    assert not hasattr(pipe.transformer, "klora")
    after = pipe.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("how", ["model", "sequential"])
def test_flux_insert_into_a_pipeline_with_cpu_offload_already_on(flux_pipe, lora_folder, how):
    folder, _, _ = lora_folder
    subject, style = str(folder / "subject.safetensors"), str(folder / "style.safetensors")
    plain = copy.deepcopy(flux_pipe)
    utils.insert_community_flux_lora_to_unet(plain, subject, style, 1.5, 1.275, 28)
    expected = generate(plain, steps=3)

    pipe = copy.deepcopy(flux_pipe)
    if how == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        # enable_sequential_cpu_offload's per-component step (the pipeline-level call needs
        # an accelerator to run its text encoders with these versions; the transformer does not).
        from accelerate import cpu_offload

        cpu_offload(pipe.transformer, torch.device("cpu"), offload_buffers=True)
    transformer = utils.insert_community_flux_lora_to_unet(pipe, subject, style, 1.5, 1.275, 28)
    if how == "model":
        assert pipe._all_hooks, "model CPU offload must be back on"
    else:
        assert transformer.transformer_blocks[0].attn.to_q.weight.is_meta, "the weights must stream as before"
        assert transformer.klora.switching == "fused"  # it writes into the offloaded host copy
    assert transformer.klora.stats == plain.transformer.klora.stats
    assert np.abs(generate(pipe, steps=3) - expected).max() < 1e-5


def test_get_lora_weights_reads_files_folders_and_subfolders(lora_folder, tmp_path):
    folder, _, _ = lora_folder
    raw = load_file(str(folder / "style.safetensors"))
    for got in (utils.get_lora_weights(str(folder), sub_lora_weights_name="style.safetensors"),
                utils.get_lora_weights(str(folder / "style.safetensors")),
                utils.get_lora_weights(str(folder.parent), subfolder=folder.name,
                                       sub_lora_weights_name="style.safetensors")):
        assert got.keys() == raw.keys() and all(torch.equal(got[k], raw[k]) for k in raw)
    with pytest.raises(LoRAError, match="several .safetensors"):
        utils.get_lora_weights(str(folder))
    (tmp_path / "lora.bin").write_bytes(b"not really")
    with pytest.raises(LoRAError, match="pickle"):
        utils.get_lora_weights(str(tmp_path / "lora.bin"))


def test_ratio_between_content_and_style_is_the_rules_gamma(flux_pipe, tmp_path):
    t = flux_pipe.transformer
    content_units = diffusers_units(t, block_linears(t, ATTENTION), rank=4, alpha=lambda i: 1.0 + i % 5, seed=41)
    style_units = diffusers_units(t, block_linears(t), rank=2, alpha=3.0, seed=42)
    write_diffusers(tmp_path / "c.safetensors", content_units, metadata=False, alpha_keys=True)
    write_diffusers(tmp_path / "s.safetensors", style_units, metadata=False, alpha_keys=True)
    gamma = utils.get_ratio_between_content_and_style(utils.get_lora_weights(str(tmp_path / "c.safetensors")),
                                                      utils.get_lora_weights(str(tmp_path / "s.safetensors")))
    assert gamma == pytest.approx(expected_gamma(truth(content_units, t), truth(style_units, t)), rel=1e-6)
    pipe = copy.deepcopy(flux_pipe)
    assert KLoRA(pipe, str(tmp_path / "c.safetensors"), str(tmp_path / "s.safetensors")).gamma == pytest.approx(gamma)

    kohya = fused_units(t, "kohya", rank=4, alpha=1.0, seed=43, keep=lambda n: n != "linear1")
    write_kohya(tmp_path / "k.safetensors", kohya)
    with pytest.raises(LoRAError, match="no layer name in common"):
        utils.get_ratio_between_content_and_style(utils.get_lora_weights(str(tmp_path / "c.safetensors")),
                                                  utils.get_lora_weights(str(tmp_path / "k.safetensors")))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir, tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    from lora_files import attention_linears, random_layers, write_kohya as write_sd_kohya

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    folder = tmp_path_factory.mktemp("sdxl-kohya")
    paths = attention_linears(pipe.unet)
    write_sd_kohya(folder / "content.safetensors", random_layers(pipe.unet, paths, 4, alpha=2.0, seed=1))
    write_sd_kohya(folder / "style.safetensors", random_layers(pipe.unet, paths, 8, alpha=8.0, seed=2))
    return pipe, str(folder / "content.safetensors"), str(folder / "style.safetensors"), paths


def sd_generate(pipe, steps):
    pipe("a dog", num_inference_steps=steps, height=64, width=64, output_type="np",
         generator=torch.Generator().manual_seed(0))


def test_sd_community_insert_with_kohya_loras(sdxl):
    base, content, style, paths = sdxl
    pipe = copy.deepcopy(base)
    unet = utils.insert_community_sd_lora_to_unet(pipe, content, style, 1.5, 0.5, 28000)
    assert unet is pipe.unet and sorted(unet.klora.paths) == sorted(paths)
    sd_generate(pipe, steps=3)  # pipeline given: 3 steps, whatever sum_timesteps says
    assert [s["progress"] for s in unet.klora.selection_log()["generations"][-1]["steps"]] == [0, 1 / 3, 2 / 3]


def test_sd_insert_on_a_bare_unet_takes_steps_from_sum_timesteps(sdxl):
    base, content, style, paths = sdxl
    pipe = copy.deepcopy(base)
    unet = utils.insert_sd_klora_to_unet(pipe.unet, content, style, 1.5, 0.5, len(paths) * 6, "s")
    sd_generate(pipe, steps=6)
    generation = unet.klora.selection_log()["generations"][-1]
    assert generation["num_inference_steps"] == 6  # sum_timesteps / layers, as the original counted
    assert [s["step"] for s in generation["steps"]] == list(range(6))


# --- insert_klora: any family ------------------------------------------------------

@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from diffusers import QwenImagePipeline

    from klora.tiny import build_tiny, write_demo_loras

    folder = tmp_path_factory.mktemp("qwen")
    pipe = QwenImagePipeline.from_pretrained(build_tiny("qwen-image", folder / "model"))
    pipe.set_progress_bar_config(disable=True)
    return pipe, *write_demo_loras(pipe.transformer, folder)


def qwen_generate(pipe, steps=4, **kwargs):
    return pipe(prompt="a dog", num_inference_steps=steps, height=32, width=32, max_sequence_length=32,
                output_type="np", generator=torch.Generator().manual_seed(0), **kwargs).images


def test_insert_klora_on_qwen_image_returns_the_object_and_follows_the_rule(qwen):
    from test_inference import check_log_against_files, rule_from_files

    base, content, style = qwen
    pipe = copy.deepcopy(base)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    klora = utils.insert_klora(pipe, content, style, alpha=1.5, pattern="s", switching="adapters")
    assert isinstance(klora, KLoRA) and pipe.transformer.klora is klora
    assert (klora.family.name, klora.switching, klora.pattern, klora.beta) == ("Qwen-Image", "adapters", "s", 0.5)
    qwen_generate(pipe, negative_prompt="blurry", true_cfg_scale=3.0)  # two transformer calls per step
    stats, gamma = rule_from_files(content, style)
    check_log_against_files(klora.selection_log(), stats, gamma, steps=4, pattern="s")

    again = utils.insert_klora(pipe, style, content, method="merge", progress="noise")
    assert klora._detached and pipe.transformer.klora is again
    assert (again.method, again.progress_mode, again.switching) == ("merge", "noise", "fused")
    utils.remove_klora(pipe)
    assert not hasattr(pipe.transformer, "klora")
    after = pipe.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_insert_klora_on_wan22_takes_second_expert_files(tmp_path):
    from diffusers import WanPipeline

    from klora.tiny_video import build_tiny_video, write_demo_video_loras

    pipe = WanPipeline.from_pretrained(build_tiny_video("wan22", tmp_path / "wan"))
    pipe.set_progress_bar_config(disable=True)
    content, style = write_demo_video_loras(pipe.transformer, tmp_path / "high")
    content_2, style_2 = write_demo_video_loras(pipe.transformer, tmp_path / "low", rank=4, seed=3)
    before = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
              for name in ("transformer", "transformer_2")}
    klora = utils.insert_klora(pipe, content, style, content_2=content_2, style_2=style_2)
    assert pipe.transformer.klora is klora and pipe.transformer_2.klora is klora
    assert klora.labels["content_2"].endswith("demo_video_content_lora.safetensors'")
    assert {klora.stats[k].k for k in klora.paths if k.startswith("transformer_2.")} == {16}
    pipe(prompt="a dog", num_inference_steps=4, height=16, width=16, num_frames=5, max_sequence_length=16,
         output_type="np", generator=torch.Generator().manual_seed(0))
    assert {s["component"] for s in klora.selection_log()["generations"][0]["steps"]} == {"transformer",
                                                                                         "transformer_2"}
    utils.remove_klora(pipe)
    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name)
        assert not hasattr(module, "klora")
        assert all(torch.equal(module.state_dict()[k], v) for k, v in before[name].items())


def test_original_insert_functions_take_switching(sdxl):
    base, content, style, _ = sdxl
    pipe = copy.deepcopy(base)
    unet = utils.insert_sd_klora_to_unet(pipe, content, style, switching="adapters")
    assert unet.klora.switching == "adapters"
    unet = utils.insert_community_sd_lora_to_unet(pipe, content, style, pattern="s", switching="fused")
    assert unet.klora.switching == "fused" and unet.klora.pattern == "s"
    utils.remove_klora(pipe)
    assert not hasattr(pipe.unet, "klora")
