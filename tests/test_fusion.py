"""K-LoRA on a pipeline: the rule recomputed from the LoRA files, schedules, restoration."""

import warnings

import numpy as np
import pytest
import torch

from klora import rule
from klora.fusion import ADAPTER_NAMES, KLoRA
from applied import applied_delta, base_weights
from lora_files import attention_linears, delta, random_layers, write_kohya, write_peft


@pytest.fixture
def lora_pair(pipe, tmp_path):
    """Content rank 4 on all attention layers, style rank 8 on the first 40, kohya + peft formats."""
    paths = attention_linears(pipe.unet)
    content = random_layers(pipe.unet, paths, rank=4, alpha=lambda i: [2.0, 4.0, 8.0][i % 3], seed=11,
                            scale=0.05)
    style = random_layers(pipe.unet, paths[:40], rank=8, alpha=4.0, seed=12, scale=0.06)
    write_kohya(tmp_path / "content.safetensors", content)
    write_peft(tmp_path / "style.safetensors", style)
    return tmp_path / "content.safetensors", tmp_path / "style.safetensors", content, style


def _generate(pipe, steps=4, seed=0, **kwargs):
    kwargs.setdefault("guidance_scale", 5.0)
    return pipe("a sbu dog in szn style", num_inference_steps=steps, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


def _independent_rule(content, style, shared):
    """S_c, S_s per layer and gamma straight from the written tensors (float64)."""
    stats, ratios = {}, []
    for path in shared:
        dc, ds = delta(content[path]), delta(style[path])
        k = content[path][0].shape[0] * style[path][0].shape[0]
        stats[path] = (dc.abs().flatten().topk(k).values.sum().item(), ds.abs().flatten().topk(k).values.sum().item())
        ratios.append(dc.abs().sum().item() / ds.abs().sum().item())
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return stats, sum(kept) / len(kept)


@pytest.mark.parametrize("switching", ["fused", "adapters"])
@pytest.mark.parametrize("pattern", ["s", "s*"])
def test_choices_equal_the_rule_recomputed_from_the_files(pipe, lora_pair, pattern, switching):
    content_path, style_path, content, style = lora_pair
    before = base_weights(pipe.unet)
    klora = KLoRA(pipe, content_path, style_path, pattern=pattern, switching=switching)
    shared = list(style)
    stats, gamma = _independent_rule(content, style, shared)
    assert sorted(klora.paths) == sorted(shared)
    assert klora.gamma == pytest.approx(gamma, rel=1e-5)
    for path in shared:
        assert klora.stats[path].content_topk_sum == pytest.approx(stats[path][0], rel=1e-5)
        assert klora.stats[path].style_topk_sum == pytest.approx(stats[path][1], rel=1e-5)
        assert klora.stats[path].k == 32

    steps = 7
    _generate(pipe, steps=steps)
    log = klora.selection_log()
    (generation,) = log["generations"]
    assert generation["num_inference_steps"] == steps
    assert [s["step"] for s in generation["steps"]] == list(range(steps))
    beta = 0.5 if pattern == "s" else 1.275
    switched = set()
    for entry in generation["steps"]:
        p = entry["step"] / steps
        scale = (1.5 * p + beta) % 1.5 if pattern == "s*" else 1.5 * p + beta
        assert entry["progress"] == pytest.approx(p) and entry["scale"] == pytest.approx(scale)
        for path in shared:
            expected = "content" if stats[path][0] / gamma > stats[path][1] * scale else "style"
            assert entry["choices"][path] == expected, (entry["step"], path)
        switched |= {c for c in entry["choices"].values()}
    assert switched == {"content", "style"}, "the test LoRAs should exercise both sides"
    # Layers only the content LoRA adapts use it throughout.
    assert log["only"] == {p: "content" for p in content if p not in style}
    for path in log["only"]:
        assert torch.allclose(applied_delta(pipe.unet, path, before, ADAPTER_NAMES["content"]),
                              delta(content[path]), rtol=1e-5, atol=3e-8)
    if switching == "adapters":
        modules = dict(pipe.unet.named_modules())
        assert all(modules[p].active_adapters == [ADAPTER_NAMES["content"]] for p in log["only"])
    klora.detach()


def test_forced_content_schedule_equals_content_only_run(pipe, tmp_path):
    paths = attention_linears(pipe.unet)
    write_peft(tmp_path / "c.safetensors", random_layers(pipe.unet, paths, rank=4, seed=1))
    write_peft(tmp_path / "s.safetensors", random_layers(pipe.unet, paths, rank=4, seed=2))
    # scale = 1e-12 * p + 1e-12: S_s * scale is ~0, so content wins in every layer at every step.
    klora = KLoRA(pipe, tmp_path / "c.safetensors", tmp_path / "s.safetensors", pattern="s", alpha=1e-12, beta=1e-12)
    forced = _generate(pipe)
    assert all(set(s["choices"].values()) == {"content"} for s in klora.selection_log()["generations"][0]["steps"])
    klora.set_method("content")
    only = _generate(pipe)
    klora.set_method("style")
    style_only = _generate(pipe)
    assert (forced == only).all()
    assert not (forced == style_only).all()

    # A huge beta: style wins everywhere and equals the style-only run.
    klora.set_method("klora")
    klora.set_schedule("s", 1.5, 1e12)
    forced_style = _generate(pipe)
    assert (forced_style == style_only).all()
    klora.detach()


@pytest.mark.parametrize("switching", ["fused", "adapters"])
def test_same_seed_same_image_and_merge_differs(pipe, lora_pair, switching):
    content_path, style_path, content, style = lora_pair
    before = base_weights(pipe.unet)
    klora = KLoRA(pipe, content_path, style_path, switching=switching)
    first, second = _generate(pipe, seed=3), _generate(pipe, seed=3)
    assert (first == second).all()
    klora.set_method("merge")
    merged = _generate(pipe, seed=3)
    assert not (merged == first).all()
    modules = dict(pipe.unet.named_modules())
    path = klora.paths[0]
    if switching == "adapters":
        assert sorted(modules[path].active_adapters) == sorted(ADAPTER_NAMES[r] for r in ("content", "style"))
    else:  # both deltas in the weight
        assert torch.allclose(applied_delta(pipe.unet, path, before), delta(content[path]) + delta(style[path]),
                              rtol=1e-5, atol=3e-8)
    klora.detach()


@pytest.mark.parametrize("switching", ["fused", "adapters"])
def test_detach_restores_weights_bit_identical_and_removes_hooks(pipe, lora_pair, switching):
    content_path, style_path, _, _ = lora_pair
    base_image = _generate(pipe)
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    names = [n for n, _ in pipe.unet.named_modules()]
    klora = KLoRA(pipe, content_path, style_path, switching=switching)
    assert not (_generate(pipe) == base_image).all()
    klora.detach()
    after = pipe.unet.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert [n for n, _ in pipe.unet.named_modules()] == names
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in pipe.unet.modules())
    assert (_generate(pipe) == base_image).all()
    # Attach again after detaching: works, and a second attach on top is refused.
    klora = KLoRA(pipe, content_path, style_path, switching=switching)
    with pytest.raises(ValueError, match="already attached"):
        KLoRA(pipe, content_path, style_path)
    klora.detach()


