"""K-LoRA on every video family, through the library: tiny real pipelines, LoRAs written from known tensors.

Families: Wan 2.1 T2V, Wan 2.2 (two experts), HunyuanVideo, LTX-Video, CogVideoX, AnimateDiff. The
expected selection is recomputed here from the written tensors in float64 (``alpha / rank * B @ A``,
K = r_c * r_s, top-K sums, gamma as the trimmed mean of L1 ratios), never read off ``klora``; Wan 2.2's
expert for each step comes from the boundary rule ``t >= 0.875 * 1000`` on the scheduler's timesteps.
What a layer applies is read off the model (``applied.applied_delta``).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from applied import applied_delta, base_weights
from klora.errors import KLoRAError
from klora.fusion import ADAPTER_NAMES, KLoRA
from klora.loras import LoRAError
from klora.tiny_video import TINY_VIDEO_CALL_KWARGS, TINY_VIDEO_SIZES
from lora_files import delta, random_layers, write_peft
from video_family_files import tilted_pair, units_of, write_prefixed_lora_a, write_sd15_kohya
from video_lora_files import (hunyuan_video_units, random_units, write_hunyuan_video_musubi,
                              write_hunyuan_video_original, write_hunyuan_video_peft, write_wan_musubi,
                              write_wan_original, write_wan_peft)

BOUNDARY_RATIO = 0.875  # build_tiny_video("wan22") default, the Wan2.2-T2V-A14B value
WAN_ATTENTION = r"^blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
WAN_BLOCKS = r"^blocks\.\d+\.(attn1\.|attn2\.to_|ffn\.)"  # the ten linears of each block
HUNYUAN_ATTENTION = r"attn\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)$"
ANIMATEDIFF_SPATIAL = r"\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"


def not_linear1(path: str) -> bool:
    """Leave out the parts of HunyuanVideo's single-block linear1: diffusers splits it with the real
    model's hidden size 3072 (too big for a tiny model)."""
    return not re.fullmatch(r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)", path)


# key -> (pipeline class, denoiser components, steps per test run)
FAMILIES = {
    "wan21": ("WanPipeline", ("transformer",), 4),
    "wan22": ("WanPipeline", ("transformer", "transformer_2"), 8),
    "hunyuanvideo": ("HunyuanVideoPipeline", ("transformer",), 4),
    "ltx-video": ("LTXPipeline", ("transformer",), 4),
    "cogvideox": ("CogVideoXPipeline", ("transformer",), 4),
    "animatediff": ("AnimateDiffPipeline", ("unet",), 4),
}

# Fused weights (W0 + dW) x and adapters W0 x + dW x round differently in float32. The random tiny
# CogVideoX drives its latents to ~100, where that rounding (5e-7 relative) reaches 1.2e-5 in the frames.
FRAMES_ATOL = {"cogvideox": 5e-5}


# --- fixtures and helpers --------------------------------------------------------------


def load(video_dir, key):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(video_dir(key))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == FAMILIES[key][0]
    return pipe


def generate(pipe, key, steps, seed=0):
    height, width, num_frames = TINY_VIDEO_SIZES[key]
    return pipe("a sbu cat", num_inference_steps=steps, guidance_scale=5.0, height=height, width=width,
                num_frames=num_frames, generator=torch.Generator().manual_seed(seed), output_type="np",
                **TINY_VIDEO_CALL_KWARGS[key]).frames


def linear_paths(denoiser):
    """Paths of the model's own linears (PEFT's lora_A/lora_B and base_layer children left out)."""
    return [p for p, m in denoiser.named_modules() if isinstance(getattr(m, "base_layer", m), torch.nn.Linear)
            and not p.endswith("base_layer") and ".lora_" not in p]


def _hunyuan_units(denoiser):
    return hunyuan_video_units(denoiser, lambda p: re.search(HUNYUAN_ATTENTION, p) and not_linear1(p))


