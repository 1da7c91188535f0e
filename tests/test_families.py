"""K-LoRA on every image family, at the library level, on tiny pipelines loaded the real way.

Each family's tiny pipeline is written once (``klora.tiny.build_tiny``) and loaded with
``DiffusionPipeline.from_pretrained``. LoRAs are random factors written to real
.safetensors files; the ground truth (dense updates, the K-LoRA rule, progress) is
recomputed here from the tensors written and from the pipeline's own scheduler, never
read back from ``klora``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from applied import applied_delta, base_weights
from family_lora_files import (block_linears, flux2_units, kohya_key, spread, units, write_original,
                               z_image_fused_qkv_units)
from flux_lora_files import fused_units, truth, write_diffusers, write_kohya, write_xlabs
from klora.errors import KLoRAError
from klora.fusion import KLoRA
from klora.loras import LoRAError
from klora.tiny import TINY_CALL_KWARGS, TINY_SIZES, build_tiny

# tiny key -> (pipeline class, K-LoRA family name, how the denoiser sees the scheduler's t in [0, T])
FAMILIES = {
    "sd3": ("StableDiffusion3Pipeline", "Stable Diffusion 3", lambda x: x),
    "qwen-image": ("QwenImagePipeline", "Qwen-Image", lambda x: 1000 * x),  # gets t / 1000
    "z-image": ("ZImagePipeline", "Z-Image", lambda x: 1000 * (1 - x)),  # gets (1000 - t) / 1000, increasing
    "flux2-klein": ("Flux2KleinPipeline", "FLUX.2", lambda x: 1000 * x),
    "chroma": ("ChromaPipeline", "Chroma", lambda x: 1000 * x),
    "sana": ("SanaPipeline", "Sana", lambda x: x),
    "lumina2": ("Lumina2Pipeline", "Lumina 2", lambda x: 1000 * (1 - x)),  # also reversed
}
# Lumina2Pipeline has no interrupt flag in its loop.
INTERRUPTIBLE = [key for key in FAMILIES if key != "lumina2"]
# Denoiser calls per step at guidance_scale 4: these run the negative prompt as a second call, the others
# batch it (SD3, Z-Image, Sana) or have no CFG without a negative prompt (Qwen-Image).
CALLS_PER_STEP = {"flux2-klein": 2, "chroma": 2, "lumina2": 2}
PROMPT = "a sbu dog, szn watercolor"


# --- tiny pipelines and LoRAs, written once per session -----------------------------


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``tiny(key)``: the folder of the tiny pipeline of ``key``, built on first use."""
    root = tmp_path_factory.mktemp("family-models")
    built = {}

    def folder(key: str) -> str:
        if key not in built:
            built[key] = build_tiny(key, root / key)
        return built[key]

    return folder