def _log_steps(klora):
    return [(s["step"], s["progress"]) for s in klora.selection_log()["generations"][-1]["steps"]]


def test_progress_is_exact_for_any_steps_cfg_batch_and_interruptions(pipe, lora_pair):
    content_path, style_path, _, _ = lora_pair
    klora = KLoRA(pipe, content_path, style_path)
    for steps in (1, 3, 10):
        _generate(pipe, steps=steps)
        assert _log_steps(klora) == [(i, i / steps) for i in range(steps)]
    _generate(pipe, steps=5, guidance_scale=1.0)  # no CFG
    assert _log_steps(klora) == [(i, i / 5) for i in range(5)]
    _generate(pipe, steps=5, num_images_per_prompt=2)  # a batch
    assert _log_steps(klora) == [(i, i / 5) for i in range(5)]
    reference = klora.selection_log()["generations"][-1]

    def stop_after_two(p, step, timestep, callback_kwargs):
        if step == 1:
            p._interrupt = True
        return callback_kwargs

    _generate(pipe, steps=5, callback_on_step_end=stop_after_two)
    assert _log_steps(klora) == [(0, 0.0), (1, 0.2)]
    _generate(pipe, steps=5)
    assert klora.selection_log()["generations"][-1] == reference
    klora.detach()


def test_two_pipelines_in_one_process_do_not_interfere(tiny_sdxl_dir, lora_pair):
    from diffusers import StableDiffusionXLPipeline

    content_path, style_path, _, _ = lora_pair
    pipes = [StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir) for _ in range(2)]
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    a = KLoRA(pipes[0], content_path, style_path, pattern="s")
    b = KLoRA(pipes[1], content_path, style_path, pattern="s*")
    alone = _generate(pipes[0], steps=3)
    _generate(pipes[1], steps=6)
    again = _generate(pipes[0], steps=3)
    assert (alone == again).all()
    assert _log_steps(a) == [(i, i / 3) for i in range(3)]
    assert _log_steps(b) == [(i, i / 6) for i in range(6)]
    assert len(a.generations) == 2 and len(b.generations) == 1
    a.detach()
    b.detach()