# key -> (the units both LoRAs adapt, a layer only the style LoRA adapts, content writer, style writer,
#         tilted_pair options); writers take (path, layers, pipeline). Each family gets its own formats.
FAMILY_LORAS = {
    "wan21": (lambda d: units_of(d, WAN_ATTENTION), "blocks.0.ffn.net.0.proj",
              lambda p, l, _: write_wan_musubi(p, l),  # attention-only: diffusers' own converter raises KeyError
              lambda p, l, _: write_wan_peft(p, l), {}),
    "wan22": (lambda d: units_of(d, WAN_ATTENTION), "blocks.0.ffn.net.0.proj",
              lambda p, l, _: write_wan_original(p, l, style="lora_down"), lambda p, l, _: write_wan_peft(p, l), {}),
    "hunyuanvideo": (_hunyuan_units, "transformer_blocks.0.ff.net.0.proj",
                     lambda p, l, _: write_hunyuan_video_musubi(p, l),  # fused qkv: three layers sharing A
                     lambda p, l, _: write_hunyuan_video_peft(p, l), {}),
    "ltx-video": (lambda d: units_of(d, r"^transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
                  "transformer_blocks.0.ff.net.0.proj",
                  lambda p, l, _: write_prefixed_lora_a(p, l, prefix="diffusion_model"),  # ComfyUI LTX names
                  lambda p, l, _: write_peft(p, l, prefix="transformer"), {}),
    # The CogVideoX style file has no alpha metadata: alpha = rank, so its ground truth says so.
    "cogvideox": (lambda d: units_of(d, r"^transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)$"),
                  "transformer_blocks.0.ff.net.0.proj", lambda p, l, _: write_peft(p, l, prefix="transformer"),
                  lambda p, l, _: write_peft(p, l, prefix="transformer", with_alpha_metadata=False),
                  {"style_alpha": 8.0}),
    # An SD 1.5 LoRA (kohya names, text-encoder weights too) and a diffusers one.
    "animatediff": (lambda d: units_of(d, ANIMATEDIFF_SPATIAL),
                    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
                    lambda p, l, pipe: write_sd15_kohya(p, l, text_encoder=pipe.text_encoder),
                    lambda p, l, _: write_peft(p, l, prefix="unet"), {}),
}


def family_pair(key, pipe, folder, shared_only=False):
    """Write this family's (content, style) pair in its own formats; return (paths, ground truths).

    ``shared_only``: both LoRAs adapt the same layers (no layer applies one LoRA at every step)."""
    denoiser = getattr(pipe, FAMILIES[key][1][0])
    units, style_only, write_content, write_style, options = FAMILY_LORAS[key]
    content, style = tilted_pair(denoiser, units(denoiser), (style_only,), **options)
    if shared_only:
        content, style = ({p: v for p, v in content.items() if p in style},
                          {p: v for p, v in style.items() if p in content})
    paths = folder / f"{key}-content.safetensors", folder / f"{key}-style.safetensors"
    write_content(paths[0], content, pipe)
    write_style(paths[1], style, pipe)
    return paths, (content, style)


def topk_sum(d, k):
    return float(d.abs().flatten().topk(min(k, d.numel())).values.sum())


def expected_rule(content, style, order):
    """(stats {path: (K, S_c, S_s)} of shared layers in model order, only {path: role}, gamma, #trimmed)."""
    stats, ratios = {}, []
    for path in order:
        if path in content and path in style:
            dc, ds = delta(content[path]), delta(style[path])
            k = content[path][0].shape[0] * style[path][0].shape[0]
            stats[path] = (k, topk_sum(dc, k), topk_sum(ds, k))
            ratios.append(float(dc.abs().sum() / ds.abs().sum()))
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    only = {p: ("content" if p in content else "style") for p in order if (p in content) != (p in style)}
    return stats, only, sum(kept) / len(kept), len(ratios) - len(kept)


def style_scale(p, pattern, alpha, beta):
    return (alpha * p + beta) % alpha if pattern == "s*" else alpha * p + beta


def expert_for(t):
    return "transformer" if float(t) >= BOUNDARY_RATIO * 1000 else "transformer_2"


def expected_steps(rules, timesteps, pattern, alpha, beta, progress="steps"):
    """Per step: (progress, scale, component, {log key: role}) from the rule recomputed here."""
    multi = len(rules) > 1
    steps = []
    for i, t in enumerate(timesteps):
        component = expert_for(t) if multi else next(iter(rules))
        p = i / len(timesteps) if progress == "steps" else 1.0 - float(t) / 1000.0
        scale = style_scale(p, pattern, alpha, beta)
        stats, _, gamma, _ = rules[component]
        choices = {}
        for path, (_, sc, ss) in stats.items():
            assert abs(sc / gamma - ss * scale) > 1e-4 * ss * scale, f"{path}: a near tie at step {i}; change the seed"
            choices[f"{component}.{path}" if multi else path] = "content" if sc / gamma > ss * scale else "style"
        steps.append((p, scale, component, choices))
    return steps


def assert_log(log, rules, steps=None):
    """The log's layers, only, gamma (and the steps of the last generation) equal the recomputed rule."""
    multi = len(rules) > 1

    def key(component, path):
        return f"{component}.{path}" if multi else path

    layers = {key(c, p): s for c, r in rules.items() for p, s in r[0].items()}
    assert list(log["layers"]) == list(layers)  # model order, per denoiser
    for name, (k, sc, ss) in layers.items():
        entry = log["layers"][name]
        assert entry["k"] == k, name
        assert entry["content_topk_sum"] == pytest.approx(sc, rel=1e-5), name
        assert entry["style_topk_sum"] == pytest.approx(ss, rel=1e-5), name
    only = {key(c, p): role for c, r in rules.items() for p, role in r[1].items()}
    assert log["only"] == only and list(log["only"]) == list(only)
    if multi:
        assert log["denoisers"] == list(rules)
        assert set(log["gamma"]) == set(rules)
        for component, r in rules.items():
            assert log["gamma"][component] == pytest.approx(r[2], rel=1e-5)
    else:
        assert "denoisers" not in log
        assert isinstance(log["gamma"], float) and log["gamma"] == pytest.approx(next(iter(rules.values()))[2],
                                                                                rel=1e-5)
    if steps is None:
        return
    run = log["generations"][-1]
    assert run["num_inference_steps"] == len(steps)
    assert [s["step"] for s in run["steps"]] == list(range(len(steps)))  # CFG's calls: one step each
    for entry, (p, scale, component, choices) in zip(run["steps"], steps):
        assert entry["progress"] == pytest.approx(p, abs=1e-9)
        assert entry["scale"] == pytest.approx(scale, rel=1e-9)
        if multi:
            assert entry["component"] == component
        else:
            assert "component" not in entry
        assert entry["choices"] == choices and list(entry["choices"]) == list(choices), entry["step"]


def state_of(pipe, components):
    return {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in components}


def assert_nothing_attached(pipe, state):
    """Weights bit-identical to ``state``, no LoRA layer, no hook, no K-LoRA mark left."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component, saved in state.items():
        denoiser = getattr(pipe, component)
        now = denoiser.state_dict()
        assert list(now) == list(saved)
        assert all(torch.equal(now[k], saved[k]) for k in saved), component
        assert not any(isinstance(m, BaseTunerLayer) for m in denoiser.modules())
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in denoiser.modules())
        assert not hasattr(denoiser, "_klora_attached")
        assert not set(ADAPTER_NAMES.values()) & set(getattr(denoiser, "peft_config", {}) or {})


def assert_applies(denoiser, before, layers, switching, role, biases=None, bias_before=None):
    """After ``set_method(role)``: every linear applies exactly its ground-truth delta (zero where
    ``layers`` has none), and its bias update where ``biases`` has one."""
    name = ADAPTER_NAMES[role]
    modules = dict(denoiser.named_modules())
    for path in linear_paths(denoiser):
        module = modules[path]
        adapter = None
        if hasattr(module, "lora_A"):  # adapters switching: this layer is a PEFT layer
            if path in layers or (biases and path in biases):
                assert module.active_adapters == [name], path
                adapter = name
            else:
                assert module.active_adapters == [], path
        got = applied_delta(denoiser, path, before, adapter)
        weight = before[path].double()
        want = delta(layers[path]) if path in layers else torch.zeros_like(weight)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=3e-7 * float(weight.abs().max()), msg=path)
        if biases is None:
            continue
        if adapter is not None:
            bias = module.lora_B[name].bias
            got_bias = torch.zeros_like(bias_before[path]) if bias is None else module.scaling[name] * bias.double()
        else:
            got_bias = getattr(module, "base_layer", module).bias.detach().double() - bias_before[path]
        want_bias = biases[path].double() if path in biases else torch.zeros_like(got_bias)
        torch.testing.assert_close(got_bias, want_bias, rtol=1e-5, atol=1e-7, msg=f"{path} bias")


def record_calls(pipe, components):
    """Forward pre-hooks on the denoisers: every call appends (component, timestep)."""
    calls, handles = [], []
    for component in components:
        def hook(module, args, kwargs, component=component):
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
            calls.append((component, float(torch.as_tensor(timestep).flatten()[0])))

        handles.append(getattr(pipe, component).register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles


# --- 1. every family: the rule, forced schedules, detach, fused = adapters ------------------


@pytest.mark.parametrize("key", list(FAMILIES))
def test_selection_log_is_the_rule_recomputed_from_the_files(video_dir, tmp_path, key):
    pipe = load(video_dir, key)
    _, components, steps = FAMILIES[key]
    (c_path, s_path), (content, style) = family_pair(key, pipe, tmp_path)
    order = [p for p, _ in getattr(pipe, components[0]).named_modules()]
    rule = expected_rule(content, style, order)
    assert rule[3] >= 1, "the outlier layer should be trimmed from gamma"
    rules = {c: rule for c in components}  # by default both LoRAs go into every denoiser
    state = state_of(pipe, components)

    runs = {}
    for switching in ("fused", "adapters"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no-alpha and text-encoder notes: checked elsewhere
            klora = KLoRA(pipe, c_path, s_path, pattern="s", switching=switching)
        assert klora.switching == switching
        frames = generate(pipe, key, steps)
        log = klora.selection_log()
        expected = expected_steps(rules, pipe.scheduler.timesteps, "s", 1.5, 0.5)
        assert_log(log, rules, expected)
        runs[switching] = frames, log
        klora.detach()
        assert_nothing_attached(pipe, state)

    # The pair really exercises the rule: both LoRAs chosen, and some layer switches during the run.
    by_layer = {}
    for _, _, _, choices in expected:
        for name, role in choices.items():
            by_layer.setdefault(name, set()).add(role)
    assert any(len(roles) == 2 for roles in by_layer.values())
    assert set().union(*by_layer.values()) == {"content", "style"}
    assert set(rule[1].values()) == {"content", "style"}

    (fused, fused_log), (adapters, adapters_log) = runs["fused"], runs["adapters"]
    assert {k: v for k, v in fused_log.items() if k != "switching"} == \
        {k: v for k, v in adapters_log.items() if k != "switching"}
    assert np.abs(fused - adapters).max() < FRAMES_ATOL.get(key, 1e-5)


@pytest.mark.parametrize("key", list(FAMILIES))
def test_forced_schedules_equal_single_lora_runs(video_dir, tmp_path, key):
    pipe = load(video_dir, key)
    # A layer only one LoRA adapts applies it at every step, whatever the schedule: here there is none.
    (c_path, s_path), _ = family_pair(key, pipe, tmp_path, shared_only=True)
    steps = 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # scale = 1e-12 * p + 1e-12: S_s * scale is ~0, so content wins in every layer at every step.
        klora = KLoRA(pipe, c_path, s_path, pattern="s", alpha=1e-12, beta=1e-12)
    forced_content = generate(pipe, key, steps)
    assert {r for s in klora.selection_log()["generations"][-1]["steps"] for r in s["choices"].values()} == \
        {"content"}
    klora.set_method("content")
    content_only = generate(pipe, key, steps)
    klora.set_method("style")
    style_only = generate(pipe, key, steps)
    klora.set_method("klora")
    klora.set_schedule("s", 1.5, 1e12)  # a huge beta: style everywhere
    forced_style = generate(pipe, key, steps)
    assert {r for s in klora.selection_log()["generations"][-1]["steps"] for r in s["choices"].values()} == \
        {"style"}
    klora.detach()
    assert np.array_equal(forced_content, content_only)
    assert np.array_equal(forced_style, style_only)
    assert not np.array_equal(content_only, style_only)


# --- 2. Wan 2.2: two experts ----------------------------------------------------------------


@pytest.mark.parametrize("switching", ["fused", "adapters"])
def test_wan22_both_loras_go_into_both_experts(video_dir, tmp_path, switching):
    pipe = load(video_dir, "wan22")
    experts = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    (c_path, s_path), (content, style) = family_pair("wan22", pipe, tmp_path)
    before = {c: base_weights(d) for c, d in experts.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        klora = KLoRA(pipe, c_path, s_path, switching=switching)
    assert list(klora.denoisers) == ["transformer", "transformer_2"] and klora.multi
    for role, layers in (("content", content), ("style", style)):
        klora.set_method(role)
        for component, denoiser in experts.items():
            assert_applies(denoiser, before[component], layers, switching, role)
    klora.detach()


def test_wan22_high_low_pairs_use_each_experts_own_files(video_dir, tmp_path):
    pipe = load(video_dir, "wan22")
    high, low = pipe.transformer, pipe.transformer_2
    units = units_of(high, WAN_ATTENTION)
    content_high, style_high = tilted_pair(high, units, ("blocks.0.ffn.net.0.proj",), seed=1)
    # The LOW pair: other tensors, ranks, alphas and layers (block 1 only, plus an FFN layer).
    content_low, style_low = tilted_pair(low, [u for u in units if u[0].startswith("blocks.1.")],
                                         ("blocks.1.ffn.net.2",), seed=2, content_rank=lambda i: 6,
                                         content_alpha=lambda i: 3.0 + i, style_rank=3, style_alpha=1.5, outlier=2)
    files = {name: tmp_path / f"{name}.safetensors" for name in ("ch", "sh", "cl", "sl")}
    write_wan_musubi(files["ch"], content_high)  # four formats at once
    write_wan_peft(files["sh"], style_high)
    write_wan_original(files["cl"], content_low, style="lora_A")
    write_wan_original(files["sl"], style_low, style="lora_down")
    before = {"transformer": base_weights(high), "transformer_2": base_weights(low)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        klora = KLoRA(pipe, files["ch"], files["sh"], content_2=files["cl"], style_2=files["sl"])
    order = [p for p, _ in high.named_modules()]
    rules = {"transformer": expected_rule(content_high, style_high, order),
             "transformer_2": expected_rule(content_low, style_low, order)}
    assert all(r[3] >= 1 for r in rules.values()), "each expert's gamma should trim its outlier"
    assert abs(rules["transformer"][2] - rules["transformer_2"][2]) > 0.1 * rules["transformer"][2]
    assert isinstance(klora.gamma, dict) and set(klora.gamma) == {"transformer", "transformer_2"}
    for component, r in rules.items():
        assert klora.gamma[component] == pytest.approx(r[2], rel=1e-5)

    generate(pipe, "wan22", 8)
    log = klora.selection_log()
    assert_log(log, rules, expected_steps(rules, pipe.scheduler.timesteps, "s*", 1.5, 1.275))
    for role, name in (("content", "ch"), ("style", "sh"), ("content_2", "cl"), ("style_2", "sl")):
        assert str(files[name]) in log[role]

    for role, layers in (("content", (content_high, content_low)), ("style", (style_high, style_low))):
        klora.set_method(role)
        for (component, denoiser), truth in zip((("transformer", high), ("transformer_2", low)), layers):
            assert_applies(denoiser, before[component], truth, "fused", role)
    klora.detach()


def test_wan22_progress_counts_steps_across_the_expert_switch(video_dir, tmp_path):
    pipe = load(video_dir, "wan22")
    assert pipe.config.boundary_ratio == BOUNDARY_RATIO
    (c_path, s_path), (content, style) = family_pair("wan22", pipe, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        klora = KLoRA(pipe, c_path, s_path, pattern="s")
    calls, handles = record_calls(pipe, ("transformer", "transformer_2"))
    order = [p for p, _ in pipe.transformer.named_modules()]
    rule = expected_rule(content, style, order)
    rules = {"transformer": rule, "transformer_2": rule}

    for steps in (8, 4):
        calls.clear()
        generate(pipe, "wan22", steps)
        timesteps = [float(t) for t in pipe.scheduler.timesteps]
        experts = [expert_for(t) for t in timesteps]
        # CFG: two calls per step (cond, uncond), both by the expert of that step, at its timestep.
        assert calls == [(e, t) for e, t in zip(experts, timesteps) for _ in range(2)]
        counts = Counter(c for c, _ in calls)
        assert counts["transformer"] >= 2 and counts["transformer_2"] >= 2, "both experts run"
        run = klora.selection_log()["generations"][-1]
        assert [(s["step"], s["progress"], s["component"]) for s in run["steps"]] == \
            [(i, i / steps, e) for i, e in enumerate(experts)]
        assert_log(klora.selection_log(), rules, expected_steps(rules, timesteps, "s", 1.5, 0.5))
        for entry in run["steps"]:  # each step lists the choices of the expert that ran it, and only those
            assert {k.split(".")[0] for k in entry["choices"]} == {entry["component"]}
            assert entry["choices"] and all(k.startswith(entry["component"] + ".") for k in entry["choices"])
    assert [s["component"] for s in klora.selection_log()["generations"][0]["steps"]] == \
        ["transformer"] * 4 + ["transformer_2"] * 4  # shift 5, boundary 0.875, 8 steps: 4 / 4
    for handle in handles:
        handle.remove()
    klora.detach()


def test_wan22_noise_progress_is_one_minus_t_over_1000(video_dir, tmp_path):
    pipe = load(video_dir, "wan22")
    (c_path, s_path), (content, style) = family_pair("wan22", pipe, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        klora = KLoRA(pipe, c_path, s_path, pattern="s", progress="noise")
    generate(pipe, "wan22", 8)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    rule = expected_rule(content, style, [p for p, _ in pipe.transformer.named_modules()])
    rules = {"transformer": rule, "transformer_2": rule}
    log = klora.selection_log()
    assert log["progress"] == "noise"
    assert [s["progress"] for s in log["generations"][-1]["steps"]] == \
        pytest.approx([1.0 - t / 1000.0 for t in timesteps], abs=1e-9)
    assert_log(log, rules, expected_steps(rules, timesteps, "s", 1.5, 0.5, progress="noise"))
    klora.detach()


@pytest.mark.parametrize("second", ["content_2", "style_2"])
def test_second_expert_lora_on_wan21_is_refused(video_dir, tmp_path, second):
    pipe = load(video_dir, "wan21")
    (c_path, s_path), _ = family_pair("wan21", pipe, tmp_path)
    state = state_of(pipe, ("transformer",))
    with pytest.raises(KLoRAError, match=rf"^a {second} LoRA was given, but WanPipeline has one denoiser; the _2 "
                                         r"LoRAs are for the second \(low-noise\) expert"):
        KLoRA(pipe, c_path, s_path, **{second: c_path})
    assert_nothing_attached(pipe, state)


# --- 3. AnimateDiff: spatial layers only ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("switching", ["fused", "adapters"])
def test_animatediff_acts_on_spatial_layers_never_on_motion_modules(video_dir, tmp_path, switching):
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = load(video_dir, "animatediff")
    unet = pipe.unet
    motion = {k: v.clone() for k, v in unet.state_dict().items() if ".motion_modules." in k}
    assert len(motion) > 50
    (c_path, s_path), (content, style) = family_pair("animatediff", pipe, tmp_path)
    assert not any("motion_modules" in p for p in (*content, *style))
    ids = pipe.tokenizer("a sbu cat", return_tensors="pt").input_ids
    text_before = pipe.text_encoder(ids)[0]
    base_frames = generate(pipe, "animatediff", 2)
    before = base_weights(unet)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        klora = KLoRA(pipe, c_path, s_path, switching=switching)
    assert any("text-encoder weights; they are not applied" in str(w.message) for w in caught)
    log = klora.selection_log()
    assert set(log["layers"]) | set(log["only"]) == set(content) | set(style)
    frames = generate(pipe, "animatediff", 2)
    assert not np.array_equal(frames, base_frames)

    def motion_untouched():
        now = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if ".motion_modules." in k}
        assert now.keys() == motion.keys() and all(torch.equal(now[k], motion[k]) for k in motion)
        assert not any(isinstance(m, BaseTunerLayer) for p, m in unet.named_modules() if ".motion_modules." in p)

    motion_untouched()
    for role, layers in (("content", content), ("style", style)):
        klora.set_method(role)
        assert_applies(unet, before, layers, switching, role)
        motion_untouched()
    assert torch.equal(pipe.text_encoder(ids)[0], text_before)
    klora.detach()
    motion_untouched()


# --- 4. file formats through the engine ----------------------------------------------------

WAN_FORMATS = {
    # name: (writer, layers it holds, alpha it carries)
    "peft": (write_wan_peft, r"^(blocks\.\d+\.(attn1\.|attn2\.to_|ffn\.)|proj_out$)", "own"),
    "peft without alpha metadata": (lambda p, l: write_wan_peft(p, l, with_alpha_metadata=False), WAN_ATTENTION,
                                    "rank"),
    "original lora_A/B": (lambda p, l: write_wan_original(p, l, style="lora_A"), r".", "own"),
    "original lora_down + alpha": (lambda p, l: write_wan_original(p, l, style="lora_down"), r".", "own"),
    "musubi": (write_wan_musubi, WAN_BLOCKS, "own"),
    "musubi attention-only": (write_wan_musubi, WAN_ATTENTION, "own"),
}
# Each format once as content and once as style, never paired with itself.
WAN_PAIRS = [("peft", "musubi"), ("musubi", "peft without alpha metadata"),
             ("original lora_A/B", "original lora_down + alpha"),
             ("original lora_down + alpha", "musubi attention-only"),
             ("musubi attention-only", "original lora_A/B"), ("peft without alpha metadata", "peft")]


def write_format(formats, name, denoiser, path, seed, rank, alpha):
    """Write random layers in format ``name``; return the ground truth of what the file means."""
    writer, pattern, carried = formats[name]
    paths = [p for p in linear_paths(denoiser) if re.search(pattern, p)]
    layers = random_layers(denoiser, paths, rank=rank, alpha=alpha, seed=seed, scale=0.1)
    writer(path, layers)
    if carried == "rank":  # no alpha in the file: alpha = rank
        layers = {p: (A, B, float(A.shape[0])) for p, (A, B, _) in layers.items()}
    return layers


@pytest.mark.parametrize("switching", ["fused", "adapters"])
@pytest.mark.parametrize("content_format, style_format", WAN_PAIRS)
def test_wan_formats_apply_exactly(video_dir, tmp_path, content_format, style_format, switching):
    pipe = load(video_dir, "wan21")
    tr = pipe.transformer
    content = write_format(WAN_FORMATS, content_format, tr, tmp_path / "c.safetensors", 1,
                           lambda i: 2 + i % 3, lambda i: 0.5 + i % 4)
    style = write_format(WAN_FORMATS, style_format, tr, tmp_path / "s.safetensors", 2, 6, 3.0)
    before = base_weights(tr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        klora = KLoRA(pipe, tmp_path / "c.safetensors", tmp_path / "s.safetensors", switching=switching)
    assert klora.switching == switching
    for role, layers in (("content", content), ("style", style)):
        klora.set_method(role)
        assert_applies(tr, before, layers, switching, role)
    klora.detach()


def _wan_bias_files(tr, tmp_path, with_bias):
    table = dict(tr.named_modules())
    gen = torch.Generator().manual_seed(3)
    biases = {p: torch.randn(table[p].out_features, generator=gen) * 0.1 for p in with_bias}
    content = random_layers(tr, [p for p in linear_paths(tr) if re.search(WAN_ATTENTION, p)][:8], rank=4, alpha=2.0,
                            seed=1, scale=0.1)
    style = random_layers(tr, [p for p in linear_paths(tr) if re.search(WAN_ATTENTION, p)], rank=8, seed=2, scale=0.1)
    write_wan_original(tmp_path / "c.safetensors", content, style="lora_down", biases=biases)
    write_wan_peft(tmp_path / "s.safetensors", style)
    bias_before = {p: m.bias.detach().double().clone() for p, m in table.items()
                   if isinstance(m, torch.nn.Linear) and m.bias is not None}
    return content, style, biases, bias_before


@pytest.mark.parametrize("switching", ["fused", "adapters"])
def test_wan_diff_b_biases_apply_with_their_lora(video_dir, tmp_path, switching):
    pipe = load(video_dir, "wan21")
    tr = pipe.transformer
    # A bias with factors (both LoRAs adapt it), and one bias alone on a layer only the content LoRA has.
    content, style, biases, bias_before = _wan_bias_files(tr, tmp_path, ["blocks.0.attn1.to_q", "blocks.0.ffn.net.2"])
    before = base_weights(tr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        klora = KLoRA(pipe, tmp_path / "c.safetensors", tmp_path / "s.safetensors", switching=switching)
    assert klora.only["blocks.0.ffn.net.2"] == "content"
    assert "blocks.0.attn1.to_q" in klora.paths
    klora.set_method("content")
    assert_applies(tr, before, content, switching, "content", biases, bias_before)
    klora.set_method("style")
    assert_applies(tr, before, style, switching, "style", {}, bias_before)
    klora.detach()


def test_wan_bias_only_layer_that_both_adapt_keeps_its_bias(video_dir, tmp_path):
    pipe = load(video_dir, "wan21")
    tr = pipe.transformer
    # blocks.1.attn1.to_q: the content LoRA has only a bias there; the style LoRA has factors.
    content, style, biases, bias_before = _wan_bias_files(tr, tmp_path, ["blocks.1.attn1.to_q"])
    before = base_weights(tr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        klora = KLoRA(pipe, tmp_path / "c.safetensors", tmp_path / "s.safetensors")
    try:
        klora.set_method("content")
        assert_applies(tr, before, content, "fused", "content", biases, bias_before)
    finally:
        klora.detach()


def _i2v_file(tmp_path):
    """A Wan 2.1 I2V LoRA (k_img/v_img included), original lora_down names; its T2V layers' ground truth."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    i2v = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
                                image_dim=16, added_kv_proj_dim=24)
    paths = [p for p in linear_paths(i2v) if re.search(r"^blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0|add_[kv]_proj)"
                                                        r"|ffn\.)", p)]
    layers = random_layers(i2v, paths, rank=4, alpha=2.0, seed=5, scale=0.1)
    write_wan_original(tmp_path / "i2v.safetensors", layers, style="lora_down")
    return {p: v for p, v in layers.items() if "add_" not in p}