def load(folder, cls=None):
    from diffusers import DiffusionPipeline

    pipe = (cls or DiffusionPipeline).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_of(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def generate(pipe, key, steps=3, seed=0, **extra):
    size = TINY_SIZES[key]
    kwargs = dict(TINY_CALL_KWARGS[key], **extra)
    kwargs.setdefault("guidance_scale", 4.0)
    # prompt by keyword: FLUX.2 klein's first parameter is an image
    return pipe(prompt=PROMPT, num_inference_steps=steps, height=size, width=size, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture(scope="session")
def family_loras(tiny, tmp_path_factory):
    """``family_loras(key)``: (content file, style file, content truth, style truth), PEFT format.

    Content: rank 4, alphas 2/4/8 by layer, magnitudes that wander by layer, on every
    block linear but the last three. Style: rank 6, alpha 3, on every block linear but
    the first three. So the two differ in rank, alpha and layer set, and the first (last)
    three layers are adapted by the content (style) LoRA only.
    """
    root = tmp_path_factory.mktemp("family-loras")
    made = {}

    def pair(key: str):
        if key not in made:
            denoiser = denoiser_of(load(tiny(key)))
            layers = block_linears(denoiser)
            content = units(denoiser, layers[:-3], rank=4, alpha=lambda i: [2.0, 4.0, 8.0][i % 3], seed=1,
                            scale=spread)
            style = units(denoiser, layers[3:], rank=6, alpha=3.0, seed=2, scale=0.05)
            paths = root / f"{key}-content.safetensors", root / f"{key}-style.safetensors"
            write_diffusers(paths[0], content)
            write_diffusers(paths[1], style)
            made[key] = (str(paths[0]), str(paths[1]), truth(content, denoiser), truth(style, denoiser))
        return made[key]

    return pair


# --- the rule, recomputed from the tensors written -----------------------------------


def independent_rule(content, style):
    """({module: (K, S_c, S_s)}, gamma) from ground-truth updates, in float64 (KLORA_SPEC.md)."""
    stats, ratios = {}, []
    for module in (m for m in content if m in style):
        (dc, rc), (ds, rs) = content[module], style[module]
        k = rc * rs
        stats[module] = (k, float(dc.abs().flatten().topk(k).values.sum()),
                         float(ds.abs().flatten().topk(k).values.sum()))
        ratios.append(float(dc.abs().sum() / ds.abs().sum()))
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return stats, sum(kept) / len(kept)


def expected_scale(progress, pattern, alpha, beta):
    value = alpha * progress + beta
    return value % alpha if pattern == "s*" else value


def expected_choices(stats, gamma, scale):
    return {m: ("content" if sc / gamma > ss * scale else "style") for m, (_, sc, ss) in stats.items()}


def log_steps(klora, generation=-1):
    return [(s["step"], s["progress"]) for s in klora.selection_log()["generations"][generation]["steps"]]


def assert_log_follows_rule(klora, content, style, pattern, alpha, beta, progress):
    """The last generation's steps are 0..N-1 at ``progress`` and each choice is the rule's."""
    stats, gamma = independent_rule(content, style)
    steps = klora.selection_log()["generations"][-1]["steps"]
    assert [s["step"] for s in steps] == list(range(len(progress)))
    switched = set()
    for entry, p in zip(steps, progress):
        assert entry["progress"] == pytest.approx(p, abs=1e-9)
        scale = expected_scale(p, pattern, alpha, beta)
        assert entry["scale"] == pytest.approx(scale)
        assert entry["choices"] == expected_choices(stats, gamma, scale), entry["step"]
        switched.add(tuple(entry["choices"].values()))
    return switched


def timestep_recorder(denoiser):
    """A forward pre-hook that records the timestep each denoiser call receives."""
    seen = []

    def record(module, args, kwargs):
        t = kwargs.get("timestep")
        if t is None:  # UNets take it second, positionally
            t = args[1]
        seen.append(float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t))

    return seen, denoiser.register_forward_pre_hook(record, with_kwargs=True)


def untouched(denoiser, state):
    """Every weight bit-identical to ``state``, no PEFT layer, no hook, no K-LoRA mark."""
    after = denoiser.state_dict()
    return (list(after) == list(state) and all(torch.equal(state[k], after[k]) for k in state)
            and not any("lora" in type(m).__name__.lower() for m in denoiser.modules())
            and not any(m._forward_pre_hooks or m._forward_hooks for m in denoiser.modules())
            and not getattr(denoiser, "peft_config", None) and not hasattr(denoiser, "_klora_attached"))


def snapshot(denoiser):
    return {k: v.clone() for k, v in denoiser.state_dict().items()}


# --- 1. the per-step choice is the rule's --------------------------------------------


@pytest.mark.parametrize("key", FAMILIES)
def test_choices_equal_the_rule_recomputed_from_the_files(tiny, family_loras, key):
    pipe = load(tiny(key))
    assert type(pipe).__name__ == FAMILIES[key][0]
    content_file, style_file, content, style = family_loras(key)
    before = base_weights(pipe.transformer)
    klora = KLoRA(pipe, content_file, style_file, pattern="s")
    assert klora.family.name == FAMILIES[key][1]
    assert list(klora.denoisers) == ["transformer"]

    stats, gamma = independent_rule(content, style)
    assert klora.paths == [m for m in block_linears(pipe.transformer) if m in stats]  # model order
    assert klora.gamma == pytest.approx(gamma, rel=1e-5)
    for module, (k, sc, ss) in stats.items():
        assert klora.stats[module].k == k == 24
        assert klora.stats[module].content_topk_sum == pytest.approx(sc, rel=1e-5)
        assert klora.stats[module].style_topk_sum == pytest.approx(ss, rel=1e-5)
    layers = block_linears(pipe.transformer)
    assert klora.only == {**{m: "content" for m in layers[:3]}, **{m: "style" for m in layers[-3:]}}

    steps = 4
    generate(pipe, key, steps=steps)
    switched = assert_log_follows_rule(klora, content, style, "s", 1.5, 0.5, [i / steps for i in range(steps)])
    assert len(switched) > 1, "the choices should change during the run"
    assert {c for choice in switched for c in choice} == {"content", "style"}
    # Layers one LoRA adapts apply it throughout (read off the weights after the run).
    assert klora.selection_log()["only"] == klora.only
    for module, role in klora.only.items():
        expected = (content if role == "content" else style)[module][0]
        assert torch.allclose(applied_delta(pipe.transformer, module, before), expected, rtol=1e-5, atol=1e-8)
    klora.detach()


# --- 2. forced schedules are the single-LoRA models ----------------------------------


@pytest.mark.parametrize("key", FAMILIES)
def test_forced_schedules_equal_one_lora_and_klora_differs(tiny, tmp_path, key):
    pipe = load(tiny(key))
    t = pipe.transformer
    layers = block_linears(t)
    # Same layers (a layer only one LoRA adapts would keep it under any schedule), other ranks and alphas.
    write_diffusers(tmp_path / "c.safetensors", units(t, layers, rank=4, alpha=lambda i: 1.0 + i % 4, seed=3,
                                                      scale=spread))
    write_diffusers(tmp_path / "s.safetensors", units(t, layers, rank=8, alpha=4.0, seed=4, scale=0.05))
    # scale = 1e-12 * p + 1e-12: S_s * scale ~ 0, so content wins everywhere.
    klora = KLoRA(pipe, str(tmp_path / "c.safetensors"), str(tmp_path / "s.safetensors"), pattern="s",
                  alpha=1e-12, beta=1e-12)
    forced_content = generate(pipe, key)
    assert {c for s in klora.selection_log()["generations"][-1]["steps"] for c in s["choices"].values()} \
        == {"content"}
    klora.set_schedule("s", 1.5, 1e12)
    forced_style = generate(pipe, key)
    assert {c for s in klora.selection_log()["generations"][-1]["steps"] for c in s["choices"].values()} \
        == {"style"}
    klora.set_method("content")
    content_only = generate(pipe, key)
    klora.set_method("style")
    style_only = generate(pipe, key)
    klora.set_method("klora")
    klora.set_schedule("s", 1.5, 0.5)
    fused = generate(pipe, key)
    klora.detach()

    np.testing.assert_array_equal(forced_content, content_only)
    np.testing.assert_array_equal(forced_style, style_only)
    assert np.abs(content_only - style_only).max() > 1e-3
    assert np.abs(fused - content_only).max() > 1e-4 and np.abs(fused - style_only).max() > 1e-4


# --- 3. progress is step / steps of the pipeline's own schedule ----------------------


@pytest.mark.parametrize("key", FAMILIES)
def test_progress_is_step_over_steps_for_any_run(tiny, family_loras, key):
    pipe = load(tiny(key))
    content_file, style_file, content, style = family_loras(key)
    klora = KLoRA(pipe, content_file, style_file)
    calls, hook = timestep_recorder(pipe.transformer)
    for steps in (2, 5):
        calls.clear()
        generate(pipe, key, steps=steps)
        assert_log_follows_rule(klora, content, style, "s*", 1.5, 1.275, [i / steps for i in range(steps)])
        assert len(calls) == CALLS_PER_STEP.get(key, 1) * steps
    reference = klora.selection_log()["generations"][-1]

    # A run that fails part-way (an exception in a callback) does not shift the next one.
    def fail_at_step_1(p, step, timestep, callback_kwargs):
        if step == 1:
            raise RuntimeError("stopped by the user")
        return callback_kwargs

    with pytest.raises(RuntimeError, match="stopped by the user"):
        generate(pipe, key, steps=5, callback_on_step_end=fail_at_step_1)
    assert log_steps(klora) == [(0, 0.0), (1, 0.2)]
    generate(pipe, key, steps=5)
    assert klora.selection_log()["generations"][-1] == reference

    if key in INTERRUPTIBLE:  # the pipeline's own interrupt flag
        def interrupt_after_step_2(p, step, timestep, callback_kwargs):
            if step == 2:
                p._interrupt = True
            return callback_kwargs

        generate(pipe, key, steps=5, callback_on_step_end=interrupt_after_step_2)
        assert log_steps(klora) == [(0, 0.0), (1, 0.2), (2, 0.4)]
        generate(pipe, key, steps=5)
        assert klora.selection_log()["generations"][-1] == reference
    hook.remove()
    assert [g["num_inference_steps"] for g in klora.selection_log()["generations"]][:2] == [2, 5]
    klora.detach()


def test_qwen_image_true_cfg_two_calls_per_step_at_t_over_1000(tiny, family_loras):
    pipe = load(tiny("qwen-image"))
    content_file, style_file, content, style = family_loras("qwen-image")
    klora = KLoRA(pipe, content_file, style_file)
    seen, hook = timestep_recorder(pipe.transformer)
    for steps in (3, 4):
        seen.clear()
        generate(pipe, "qwen-image", steps=steps, true_cfg_scale=4.0, negative_prompt="blurry")
        timesteps = [float(t) for t in pipe.scheduler.timesteps]
        # Two transformer calls per step (prompt, negative prompt), each at t / 1000.
        assert seen == pytest.approx([t / 1000 for t in timesteps for _ in range(2)], rel=1e-6)
        assert max(seen) <= 1.0 and len(seen) == 2 * steps
        assert_log_follows_rule(klora, content, style, "s*", 1.5, 1.275, [i / steps for i in range(steps)])
    hook.remove()
    klora.detach()


def test_z_image_timestep_increases_and_the_log_is_still_right(tiny, family_loras):
    pipe = load(tiny("z-image"))
    content_file, style_file, content, style = family_loras("z-image")
    klora = KLoRA(pipe, content_file, style_file, pattern="s")
    seen, hook = timestep_recorder(pipe.transformer)
    steps = 4
    generate(pipe, "z-image", steps=steps)
    hook.remove()
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    assert seen == pytest.approx([(1000 - t) / 1000 for t in timesteps], abs=1e-6)
    assert seen == sorted(seen) and seen[0] == 0.0 and len(set(seen)) == steps  # grows as the noise falls
    assert_log_follows_rule(klora, content, style, "s", 1.5, 0.5, [i / steps for i in range(steps)])
    klora.detach()


@pytest.mark.parametrize("key,progress", [pytest.param(k, p, id=f"{k}-{p}") for k in FAMILIES
                                          for p in ("steps", "noise")])
def test_a_bare_denoiser_follows_the_same_schedule(tiny, family_loras, key, progress):
    """Without a pipeline K-LoRA only sees the timesteps the denoiser is handed, in the family's
    convention (t, t / 1000, or (1000 - t) / 1000): the log must be the pipeline's all the same."""
    pipe = load(tiny(key))
    content_file, style_file, _, _ = family_loras(key)
    runs = []
    for target, steps in ((pipe, None), (pipe.transformer, 4)):
        klora = KLoRA(target, content_file, style_file, pattern="s", progress=progress, num_inference_steps=steps)
        images = generate(pipe, key, steps=4)
        runs.append((images, klora.selection_log()["generations"]))
        klora.detach()
    (with_pipeline, expected), (bare, generations) = runs
    assert len(generations) == 1
    assert [s["step"] for s in generations[0]["steps"]] == [s["step"] for s in expected[0]["steps"]]
    for got, want in zip(generations[0]["steps"], expected[0]["steps"]):
        assert got["progress"] == pytest.approx(want["progress"], abs=1e-6)
        assert got["choices"] == want["choices"]
    assert np.abs(bare - with_pipeline).max() < 1e-6


@pytest.mark.parametrize("key", FAMILIES)
def test_noise_progress_is_one_minus_t_over_T(tiny, family_loras, key):
    pipe = load(tiny(key))
    content_file, style_file, content, style = family_loras(key)
    klora = KLoRA(pipe, content_file, style_file, pattern="s", progress="noise")
    seen, hook = timestep_recorder(pipe.transformer)
    steps = 4
    generate(pipe, key, steps=steps)
    hook.remove()
    train = pipe.scheduler.config.num_train_timesteps
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    assert len(timesteps) == steps and train == 1000
    expected = [1 - t / train for t in timesteps]
    # The same from what the denoiser received, read through the family's convention.
    from_denoiser = [1 - FAMILIES[key][2](x) / train for x in dict.fromkeys(seen)]
    assert from_denoiser == pytest.approx(expected, abs=1e-5)
    switched = assert_log_follows_rule(klora, content, style, "s", 1.5, 0.5, expected)
    assert klora.selection_log()["progress"] == "noise"
    assert expected[0] < 0.01 and all(a < b for a, b in zip(expected, expected[1:]))
    assert len(switched) > 1
    klora.detach()


# --- 4. fused and adapter switching agree; detach restores every bit --------------------


@pytest.mark.parametrize("key", FAMILIES)
def test_fused_and_adapters_agree_and_detach_restores_every_bit(tiny, family_loras, key):
    pipe = load(tiny(key))
    content_file, style_file, _, _ = family_loras(key)
    t = pipe.transformer
    state = snapshot(t)
    plain = generate(pipe, key)
    results = {}
    for switching in ("fused", "adapters"):
        klora = KLoRA(pipe, content_file, style_file, switching=switching)
        assert klora.switching == switching
        images = generate(pipe, key)
        log = klora.selection_log()
        assert log.pop("switching") == switching
        results[switching] = images, log
        klora.detach()
        assert untouched(t, state), switching
    (fused, fused_log), (adapters, adapters_log) = results["fused"], results["adapters"]
    assert fused_log == adapters_log
    assert np.abs(fused - adapters).max() < 1e-5
    assert np.abs(fused - plain).max() > 1e-3
    np.testing.assert_array_equal(generate(pipe, key), plain)


@pytest.mark.parametrize("key", FAMILIES)
def test_an_extra_lora_applies_at_its_scale_in_both_switching_modes(tiny, family_loras, key):
    """Issue 15 on every family: the style file as an always-on extra LoRA at 0.6 beside method=content."""
    pipe = load(tiny(key))
    content_file, style_file, content, style = family_loras(key)
    t = pipe.transformer
    state = snapshot(t)
    modules = dict(t.named_modules())
    images = {}
    for switching in ("fused", "adapters"):
        klora = KLoRA(pipe, content_file, style_file, method="content", switching=switching,
                      extra_loras=[(style_file, 0.6)])
        if switching == "fused":
            for path in set(content) | set(style):
                want = (content[path][0] if path in content else 0) + 0.6 * (style[path][0] if path in style else 0)
                got = modules[path].weight.double() - state[f"{path}.weight"].double()
                torch.testing.assert_close(got.flatten(1), want, rtol=0, atol=2e-6)
        images[switching] = generate(pipe, key)
        klora.detach()
        assert untouched(t, state), switching
    assert np.abs(images["fused"] - images["adapters"]).max() < 1e-5


# --- 5. every format diffusers converts for the family --------------------------------


# Each maker: (denoiser, seed) -> (units, writer). Seed 1 makes the content LoRA, seed 2 the style LoRA,
# with other ranks and alphas (and per-layer alphas on the content side where the format stores them).
def _peft(metadata):
    def make(t, seed):
        rank, alpha = (lambda i: 2 + i % 3, lambda i: 1.0 + i % 4) if seed == 1 else (5, 2.5)
        return units(t, block_linears(t), rank=rank, alpha=alpha if metadata else None, seed=seed, scale=spread), \
            (lambda p, u: write_diffusers(p, u, metadata=metadata))

    return make


def _original(down, up, key=None, alpha_keys=True, prefix="diffusion_model."):
    """Original-model names (lora_A/B or lora_down/up) with .alpha; ``key`` renames modules."""
    def make(t, seed):
        made = units(t, block_linears(t), rank=4 if seed == 1 else 6,
                     alpha=(lambda i: [1.0, 3.0, 8.0][i % 3]) if seed == 1 else 2.0,
                     seed=seed, scale=spread, key=key)
        return made, (lambda p, u: write_original(p, u, prefix=prefix, down=down, up=up, alpha_keys=alpha_keys))

    return make


def _z_image_fused_qkv(t, seed):
    made = z_image_fused_qkv_units(t, rank=4 if seed == 1 else 5, alpha=(lambda i: 2.0 + i) if seed == 1 else 5.0,
                                   seed=seed, scale=spread)
    return made, lambda p, u: write_original(p, u, prefix="", down="lora_down", up="lora_up")


def _flux2(layout, down="lora_A", up="lora_B", alpha=False):
    def make(t, seed):
        alphas = (lambda i: [1.0, 2.0, 8.0][i % 3]) if seed == 1 else 3.0
        made = flux2_units(t, layout, rank=4 if seed == 1 else 6, alpha=alphas if layout == "kohya" or alpha else None,
                           seed=seed, scale=spread)
        if layout == "kohya":
            return made, write_kohya
        return made, lambda p, u: write_original(p, u, down=down, up=up, alpha_keys=alpha)

    return make


def _alpha_keys(t, seed):
    """ai-toolkit style: ``transformer.<module>.lora_A.weight`` plus a 0-dim ``transformer.<module>.alpha``."""
    made = units(t, block_linears(t), rank=4 if seed == 1 else 6, alpha=(lambda i: 1.0 + i % 4) if seed == 1 else 2.0,
                 seed=seed, scale=spread)
    return made, lambda p, u: write_diffusers(p, u, metadata=False, alpha_keys=True)


def _flux1(layout):
    """FLUX.1 community layouts on Chroma (no modulation linears; kohya linear1 needs FLUX.1's real sizes)."""
    def make(t, seed):
        if layout == "ai-toolkit":
            return units(t, block_linears(t, r"\.attn\.(to_q|to_k|to_v|to_out\.0)$"), rank=4 if seed == 1 else 8,
                         alpha=lambda i: 0.5 * (1 + i % 5), seed=seed, scale=spread), \
                (lambda p, u: write_diffusers(p, u, metadata=False, alpha_keys=True))
        keep = (lambda name: not name.endswith(("mod_lin", "modulation_lin")) and name != "linear1")
        made = fused_units(t, layout, rank=4 if seed == 1 else 6, alpha=2.0 if seed == 1 else 3.0, seed=seed,
                           scale=0.05, keep=keep)
        return made, (write_kohya if layout == "kohya" else write_xlabs)

    return make


FORMATS = {
    **{(key, "peft"): _peft(True) for key in FAMILIES},
    **{(key, "peft-no-alpha"): _peft(False) for key in FAMILIES},
    ("qwen-image", "diffusion_model lora_A/B + alpha"): _original("lora_A", "lora_B"),
    ("qwen-image", "diffusion_model lora_down/up + alpha"): _original("lora_down", "lora_up"),
    ("qwen-image", "kohya lora_unet_ + alpha"): _original("lora_down", "lora_up", key=kohya_key, prefix=""),
    ("z-image", "diffusion_model lora_A/B + alpha"): _original("lora_A", "lora_B"),
    ("z-image", "kohya lora_unet_ + alpha"): _original("lora_down", "lora_up", key=kohya_key, prefix=""),
    ("z-image", "kohya fused attention_qkv + alpha"): _z_image_fused_qkv,
    ("flux2-klein", "kohya lora_unet_ fused qkv + alpha"): _flux2("kohya"),
    ("flux2-klein", "ai-toolkit diffusion_model fused qkv"): _flux2("original"),
    ("chroma", "FLUX.1 kohya"): _flux1("kohya"),
    ("chroma", "FLUX.1 XLabs"): _flux1("xlabs"),
    ("chroma", "FLUX.1 ai-toolkit .alpha keys"): _flux1("ai-toolkit"),
}


# Layouts diffusers' converters alone get wrong; klora.loras / klora.formats bring them through exactly.
FORMATS.update({
    ("qwen-image", "transformer. lora_A/B + .alpha keys"): _alpha_keys,
    ("z-image", "transformer. lora_A/B + .alpha keys"): _alpha_keys,
    ("flux2-klein", "diffusion_model lora_down/up"): _flux2("original", down="lora_down", up="lora_up"),
    ("flux2-klein", "diffusion_model lora_A/B + .alpha"): _flux2("original", alpha=True),
})


@pytest.mark.parametrize("key,layout", [pytest.param(k, f, id=f"{k}-{f}") for k, f in FORMATS])
def test_each_format_applies_exactly_alpha_over_rank_b_a(tiny, tmp_path, key, layout):
    pipe = load(tiny(key))
    t = pipe.transformer
    expected = {}
    for role, seed in (("content", 1), ("style", 2)):
        made, writer = FORMATS[key, layout](t, seed)
        writer(tmp_path / f"{role}.safetensors", made)
        expected[role] = truth(made, t)
    before = base_weights(t)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        klora = KLoRA(pipe, str(tmp_path / "content.safetensors"), str(tmp_path / "style.safetensors"))
    messages = [str(w.message) for w in caught]
    if layout == "peft-no-alpha":  # loaded at alpha = rank, and the user is told so
        assert any("no alpha in the file" in m and "content LoRA" in m for m in messages)
    for role in ("content", "style"):
        klora.set_method(role)
        for module, (delta, _) in expected[role].items():
            got = applied_delta(t, module, before)
            assert torch.allclose(got, delta, rtol=1e-5, atol=1e-8), (role, module)
        now = base_weights(t)
        assert all(torch.equal(now[m], before[m]) for m in set(before) - set(expected[role])), role
    klora.set_method("klora")
    shared = set(expected["content"]) & set(expected["style"])
    assert set(klora.paths) == shared and shared
    stats, gamma = independent_rule(expected["content"], expected["style"])
    assert klora.gamma == pytest.approx(gamma, rel=1e-5)
    assert all(klora.stats[m].k == k for m, (k, _, _) in stats.items())
    for p in (0.0, 0.4, 0.8):
        assert klora.choices_at(p) == expected_choices(stats, gamma, expected_scale(p, "s*", 1.5, 1.275))
    klora.detach()


# --- 6. SDXL img2img and SDXL with a ControlNet ------------------------------------------


@pytest.fixture(scope="session")
def sdxl_loras(tiny, tmp_path_factory):
    """(content file, style file, content truth, style truth) for the tiny SDXL UNet, PEFT format:
    content rank 4 with mixed alphas on every attention linear, style rank 8 on the first 40."""
    from diffusers import UNet2DConditionModel

    from lora_files import attention_linears, delta, random_layers, write_peft

    unet = UNet2DConditionModel.from_pretrained(tiny("sdxl"), subfolder="unet")
    paths = attention_linears(unet)
    content = random_layers(unet, paths, rank=4, alpha=lambda i: [2.0, 4.0, 8.0][i % 3], seed=11, scale=0.05)
    style = random_layers(unet, paths[:40], rank=8, alpha=4.0, seed=12, scale=0.06)
    folder = tmp_path_factory.mktemp("sdxl-loras")
    write_peft(folder / "content.safetensors", content)
    write_peft(folder / "style.safetensors", style)

    def as_truth(layers):
        return {p: (delta(layer), layer[0].shape[0]) for p, layer in layers.items()}

    return str(folder / "content.safetensors"), str(folder / "style.safetensors"), as_truth(content), as_truth(style)


def _img2img(pipe, steps, strength=0.5):
    init = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    return pipe(prompt=PROMPT, image=init, strength=strength, num_inference_steps=steps, guidance_scale=5.0,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("progress", ["steps", "noise"])
def test_sdxl_img2img_at_strength_half(tiny, sdxl_loras, progress):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = load(tiny("sdxl"), StableDiffusionXLImg2ImgPipeline)
    content_file, style_file, content, style = sdxl_loras
    klora = KLoRA(pipe, content_file, style_file, pattern="s", progress=progress)
    assert list(klora.denoisers) == ["unet"]
    seen, hook = timestep_recorder(pipe.unet)
    steps = 20
    _img2img(pipe, steps)
    hook.remove()
    run = list(dict.fromkeys(seen))  # the timesteps the UNet really ran at (CFG is batched: one call a step)
    scheduled = [float(t) for t in pipe.scheduler.timesteps]
    assert len(run) == len(seen) == steps // 2 and run == scheduled[steps // 2:]
    if progress == "steps":
        expected = [i / len(run) for i in range(len(run))]
    else:
        expected = [1 - t / pipe.scheduler.config.num_train_timesteps for t in run]
        assert abs(expected[0] - 0.5) < 0.06  # the noise the run starts from, not 0
    switched = assert_log_follows_rule(klora, content, style, "s", 1.5, 0.5, expected)
    assert len(switched) > 1
    assert klora.selection_log()["generations"][-1]["num_inference_steps"] == len(run)
    klora.detach()


def test_sdxl_controlnet_klora_on_the_unet_only(tiny, sdxl_loras):
    pipe = load(tiny("sdxl-controlnet"))
    content_file, style_file, content, style = sdxl_loras
    control = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    controlnet_state, unet_state = snapshot(pipe.controlnet), snapshot(pipe.unet)
    plain = generate(pipe, "sdxl-controlnet", steps=4, image=control)

    klora = KLoRA(pipe, content_file, style_file, pattern="s")
    assert klora.denoisers == {"unet": pipe.unet} and klora.family.name == "Stable Diffusion XL"
    during = []

    def check_controlnet(p, step, timestep, callback_kwargs):
        during.append(untouched(p.controlnet, controlnet_state))
        return callback_kwargs

    images = generate(pipe, "sdxl-controlnet", steps=4, image=control, callback_on_step_end=check_controlnet)
    assert during == [True] * 4
    switched = assert_log_follows_rule(klora, content, style, "s", 1.5, 0.5, [i / 4 for i in range(4)])
    assert len(switched) > 1
    assert np.abs(images - plain).max() > 1e-3
    klora.detach()
    assert untouched(pipe.controlnet, controlnet_state) and untouched(pipe.unet, unet_state)
    np.testing.assert_array_equal(generate(pipe, "sdxl-controlnet", steps=4, image=control), plain)


# --- 7. a LoRA for another family; a loop K-LoRA cannot follow ---------------------------


def _foreign_lora(tiny, source, folder):
    """A PEFT LoRA written for the tiny ``source`` model ("flux", "sdxl" or "qwen-image")."""
    if source == "sdxl":
        from diffusers import UNet2DConditionModel

        from lora_files import attention_linears, random_layers, write_peft

        unet = UNet2DConditionModel.from_pretrained(tiny("sdxl"), subfolder="unet")
        write_peft(folder / "foreign.safetensors", random_layers(unet, attention_linears(unet), rank=4))
    else:
        denoiser = denoiser_of(load(tiny(source)))
        write_diffusers(folder / "foreign.safetensors", units(denoiser, block_linears(denoiser), seed=9))
    return str(folder / "foreign.safetensors")


WRONG_FAMILY = [
    ("flux", "FLUX.1", "qwen-image", "Qwen-Image"),
    ("sdxl", "Stable Diffusion", "sd3", "Stable Diffusion 3"),
    ("qwen-image", "Qwen-Image", "z-image", "Z-Image"),
]


@pytest.mark.parametrize("source,source_name,target,target_name", WRONG_FAMILY)
@pytest.mark.parametrize("wrong", ["content", "style"])
def test_a_lora_for_another_family_is_one_line_and_nothing_stays(tiny, family_loras, tmp_path, source, source_name,
                                                                  target, target_name, wrong):
    foreign = _foreign_lora(tiny, source, tmp_path)
    pipe = load(tiny(target))
    good = family_loras(target)[0]
    state = snapshot(pipe.transformer)
    files = (foreign, good) if wrong == "content" else (good, foreign)
    with pytest.raises(LoRAError) as error:
        KLoRA(pipe, *files)
    message = str(error.value)
    assert "\n" not in message and f"{wrong} LoRA" in message and "foreign.safetensors" in message
    assert f"this LoRA is for {source_name}; the model is {target_name}" in message
    assert untouched(pipe.transformer, state)
    KLoRA(pipe, good, family_loras(target)[1]).detach()  # and K-LoRA attaches cleanly afterwards
    assert untouched(pipe.transformer, state)


def test_a_loop_klora_cannot_follow_is_refused(tmp_path):
    import diffusers
    from diffusers import SkyReelsV2DiffusionForcingPipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    from klora.pipelines import check_supported, family_of

    torch.manual_seed(0)
    transformer = SkyReelsV2Transformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                               out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=1,
                                               rope_max_seq_len=16)
    pipe = SkyReelsV2DiffusionForcingPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=None,
                                              scheduler=UniPCMultistepScheduler())
    layers = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]
    write_diffusers(tmp_path / "c.safetensors", units(transformer, layers, seed=1))
    write_diffusers(tmp_path / "s.safetensors", units(transformer, layers, seed=2))
    state = snapshot(transformer)
    with pytest.raises(KLoRAError) as error:
        KLoRA(pipe, str(tmp_path / "c.safetensors"), str(tmp_path / "s.safetensors"))
    message = str(error.value)
    assert "\n" not in message and "SkyReelsV2DiffusionForcingPipeline" in message
    assert "cannot follow this pipeline's denoising loop" in message
    assert untouched(transformer, state)
    # The other loops of the kind, by class: each named, each refused.
    for name in ("SkyReelsV2DiffusionForcingImageToVideoPipeline", "HunyuanVideoFramepackPipeline",
                 "HeliosPyramidPipeline"):
        family = family_of(getattr(diffusers, name))
        assert family.unsupported, name
        with pytest.raises(KLoRAError, match=f"^{name}: K-LoRA cannot follow"):
            check_supported(family, name)
    for name in ("SkyReelsV2Pipeline", "HeliosPipeline", "HunyuanVideoPipeline"):  # their plain loops are fine
        check_supported(family_of(getattr(diffusers, name)), name)