def test_sd1_pipeline_with_ddim_and_bare_unet_progress(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    paths = attention_linears(pipe.unet)
    write_peft(tmp_path / "c.safetensors", random_layers(pipe.unet, paths, rank=4, seed=1))
    write_kohya(tmp_path / "s.safetensors", random_layers(pipe.unet, paths, rank=4, seed=2, scale=0.07))
    klora = KLoRA(pipe, tmp_path / "c.safetensors", tmp_path / "s.safetensors")
    with_pipeline = _generate(pipe, steps=6)
    pipeline_log = klora.selection_log()["generations"][-1]
    assert [s["step"] for s in pipeline_log["steps"]] == list(range(6))
    klora.detach()

    # The same fusion attached to the bare UNet counts distinct timesteps instead.
    klora = KLoRA(pipe.unet, tmp_path / "c.safetensors", tmp_path / "s.safetensors", num_inference_steps=6)
    bare = _generate(pipe, steps=6)
    assert klora.selection_log()["generations"][-1] == pipeline_log
    assert (bare == with_pipeline).all()
    klora.detach()


def test_no_shared_layer_warns_and_runs(pipe, tmp_path):
    paths = attention_linears(pipe.unet)
    write_peft(tmp_path / "c.safetensors", random_layers(pipe.unet, paths[:30], rank=4, seed=1))
    write_peft(tmp_path / "s.safetensors", random_layers(pipe.unet, paths[30:], rank=4, seed=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        klora = KLoRA(pipe, tmp_path / "c.safetensors", tmp_path / "s.safetensors")
    assert any("no layer in common" in str(w.message) for w in caught)
    assert klora.paths == [] and len(klora.only) == len(paths)
    image = _generate(pipe, steps=2)
    klora.set_method("merge")
    assert (_generate(pipe, steps=2) == image).all()  # both LoRAs on their own layers either way
    klora.detach()


def test_selection_log_names_are_module_paths_and_cross_attention_scale(pipe, lora_pair):
    content_path, style_path, _, _ = lora_pair
    klora = KLoRA(pipe, content_path, style_path, switching="adapters")
    modules = dict(pipe.unet.named_modules())
    for name in klora.selection_log()["layers"]:
        assert isinstance(modules[name].base_layer, torch.nn.Linear) and not name.endswith("base_layer")
    # cross_attention_kwargs scale rescales the active adapters and must leave them as they were.
    scalings = {p: dict(m.scaling) for p, m in pipe.unet.named_modules() if hasattr(m, "scaling")}
    half = _generate(pipe, steps=4, cross_attention_kwargs={"scale": 0.5})
    assert {p: dict(m.scaling) for p, m in pipe.unet.named_modules() if hasattr(m, "scaling")} == scalings
    full = _generate(pipe, steps=4)
    klora.detach()

    # Fused weights fold the same scale in: the same images, and the scale does not stick.
    klora = KLoRA(pipe, content_path, style_path)
    assert klora.switching == "fused"
    for name in klora.selection_log()["layers"]:
        assert type(modules[name].base_layer) is type(dict(pipe.unet.named_modules())[name])
    assert np.abs(_generate(pipe, steps=4, cross_attention_kwargs={"scale": 0.5}) - half).max() < 1e-5
    assert np.abs(_generate(pipe, steps=4) - full).max() < 1e-5
    klora.detach()


def test_rule_module_agrees_with_klora_choices_at(pipe, lora_pair):
    content_path, style_path, _, _ = lora_pair
    klora = KLoRA(pipe, content_path, style_path, pattern="s")
    for p in (0.0, 0.3, 0.9):
        scale = rule.scale_at(p, "s", 1.5, 0.5)
        expected = {path: "content" if rule.prefers_content(s.content_topk_sum, s.style_topk_sum, klora.gamma, scale)
                    else "style" for path, s in klora.stats.items()}
        assert klora.choices_at(p) == expected
    klora.detach()


@pytest.mark.parametrize("scheduler_kind", ["euler (step_index)", "ddim (no step_index)"])
def test_no_step_reads_the_timestep_off_the_device(tiny_sdxl_dir, tiny_sd_dir, lora_pair, tmp_path, monkeypatch,
                                                  scheduler_kind):
    """Reading a GPU timestep is a device sync that stalls the pipeline: K-LoRA reads one per generation
    (to place its first step), then follows the scheduler's step index or counts its step() calls."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from klora import fusion

    if scheduler_kind.startswith("euler"):
        p = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
        content, style = lora_pair[0], lora_pair[1]
    else:
        p = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
        paths = attention_linears(p.unet)
        write_peft(tmp_path / "c.safetensors", random_layers(p.unet, paths, rank=4, seed=1))
        write_peft(tmp_path / "s.safetensors", random_layers(p.unet, paths, rank=4, seed=2, scale=0.07))
        content, style = tmp_path / "c.safetensors", tmp_path / "s.safetensors"
    p.set_progress_bar_config(disable=True)
    assert hasattr(p.scheduler, "step_index") == scheduler_kind.startswith("euler")
    klora = KLoRA(p, content, style)
    reads = []
    value = fusion._timestep_value
    monkeypatch.setattr(fusion, "_timestep_value", lambda t: reads.append(t) or value(t))
    for steps in (6, 4):
        _generate(p, steps=steps)
        assert _log_steps(klora) == [(i, i / steps) for i in range(steps)]
    assert len(reads) <= 2  # at most one per generation
    klora.detach()
    assert "step" not in vars(p.scheduler)  # the scheduler has its own step() back