def test_wan21_i2v_lora_on_wan22_skips_image_layers_and_applies_the_rest(video_dir, tmp_path):
    pipe = load(video_dir, "wan22")
    t2v = _i2v_file(tmp_path)
    style = random_layers(pipe.transformer, [p for p in linear_paths(pipe.transformer)
                                             if re.search(WAN_ATTENTION, p)], rank=8, seed=6, scale=0.1)
    write_wan_peft(tmp_path / "s.safetensors", style)
    experts = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    before = {c: base_weights(d) for c, d in experts.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        klora = KLoRA(pipe, tmp_path / "i2v.safetensors", tmp_path / "s.safetensors")
    skipped = [str(w.message) for w in caught if "k_img" in str(w.message)]
    assert skipped and all("content LoRA" in m and "skipped 4 layers" in m and "Wan 2.1 image-to-video" in m
                           for m in skipped)
    for role, layers in (("content", t2v), ("style", style)):
        klora.set_method(role)
        for component, denoiser in experts.items():
            assert_applies(denoiser, before[component], layers, "fused", role)
    klora.detach()


def test_wan21_i2v_lora_on_wan22_is_reported_in_one_warning(video_dir, tmp_path):
    pipe = load(video_dir, "wan22")
    _i2v_file(tmp_path)
    (_, s_path), _ = family_pair("wan22", pipe, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        KLoRA(pipe, tmp_path / "i2v.safetensors", s_path).detach()
    assert len([w for w in caught if "k_img" in str(w.message)]) == 1


HUNYUAN_FORMATS = {
    "peft": write_hunyuan_video_peft,
    "original lora_A/B": lambda p, l: write_hunyuan_video_original(p, l, style="lora_A"),
    "original lora_down + alpha": lambda p, l: write_hunyuan_video_original(p, l, style="lora_down"),
    "musubi": write_hunyuan_video_musubi,
}
HUNYUAN_PAIRS = [("original lora_A/B", "peft"), ("musubi", "original lora_A/B"), ("peft", "musubi"),
                 ("original lora_down + alpha", "musubi")]


@pytest.mark.parametrize("switching", ["fused", "adapters"])
@pytest.mark.parametrize("content_format, style_format", HUNYUAN_PAIRS)
def test_hunyuan_video_formats_apply_exactly(video_dir, tmp_path, content_format, style_format, switching):
    pipe = load(video_dir, "hunyuanvideo")
    tr = pipe.transformer
    every = hunyuan_video_units(tr, not_linear1)  # every linear, fused q/k/v parts together

    def layers_for(name, units, seed):
        if name == "peft":  # one rank and alpha: PEFT patterns match names as suffixes ("proj_out")
            return random_units(tr, units, rank=4, alpha=2.0, seed=seed)
        return random_units(tr, units, rank=lambda i: 2 + i % 3, alpha=lambda i: 0.5 * (1 + i % 5), seed=seed)

    content = layers_for(content_format, every, 1)
    style = layers_for(style_format, [u for u in every if re.search(HUNYUAN_ATTENTION, u[0])], 2)
    qkv = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v")
    assert all(torch.equal(content[p][0], content[qkv[0]][0]) for p in qkv)  # one img_attn_qkv: A shared
    HUNYUAN_FORMATS[content_format](tmp_path / "c.safetensors", content)
    HUNYUAN_FORMATS[style_format](tmp_path / "s.safetensors", style)
    before = base_weights(tr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        klora = KLoRA(pipe, tmp_path / "c.safetensors", tmp_path / "s.safetensors", switching=switching)
    assert klora.switching == switching
    assert set(klora.paths) == set(style)  # every style layer is a content layer too
    for role, layers in (("content", content), ("style", style)):
        klora.set_method(role)
        assert_applies(tr, before, layers, switching, role)
    klora.detach()


# --- 5. a LoRA for another family --------------------------------------------------------

FAMILY_NAMES = {"wan21": "Wan", "hunyuanvideo": "HunyuanVideo"}


def _foreign_file(key, layout, pipe, tmp_path, video_dir):
    """A LoRA for the other family (``key`` is the model it is given to), written in ``layout``."""
    path = tmp_path / "foreign.safetensors"
    if key == "hunyuanvideo":  # a Wan 2.1 LoRA
        other = load(video_dir, "wan21").transformer
        layers = random_layers(other, [p for p in linear_paths(other) if re.search(WAN_ATTENTION, p)], rank=4,
                               alpha=2.0)
        writers = {"peft": write_wan_peft, "original lora_A/B": lambda p, l: write_wan_original(p, l),
                   "original lora_down + alpha": lambda p, l: write_wan_original(p, l, style="lora_down"),
                   "musubi": write_wan_musubi}
    else:  # a HunyuanVideo LoRA: diffusers-trained files adapt the token refiner too, musubi's do not
        other = load(video_dir, "hunyuanvideo").transformer
        refiner = layout == "peft" or layout.endswith("token refiner too")
        layers = random_units(other, hunyuan_video_units(other, lambda p: re.search(HUNYUAN_ATTENTION, p)
                                                         and not_linear1(p) and (refiner or "refiner" not in p)),
                              rank=4, alpha=2.0)
        writers = {**HUNYUAN_FORMATS, "original lora_A/B, token refiner too": HUNYUAN_FORMATS["original lora_A/B"]}
    writers[layout](path, layers)
    return path


WRONG_FAMILY = [
    ("hunyuanvideo", "peft"), ("hunyuanvideo", "original lora_A/B"), ("hunyuanvideo", "original lora_down + alpha"),
    ("hunyuanvideo", "musubi"),
    ("wan21", "peft"), ("wan21", "original lora_A/B"), ("wan21", "original lora_down + alpha"),
    ("wan21", "original lora_A/B, token refiner too"), ("wan21", "musubi"),
]


@pytest.mark.parametrize("key, layout", WRONG_FAMILY)
def test_lora_of_the_other_family_is_one_line_naming_both(video_dir, tmp_path, key, layout):
    pipe = load(video_dir, key)
    (c_path, s_path), _ = family_pair(key, pipe, tmp_path)
    foreign = _foreign_file(key, layout, pipe, tmp_path, video_dir)
    state = state_of(pipe, ("transformer",))
    lora_family = FAMILY_NAMES["wan21" if key == "hunyuanvideo" else "hunyuanvideo"]
    if layout == "musubi" and key == "wan21":
        # attention-only kohya-style double_blocks keys read the same in a FLUX.1 and a HunyuanVideo LoRA
        lora_family = "FLUX.1 or HunyuanVideo"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(LoRAError) as caught:
            KLoRA(pipe, c_path, foreign)  # the content LoRA fits: it must not stay behind
    message = str(caught.value)
    assert "\n" not in message and message.startswith("style LoRA '")
    assert f"this LoRA is for {lora_family}; the model is {FAMILY_NAMES[key]}" in message
    assert_nothing_attached(pipe, state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        KLoRA(pipe, c_path, s_path).detach()  # and the model takes a right pair afterwards
    assert_nothing_attached(pipe, state)
