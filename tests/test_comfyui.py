"""K-LoRA inside a real ComfyUI, in-process: tiny models of every family, ComfyUI's own ModelPatcher, loader and samplers.

Run with ``COMFYUI_PATH`` set to a ComfyUI checkout (0.3.64 tested) and a Python that has ComfyUI's
requirements; without it every test here is skipped with a reason that says so. Every comparison
is against something the code under test did not compute: ComfyUI's own ``LoraLoaderModelOnly``
(``comfy.sd.load_lora_for_models``), weights recomputed from the files' tensors, the rule
recomputed in ``comfy_lora_files``, or the diffusers engine on the same files.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from comfy_models import why_not_available

_REASON = why_not_available()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

import comfy_lora_files as files  # noqa: E402
import comfy_models as cm  # noqa: E402

comfy = cm.comfyui()
from klora import comfyui as kc  # noqa: E402
from klora.errors import KLoRAError, LoRAError  # noqa: E402

ATTENTION = {  # weights of the attention layers the paper adapts, per family
    "sd15": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$",
    "sdxl": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$",
    "flux": r"(_attn\.(qkv|proj)|linear[12])\.weight$",
    "sd3": r"\.attn\.(qkv|proj)\.weight$",
    "qwen_image": r"\.attn\.(to_q|to_k|to_v|add_[qkv]_proj|to_out\.0|to_add_out)\.weight$",
    "wan21": r"_attn\.[qkvo]\.weight$",
    "hunyuan_video": r"(double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|linear[12])\.weight$",
    "ltxv": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$",
}
SLOW = {"sd15", "sdxl", "sd3"}  # a few seconds each on a busy 2-core machine


def family_params(families=tuple(cm.FAMILIES)):
    return [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in families]


@pytest.fixture(autouse=True)
def _unload():
    yield
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def fused_rows(tiny) -> dict:
    """{key: row ranges} of weights ComfyUI fuses from diffusers layers, from ComfyUI's own maps (and, for
    HunyuanVideo, the hand-written tables)."""
    model = tiny.model
    config = model.model_config.unet_config
    if tiny.family == "hunyuan_video":
        return files.hunyuan_video_rows(model)
    table = {"flux": comfy.utils.flux_to_diffusers, "sd3": comfy.utils.mmdit_to_diffusers}.get(tiny.family)
    if table is None:
        return {}
    rows = {}
    for target in table(config, output_prefix="diffusion_model.").values():
        if not isinstance(target, str) and target[1] is not None and target[0] in model.state_dict():
            rows.setdefault(target[0], set()).add((target[1][1], target[1][1] + target[1][2]))
    return {k: sorted(v) for k, v in rows.items()}


def pair(tiny, tmp_path, pattern=None, content_seed=1, style_seed=2, content_rank=4, style_rank=8, cut=None,
         same_layers=True):
    """(content layers, style layers, content file, style file) in a layout ComfyUI maps, lora_down/lora_up +
    .alpha. ``cut``: one layer per diffusers layer of a fused weight (FLUX, SD3: diffusers names) rather than
    one for the whole weight (kohya-like); default: where ComfyUI maps such names."""
    cut = tiny.family in ("flux", "sd3") if cut is None else cut
    rows = fused_rows(tiny) if cut else {}
    chosen = files.targets(tiny.model, pattern or ATTENTION[tiny.family], rows)
    content = files.random_layers(tiny.model, chosen, rank=content_rank, alpha=lambda i: 2.0 + i % 3,
                                  seed=content_seed)
    style_chosen = chosen if same_layers else chosen[1:]
    style = files.random_layers(tiny.model, style_chosen, rank=style_rank, alpha=lambda i: 4.0 + i % 5,
                                seed=style_seed, scale=0.07)
    return content, style, write_comfy(tiny, tmp_path / "content.safetensors", content), \
        write_comfy(tiny, tmp_path / "style.safetensors", style)


def write_comfy(tiny, path, layers, **kwargs):
    """In a layout ComfyUI maps: ``diffusion_model.<module>`` for whole weights, diffusers names for rows."""
    whole = [l for l in layers if l.rows is None]
    names = files.names_comfy(whole)
    cut = [l for l in layers if l.rows is not None]
    if cut:
        if tiny.family == "hunyuan_video":
            names.update(files.names_hunyuan_video_diffusers(tiny.model, cut))
        else:
            table = {"flux": comfy.utils.flux_to_diffusers, "sd3": comfy.utils.mmdit_to_diffusers}[tiny.family]
            names.update(files.names_from_map(cut, table(tiny.model.model_config.unet_config,
                                                         output_prefix="diffusion_model.")))
    return files.write(path, layers, names, **kwargs)


def split(layers, rows):
    """Whole-weight layers of fused weights cut into their diffusers layers (rows of B), as K-LoRA cuts them."""
    out = []
    for l in layers:
        if l.rows is None and l.key in rows:
            out += [files.Layer(l.key, span, l.A, l.B[span[0]:span[1]], l.alpha) for span in rows[l.key]]
        else:
            out.append(l)
    return out


def loader(patcher, path, strength=1.0):
    """ComfyUI's LoraLoaderModelOnly."""
    model, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(str(path)), strength, 0)
    return model


def close(a, b, tol=1e-5):
    return float((a - b).abs().max()) <= tol


def relative_error(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --- one LoRA, both LoRAs: equal to ComfyUI's own loader ------------------------------

@pytest.mark.parametrize("family", family_params())
def test_content_style_merge_equal_comfyui_loaders(family, tmp_path):
    tiny = cm.build(family)
    _, _, content, style = pair(tiny, tmp_path)
    base = cm.sample(tiny, steps=3)
    for method, reference in (("content", loader(tiny.patcher, content)), ("style", loader(tiny.patcher, style)),
                              ("merge", loader(loader(tiny.patcher, content), style))):
        ours = cm.sample(tiny, kc.apply(tiny.patcher, content, style, method=method), steps=3)
        expected = cm.sample(tiny, reference, steps=3)
        assert close(ours, expected), (method, float((ours - expected).abs().max()))
        assert not close(ours, base, 1e-3), f"{method}: the LoRA changed nothing"


@pytest.mark.parametrize("family", family_params())
def test_logged_choices_stats_and_gamma_follow_the_rule(family, tmp_path):
    tiny = cm.build(family)
    content, style, content_file, style_file = pair(tiny, tmp_path)
    log_path = tmp_path / "log.json"
    model = kc.apply(tiny.patcher, content_file, style_file, pattern="s", log_path=log_path)
    cm.sample(tiny, model, steps=4)
    log = json.loads(log_path.read_text())

    cut = fused_rows(tiny)
    stats = files.pair_stats(split(content, cut), split(style, cut), lambda l: l.key in cut)
    assert set(log["layers"]) == set(stats)
    for key, expected in stats.items():
        got = log["layers"][key]
        assert got["k"] == expected["k"]
        assert math.isclose(got["content_topk_sum"], expected["content_topk_sum"], rel_tol=1e-5)
        assert math.isclose(got["style_topk_sum"], expected["style_topk_sum"], rel_tol=1e-5)
    gamma = files.expected_gamma([s["ratio"] for s in stats.values()])
    assert math.isclose(log["gamma"], gamma, rel_tol=1e-5)
    assert log["beta"] == 0.5 and log["pattern"] == "s" and log["method"] == "klora"

    (generation,) = log["generations"]
    assert generation["num_inference_steps"] == 4
    assert [s["step"] for s in generation["steps"]] == [0, 1, 2, 3]
    switched = set()
    for entry in generation["steps"]:
        assert math.isclose(entry["progress"], entry["step"] / 4)
        scale = files.expected_scale(entry["progress"], "s", 1.5, 0.5)
        expected = {key: files.expected_choice(s, gamma, scale) for key, s in stats.items()}
        assert entry["choices"] == expected
        switched |= {key for key, choice in expected.items() if choice == "style"}
    assert switched and switched != set(stats), "the test pair should make some layers switch and not others"


# --- the switching itself: step by step against ComfyUI's loader ------------------------

def stepwise_reference(tiny, tmp_path, content, style, schedule, steps, before=(), after=(), patcher=None,
                       first=0, last=None, latent=None, full_denoise=True, fixed=None, **sample_kwargs):
    """The latent of a run in which step i uses a model that ComfyUI's loader made from a file holding, per
    layer, the LoRA ``schedule[i - first]`` chose there (``fixed``: {layer: LoRA} where nothing is chosen;
    ``before``/``after``: LoRA files, or (file, strength), loaded before and after it): one KSamplerAdvanced-style
    call per step, from ``first`` to ``last``."""
    cut = fused_rows(tiny)
    content, style = split(content, cut), split(style, cut)
    by_place = {(l.key, l.rows): l for l in style}
    last = steps if last is None else last
    for i in range(first, last):
        chosen = []
        for c in content:
            key = c.log_key(c.key in cut)
            s = by_place.get((c.key, c.rows))
            role = schedule[i - first].get(key) or (fixed or {}).get(key, "content")
            chosen.append(c if s is None or role == "content" else s)
        model = patcher or tiny.patcher
        for path in before:
            model = loader(model, *(path if isinstance(path, tuple) else (path,)))
        model = loader(model, write_comfy(tiny, tmp_path / f"step{i}.safetensors", chosen))
        for path in after:
            model = loader(model, *(path if isinstance(path, tuple) else (path,)))
        latent = cm.sample(tiny, model, steps=steps, start_step=i, last_step=i + 1, latent=latent,
                           disable_noise=latent is not None,
                           force_full_denoise=full_denoise and i == steps - 1, **sample_kwargs)
    return latent


def schedule_of(log_path, generation=-1):
    return [s["choices"] for s in json.loads(log_path.read_text())["generations"][generation]["steps"]]


@pytest.mark.parametrize("family,cut,dtype", [
    ("wan21", None, "float32"), ("wan21", None, "bfloat16"), ("flux", True, "float32"), ("flux", False, "float32"),
    ("flux", True, "float16"), ("ltxv", None, "float32"), ("qwen_image", None, "float32"),
    pytest.param("sdxl", None, "float32", marks=pytest.mark.slow)])
def test_klora_run_equals_comfyui_loader_step_by_step(family, cut, dtype, tmp_path):
    tiny = cm.build(family, dtype=getattr(torch, dtype))
    content, style, content_file, style_file = pair(tiny, tmp_path, cut=cut)
    log_path = tmp_path / "log.json"
    model = kc.apply(tiny.patcher, content_file, style_file, pattern="s", log_path=log_path)
    ours = cm.sample(tiny, model, steps=4)
    steps = json.loads(log_path.read_text())["generations"][-1]["steps"]
    schedule = [s["choices"] for s in steps]
    assert any(a != b for a, b in zip(schedule, schedule[1:])), "no layer switched: the test proves nothing"
    expected = stepwise_reference(tiny, tmp_path, content, style, schedule, 4)
    # The per-step chain rounds the latent in and out of each call (latent format, noise scaling): float32 noise.
    assert relative_error(ours, expected) < 2e-6, relative_error(ours, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_a_switch_writes_what_comfyuis_own_patch_writes(dtype, tmp_path):
    """A switch's re-patch (``klora.comfyui._repatch``, which skips ComfyUI's per-key seed and new Parameter)
    leaves every weight bit-identical to ComfyUI's own ``patch_weight_to_device`` from the backup; fp8
    weights go through ComfyUI's seeded stochastic rounding."""
    tiny = cm.build("wan21")
    _, _, content, style = pair(tiny, tmp_path, pattern=r"(_attn\.[qkvo]|ffn\.0)\.weight$")
    with torch.no_grad():
        for name, parameter in tiny.model.diffusion_model.named_parameters():
            if parameter.dim() == 2:
                parameter.data = parameter.data.to(dtype)
    model = kc.apply(tiny.patcher, content, style, pattern="s")
    with torch.inference_mode():  # as ComfyUI runs a workflow
        comfy.model_management.load_models_gpu([model])
        klora = kc.attached(model)
        first = klora._mask_at(0.0, 0)
        changed = klora._show(tuple(not c for c in first))  # every chosen layer switches
        keys = [key for unit in changed for key in unit.keys]
        assert len(keys) == len(klora.paths) > 0
        kc._repatch(model, keys)
        ours = {key: comfy.utils.get_attr(tiny.model, key).detach().clone() for key in keys}
        for key in keys:  # ComfyUI's own: the original weight back, then its patch_weight_to_device
            comfy.utils.set_attr_param(tiny.model, key, model.backup[key].weight)
            model.patch_weight_to_device(key, device_to=torch.device("cpu"))
    for key in keys:
        theirs = comfy.utils.get_attr(tiny.model, key)
        assert ours[key].dtype == theirs.dtype == dtype
        assert torch.equal(ours[key].view(torch.uint8), theirs.view(torch.uint8)), key
        assert not torch.equal(ours[key].float(), model.backup[key].weight.float()), "the LoRA changed nothing"


def lowvram(patcher, memory_fraction=0.4):
    """A clone that ComfyUI loads partially (lowvram: the rest through ``LowVramPatch`` at every forward).

    On a CPU ComfyUI always loads fully, so a PREPARE_SAMPLING wrapper (ComfyUI's extension point for
    this step) loads it with ``patch_model(lowvram_model_memory=...)`` instead of ``load_models_gpu``;
    the caller calls ``unpatch_model`` afterwards."""
    clone = patcher.clone()
    memory = int(clone.model_size() * memory_fraction)

    def prepare(executor, model, noise_shape, conds, model_options=None):
        model.unpatch_model()
        model.patch_model(device_to=model.load_device, lowvram_model_memory=memory)
        switching = [key for key in model.patches if any(isinstance(p[1], kc.KLoRAPatch) for p in model.patches[key])]
        in_place = [key for key in switching if key in model.backup]
        assert model.model.model_lowvram and 0 < len(in_place) < len(switching), \
            "expected some K-LoRA keys patched in place, some through LowVramPatch"
        return model.model, conds, []

    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, "test-lowvram", prepare)
    return clone


def test_lora_stack_before_and_after_stays_applied(tmp_path):
    tiny = cm.build("wan21")
    content, style, content_file, style_file = pair(tiny, tmp_path)
    chosen = files.targets(tiny.model, ATTENTION["wan21"])
    first = write_comfy(tiny, tmp_path / "first.safetensors", files.random_layers(tiny.model, chosen, seed=7))
    last = write_comfy(tiny, tmp_path / "last.safetensors", files.random_layers(tiny.model, chosen, rank=2, seed=8))
    log_path = tmp_path / "log.json"
    stacked = loader(kc.apply(loader(tiny.patcher, first), content_file, style_file, pattern="s", log_path=log_path),
                     last, 0.6)
    ours = cm.sample(tiny, stacked, steps=4)
    schedule = schedule_of(log_path)
    expected = stepwise_reference(tiny, tmp_path, content, style, schedule, 4, before=[first], after=[(last, 0.6)])
    assert relative_error(ours, expected) < 2e-6, relative_error(ours, expected)
    without_last = stepwise_reference(tiny, tmp_path, content, style, schedule, 4, before=[first])
    assert relative_error(ours, without_last) > 1e-3  # the last LoRA does change the result

    # A schedule that gives every layer to the content LoRA equals the loaders chained; likewise style.
    forced = loader(kc.apply(loader(tiny.patcher, first), content_file, style_file, pattern="s", alpha=1e-9,
                             beta=0.0), last, 0.6)
    chained = loader(loader(loader(tiny.patcher, first), content_file), last, 0.6)
    assert close(cm.sample(tiny, forced, steps=4), cm.sample(tiny, chained, steps=4))
    forced = kc.apply(tiny.patcher, content_file, style_file, pattern="s", alpha=1e-9, beta=1e9)
    assert close(cm.sample(tiny, forced, steps=4), cm.sample(tiny, loader(tiny.patcher, style_file), steps=4))


def test_unload_reload_lowvram_clones_and_other_runs_stay_exact(tmp_path):
    tiny = cm.build("flux")
    content, style, content_file, style_file = pair(tiny, tmp_path)
    w0 = cm.weights(tiny.patcher)
    base = cm.sample(tiny, steps=4)
    log_path = tmp_path / "log.json"
    model = kc.apply(tiny.patcher, content_file, style_file, pattern="s", log_path=log_path)
    first = cm.sample(tiny, model, steps=4)
    expected = stepwise_reference(tiny, tmp_path, content, style, schedule_of(log_path), 4)
    assert relative_error(first, expected) < 2e-6

    # Another seed, steps, sampler and scheduler in between, each exact against its own reference.
    other = cm.sample(tiny, model, steps=5, seed=3, scheduler="normal")
    assert relative_error(other, stepwise_reference(tiny, tmp_path, content, style, schedule_of(log_path), 5,
                                                    seed=3, scheduler="normal")) < 2e-6
    cm.sample(tiny, model, steps=3, sampler="dpmpp_2m", scheduler="beta", seed=4)
    assert len(schedule_of(log_path)) == 3
    assert torch.equal(cm.sample(tiny, model, steps=4), first)  # loaded, weights hold the last run's choice

    comfy.model_management.unload_all_models()
    assert all(torch.equal(v, w0[k]) for k, v in cm.weights(tiny.patcher).items()), "unloading did not restore W0"
    assert torch.equal(cm.sample(tiny, model, steps=4), first)  # reloaded

    # Clones in one workflow: a plain clone and a clone with one more LoRA, run alternately.
    extra = write_comfy(tiny, tmp_path / "extra.safetensors",
                        files.random_layers(tiny.model, files.targets(tiny.model, ATTENTION["flux"]), seed=9))
    plain, stacked = model.clone(), loader(model, extra)
    stacked_first = cm.sample(tiny, stacked, steps=4)
    assert relative_error(stacked_first, stepwise_reference(tiny, tmp_path, content, style, schedule_of(log_path), 4,
                                                            after=[extra])) < 2e-6
    assert torch.equal(cm.sample(tiny, plain, steps=4), first)
    assert torch.equal(cm.sample(tiny, stacked, steps=4), stacked_first)

    # lowvram: modules not loaded in place follow the choice through LowVramPatch at every forward.
    partial = lowvram(model)
    try:
        assert relative_error(cm.sample(tiny, partial, steps=4), first) < 1e-6
    finally:
        partial.unpatch_model()
    assert all(torch.equal(v, w0[k]) for k, v in cm.weights(tiny.patcher).items())

    comfy.model_management.unload_all_models()
    assert torch.equal(cm.sample(tiny, steps=4), base), "the base model changed after K-LoRA"


# --- progress ----------------------------------------------------------------------

def record_calls(patcher, key):
    """A clone whose model calls record (sigma, the weight ``key`` holds then); K-LoRA's wrapper runs first."""
    calls = []

    def wrapper(executor, *args, **kwargs):
        options = kwargs.get("transformer_options", args[5] if len(args) > 5 else {})
        weight = comfy.utils.get_attr(executor.class_obj, key)
        calls.append((float(options["sigmas"].flatten()[0]), weight.detach().clone()))
        return executor(*args, **kwargs)

    clone = patcher.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test-record", wrapper)
    return clone, calls


@pytest.mark.parametrize("sampler,calls_per_step", [("euler", 1), ("heun", 2), ("dpm_2", 2), ("dpmpp_2s_ancestral", 2)])
def test_steps_progress_counts_steps_not_model_calls(sampler, calls_per_step, tmp_path):
    tiny = cm.build("flux")
    content, style, content_file, style_file = pair(tiny, tmp_path)
    log_path = tmp_path / "log.json"
    model = kc.apply(tiny.patcher, content_file, style_file, pattern="s", log_path=log_path)
    schedule = kc.attached(model)
    per_step = [schedule.choices_at(i / 4) for i in range(4)]
    key = next(k for k in per_step[0] if len({c[k] for c in per_step}) > 1)  # a layer that switches
    module, rows = key.split("[")[0], tuple(int(x) for x in key.split("[")[1][:-1].split(":")) if "[" in key else None
    weight_key = f"{module}.weight"
    w0 = cm.weights(tiny.patcher)[weight_key]
    value = {role: files.expected_weights({weight_key: w0}, [([l for l in layers if l.key == weight_key], 1.0)])
             for role, layers in (("content", split(content, fused_rows(tiny))), ("style", split(style, fused_rows(tiny))))}

    recorded, calls = record_calls(model, weight_key)
    cm.sample(tiny, recorded, steps=4, sampler=sampler, cfg=2.0)
    log = json.loads(log_path.read_text())
    (generation,) = log["generations"]
    assert generation["num_inference_steps"] == 4
    assert [(s["step"], s["progress"]) for s in generation["steps"]] == [(i, i / 4) for i in range(4)]
    assert [s["choices"] for s in generation["steps"]] == per_step
    assert len(calls) >= 4 + (calls_per_step - 1) * 3  # the last step of some samplers takes one call

    sigmas = comfy.samplers.calculate_sigmas(tiny.model.model_sampling, "simple", 5 if sampler == "dpm_2" else 4)
    if sampler == "dpm_2":
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    for sigma, weight in calls:
        step = max(j for j in range(4) if float(sigmas[j]) >= sigma * (1 - 1e-5))
        start, stop = rows or (0, weight.shape[0])
        expected = value[per_step[step][key]][weight_key][start:stop]
        assert torch.allclose(weight[start:stop].double(), expected, atol=1e-6), (sampler, sigma, step)


def wan22(tmp_path, progress, **options):
    """Two tiny Wan experts (high noise, low noise) with a K-LoRA node each (``options``: more of its inputs),
    and their files."""
    experts = []
    for n, seed in enumerate((0, 1)):
        tiny = cm.build("wan21", seed=seed)
        folder = tmp_path / f"expert{n}"
        folder.mkdir()
        content, style, content_file, style_file = pair(tiny, folder, content_seed=10 + n, style_seed=20 + n)
        log_path = folder / "log.json"
        model = kc.apply(tiny.patcher, content_file, style_file, **{"pattern": "s", **options}, progress=progress,
                         log_path=log_path)
        experts.append((tiny, model, content, style, log_path, folder))
    return experts


def run_wan22(experts, steps=4, switch=2):
    (high, high_model, *_), (low, low_model, *_) = experts
    latent = cm.sample(high, high_model, steps=steps, start_step=0, last_step=switch)  # leftover noise returned
    return cm.sample(low, low_model, steps=steps, start_step=switch, last_step=steps, latent=latent,
                     disable_noise=True, force_full_denoise=True)


@pytest.mark.slow
def test_percent_progress_continues_across_wan22_experts_and_stays_exact(tmp_path):
    experts = wan22(tmp_path, "percent")
    ours = run_wan22(experts)
    logs = [json.loads(e[4].read_text()) for e in experts]
    progress = [[s["progress"] for s in log["generations"][-1]["steps"]] for log in logs]
    assert [s["step"] for s in logs[1]["generations"][-1]["steps"]] == [2, 3]  # the run's steps 2-3 of 4
    assert progress[0] == pytest.approx([0.0, 0.25], abs=1e-6)
    assert progress[1] == pytest.approx([0.5, 0.75], abs=1e-6), "the low expert must continue where the high stopped"
    for log, values in zip(logs, progress):
        for entry in log["generations"][-1]["steps"]:
            assert entry["scale"] == pytest.approx(1.5 * entry["progress"] + 0.5)

    (high, _, hc, hs, high_log, folder0), (low, _, lc, ls, low_log, folder1) = experts
    latent = stepwise_reference(high, folder0, hc, hs, schedule_of(high_log), 4, first=0, last=2)
    expected = stepwise_reference(low, folder1, lc, ls, schedule_of(low_log), 4, first=2, last=4, latent=latent)
    assert relative_error(ours, expected) < 2e-6


def test_steps_progress_is_per_sampler_run_and_percent_places_denoise(tmp_path):
    experts = wan22(tmp_path, "steps")
    run_wan22(experts)
    for first, (_, _, _, _, log_path, _) in zip((0, 2), experts):
        steps = json.loads(log_path.read_text())["generations"][-1]["steps"]
        assert [(s["step"], s["progress"]) for s in steps] == [(first, 0.0), (first + 1, 0.5)]

    tiny = cm.build("wan21")
    _, _, content_file, style_file = pair(tiny, tmp_path)
    for progress, expected in (("percent", [0.5, 0.625, 0.75, 0.875]), ("steps", [0.0, 0.25, 0.5, 0.75])):
        log_path = tmp_path / f"{progress}.json"
        model = kc.apply(tiny.patcher, content_file, style_file, progress=progress, log_path=log_path)
        cm.sample(tiny, model, steps=4, denoise=0.5, latent=torch.randn(tiny.latent_shape))
        steps = json.loads(log_path.read_text())["generations"][-1]["steps"]
        assert [s["progress"] for s in steps] == pytest.approx(expected, abs=1e-6)


def test_sampling_percent_inverts_percent_to_sigma():
    for family in ("sdxl", "flux", "wan21", "sd3"):
        sampling = cm.build(family).model.model_sampling
        for p in (0.0, 0.1, 0.37, 0.5, 0.9):
            sigma = sampling.percent_to_sigma(p) if p > 0 else float(sampling.sigma_max)
            assert kc.sampling_percent(sampling, float(sigma)) == pytest.approx(p, abs=1e-6), (family, p)


# --- files K-LoRA refuses, in one line that names the file --------------------------------

def refused(tiny, tmp_path, tensors, match, good=None):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    if isinstance(tensors, bytes):
        bad.write_bytes(tensors)
    else:
        save_file(tensors, str(bad))
    good = good or pair(tiny, tmp_path)[3]
    with pytest.raises(LoRAError, match=match) as info:
        kc.apply(tiny.patcher, bad, good, labels={"content": "content LoRA 'bad.safetensors'"})
    message = str(info.value)
    assert "\n" not in message and message.startswith("content LoRA 'bad.safetensors'"), message
    return message


def wan_layer(name, rank=2, rows=32, cols=32, prefix="diffusion_model."):
    return {f"{prefix}{name}.lora_down.weight": torch.randn(rank, cols),
            f"{prefix}{name}.lora_up.weight": torch.randn(rows, rank), f"{prefix}{name}.alpha": torch.tensor(1.0)}


def test_broken_and_misfit_files_are_one_line_errors(tmp_path):
    tiny = cm.build("wan21")
    good = wan_layer("blocks.0.self_attn.q")
    refused(tiny, tmp_path, b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":", "not a readable safetensors file")
    refused(tiny, tmp_path, {"diffusion_model.blocks.0.self_attn.q.weight": torch.zeros(32, 32)}, "not a LoRA")
    refused(tiny, tmp_path, {**good, "diffusion_model.blocks.0.self_attn.k.lora_down.weight": torch.zeros(2, 32)},
            "has lora_down .* but no lora_up")
    refused(tiny, tmp_path, {**good, "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(32, 1)}, "DoRA")
    nan = {**good, "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.full((32, 2), float("nan"))}
    refused(tiny, tmp_path, nan, "NaN")
    # Keys that map to nothing: never a partial LoRA.
    message = refused(tiny, tmp_path, {**good, **wan_layer("blocks.0.self_attn.nonexistent")},
                      r"1 of its 2 layers map to no weight of this WAN21 model .*whole or not at all")
    assert "blocks.0.self_attn.nonexistent" in message
    # Another model's LoRA: an SDXL file on Wan, a Wan layer of the wrong width.
    sdxl = wan_layer("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", prefix="unet.")
    refused(tiny, tmp_path, sdxl, r"none of its layers maps to a weight of this WAN21 model .*those of a "
                                  r"Stable Diffusion LoRA")
    refused(tiny, tmp_path, wan_layer("blocks.0.self_attn.q", cols=48), r"is 32x48 in the LoRA but 32x32 in this model")


@pytest.mark.parametrize("kind,tensors", [
    ("LoHa", {"hada_w1_a": (32, 2), "hada_w1_b": (2, 32), "hada_w2_a": (32, 2), "hada_w2_b": (2, 32)}),
    ("LoKr", {"lokr_w1": (2, 2), "lokr_w2": (16, 16)}),
    ("OFT", {"oft_blocks": (4, 8, 8)}),
])
def test_other_algorithms_are_refused_because_k_needs_a_rank(kind, tensors, tmp_path):
    tiny = cm.build("wan21")
    layer = {f"lora_unet_blocks_0_self_attn_q.{name}": torch.randn(shape) * 0.01 for name, shape in tensors.items()}
    message = refused(tiny, tmp_path, {**layer, "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(2.0)},
                      f"is a {kind} layer")
    assert "rank" in message


def test_text_encoder_keys_and_wan_image_layers_are_skipped_with_a_warning(tmp_path, caplog):
    tiny = cm.build("wan21")
    content, style, content_file, style_file = pair(tiny, tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(content_file))
    tensors.update(wan_layer("blocks.0.cross_attn.k_img"))
    tensors.update({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
                    "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2)})
    save_file(tensors, str(tmp_path / "i2v.safetensors"))
    with caplog.at_level("WARNING"):
        model = kc.apply(tiny.patcher, tmp_path / "i2v.safetensors", style_file, method="content")
    text = caplog.text
    assert "2 text-encoder weights are not applied" in text
    assert "skipped 3 keys of layers this model does not have" in text and "image-to-video" in text
    assert "lora key not loaded" not in text
    assert close(cm.sample(tiny, model, steps=3), cm.sample(tiny, loader(tiny.patcher, content_file), steps=3))


def test_bad_settings_are_one_line_errors(tmp_path):
    tiny = cm.build("wan21")
    _, _, content_file, style_file = pair(tiny, tmp_path)
    for kwargs, match in (({"pattern": "x"}, "pattern must be one of"), ({"method": "mix"}, "method must be one of"),
                          ({"progress": "noise"}, "progress must be one of"), ({"alpha": 0}, "alpha must be a positive number"),
                          ({"beta": float("nan")}, "beta must be a finite number")):
        with pytest.raises(KLoRAError, match=match):
            kc.apply(tiny.patcher, content_file, style_file, **kwargs)


# --- one rule for both engines: ComfyUI's fused weights against the diffusers engine -------------

@pytest.fixture(scope="module")
def flux_pipeline(tiny_flux_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_flux_dir)


def _flux_units(layout, transformer, seed):
    import flux_lora_files as flux

    if layout == "diffusers":  # every block linear, ranks and alphas per layer in the PEFT metadata
        units = flux.diffusers_units(transformer, flux.block_linears(transformer), rank=lambda i: 2 + i % 3,
                                     alpha=lambda i: 1.0 + i % 4, seed=seed)
        return units, flux.write_diffusers
    # kohya: fused qkv (cut into q, k, v by both engines), modulation, MLP; diffusers' kohya converter
    # hard-codes the real FLUX.1 sizes of single blocks' linear1, so the tiny files leave it out.
    units = flux.fused_units(transformer, "kohya", rank=4, alpha=2.0, seed=seed, keep=lambda name: name != "linear1")
    return units, flux.write_kohya


@pytest.mark.slow
@pytest.mark.parametrize("content_layout,style_layout", [("diffusers", "diffusers"), ("kohya", "kohya"),
                                                         ("diffusers", "kohya")])
def test_fused_weights_choose_per_diffusers_layer_like_the_diffusers_engine(flux_pipeline, content_layout,
                                                                            style_layout, tmp_path):
    from klora.fusion import KLoRA

    transformer = flux_pipeline.transformer
    paths = {}
    for role, layout, seed in (("content", content_layout, 1), ("style", style_layout, 2)):
        units, writer = _flux_units(layout, transformer, seed)
        paths[role] = tmp_path / f"{role}.safetensors"
        writer(paths[role], units)
    engine = KLoRA(flux_pipeline, str(paths["content"]), str(paths["style"]), pattern="s*")
    try:
        tiny = cm.build("flux")
        ours = kc.attached(kc.apply(tiny.patcher, paths["content"], paths["style"], pattern="s*"))
        names = {}  # diffusers module -> ComfyUI log key, from ComfyUI's own FLUX map
        for name, target in comfy.utils.flux_to_diffusers(tiny.model.model_config.unet_config,
                                                          output_prefix="diffusion_model.").items():
            if name.endswith(".weight") and not isinstance(target, str) and target[1] is not None:
                start, length = target[1][1], target[1][2]
                names[name[:-7]] = f"{target[0][:-7]}[{start}:{start + length}]"
            elif name.endswith(".weight"):
                names[name[:-7]] = (target if isinstance(target, str) else target[0])[:-7]
        assert {names[p] for p in engine.stats} == set(ours.stats)
        for path, theirs in engine.stats.items():
            mine = ours.stats[names[path]]
            assert mine.k == theirs.k
            for field in ("content_topk_sum", "style_topk_sum", "content_abs_sum", "style_abs_sum"):
                assert math.isclose(getattr(mine, field), getattr(theirs, field), rel_tol=1e-5), (path, field)
        assert math.isclose(ours.gamma, engine.gamma, rel_tol=1e-6)
        assert {names[p]: role for p, role in engine.only.items()} == ours.only
        switches = 0
        for p in [i / 20 for i in range(20)]:
            expected = {names[path]: role for path, role in engine.choices_at(p).items()}
            assert ours.choices_at(p) == expected, p
            switches += sum(role == "style" for role in expected.values())
        assert 0 < switches < 20 * len(expected)
    finally:
        engine.detach()


# --- every layout, applied exactly ---------------------------------------------------------

def _unet_map(tiny):
    return {k: f"diffusion_model.{v}" for k, v in comfy.utils.unet_to_diffusers(tiny.model.model_config.unet_config).items()}


def _mmdit_map(tiny):
    table = {"flux": comfy.utils.flux_to_diffusers, "sd3": comfy.utils.mmdit_to_diffusers}[tiny.family]
    return table(tiny.model.model_config.unet_config, output_prefix="diffusion_model.")


def _swapped(tiny):
    """Whether a layer's diffusers module has ComfyUI's weight with (shift, scale) halves exchanged."""
    functions = {t[0] for t in _mmdit_map(tiny).values() if not isinstance(t, str) and len(t) > 2}
    return lambda layer: layer.key in functions


def _old_diffusers(tiny, layers):
    """The old diffusers attention-processor names ComfyUI maps: ``unet.<path>.processor.to_q``."""
    names = files.names_from_map(layers, _unet_map(tiny), prefix="unet.")
    return {i: re.sub(r"\.to_out\.0$", ".to_out", n.replace(".to_", ".processor.to_")) for i, n in names.items()}


def _underscored(names, prefix):
    return {i: prefix + n.replace(".", "_") for i, n in names.items()}


# layout -> (family, which weights (cut: diffusers layers of fused weights), names(tiny, layers), write options)
LAYOUTS = {
    # Stable Diffusion 1.5 / SDXL: every form ComfyUI maps, plus the PEFT form it does not.
    "sdxl/comfy": ("sdxl", False, lambda t, ls: files.names_comfy(ls), {}),
    "sdxl/kohya-ldm": ("sdxl", False, lambda t, ls: files.names_comfy(ls, "lora_unet_"), {}),
    "sdxl/kohya": ("sdxl", False, lambda t, ls: _underscored(files.names_from_map(ls, _unet_map(t), ""), "lora_unet_"),
                   {}),
    "sdxl/diffusers-old": ("sdxl", False, _old_diffusers, {"style": "old"}),
    "sdxl/peft": ("sdxl", False, lambda t, ls: files.names_from_map(ls, _unet_map(t), "unet."),
                  {"style": "lora_A", "alpha_in": "metadata"}),
    "sdxl/paper": ("sdxl", False, lambda t, ls: files.names_from_map(ls, _unet_map(t), "unet.unet."),
                   {"style": "lora_A"}),  # the prefix of the original K-LoRA's SDXL files
    "sd15/peft-bare": ("sd15", False, lambda t, ls: files.names_from_map(ls, _unet_map(t), ""),
                       {"style": "lora_A"}),
    "sd15/kohya": ("sd15", False, lambda t, ls: _underscored(files.names_from_map(ls, _unet_map(t), ""), "lora_unet_"),
                   {}),
    # FLUX.1 and SD3: diffusers names land on rows of the fused weights.
    "flux/diffusers": ("flux", True, lambda t, ls: files.names_from_map(ls, _mmdit_map(t)),
                       {"style": "lora_A", "alpha_in": "metadata", "swap": "diffusers"}),
    "flux/ai-toolkit": ("flux", True, lambda t, ls: files.names_from_map(ls, _mmdit_map(t)),
                        {"style": "lora_A", "swap": "diffusers"}),
    "flux/peft-bare": ("flux", True, lambda t, ls: files.names_from_map(ls, _mmdit_map(t), ""),
                       {"style": "lora_A", "swap": "diffusers"}),
    "flux/onetrainer": ("flux", True, lambda t, ls: _underscored(files.names_from_map(ls, _mmdit_map(t), ""),
                                                                 "lora_transformer_"), {"swap": "diffusers"}),
    "flux/kohya": ("flux", False, lambda t, ls: files.names_comfy(ls, "lora_unet_"), {}),
    "flux/comfy": ("flux", False, lambda t, ls: files.names_comfy(ls), {"style": "lora_A", "alpha_in": "baked"}),
    "sd3/diffusers": ("sd3", True, lambda t, ls: files.names_from_map(ls, _mmdit_map(t)),
                      {"style": "lora_A", "alpha_in": "metadata", "swap": "diffusers"}),
    "sd3/kohya": ("sd3", False, lambda t, ls: files.names_comfy(ls, "lora_unet_"), {}),
    # Qwen-Image: ComfyUI keeps diffusers' names.
    "qwen_image/diffusers": ("qwen_image", False, lambda t, ls: files.names_comfy(ls, "transformer."),
                             {"style": "lora_A", "alpha_in": "metadata"}),
    "qwen_image/bare": ("qwen_image", False, lambda t, ls: files.names_comfy(ls, ""), {"style": "lora_A"}),
    "qwen_image/comfy": ("qwen_image", False, lambda t, ls: files.names_comfy(ls), {}),
    # Wan: original names (ComfyUI's), musubi-tuner, and the diffusers names ComfyUI does not map.
    "wan21/comfy": ("wan21", False, lambda t, ls: files.names_comfy(ls), {}),
    "wan21/diffusion-pipe": ("wan21", False, lambda t, ls: files.names_comfy(ls), {"style": "lora_A",
                                                                                   "alpha_in": "baked"}),
    "wan21/musubi": ("wan21", False, lambda t, ls: files.names_comfy(ls, "lora_unet_"), {}),
    "wan21/peft": ("wan21", False, lambda t, ls: files.names_wan_diffusers(ls),
                   {"style": "lora_A", "alpha_in": "metadata"}),
    "wan21/peft-bare": ("wan21", False, lambda t, ls: files.names_wan_diffusers(ls, ""), {"style": "lora_A"}),
    # HunyuanVideo: diffusion-pipe and musubi original names, and diffusers names (q/k/v on qkv rows).
    "hunyuan_video/diffusion-pipe": ("hunyuan_video", False,
                                     lambda t, ls: files.names_hunyuan_video_original(t.model, ls),
                                     {"style": "lora_A", "alpha_in": "baked"}),
    "hunyuan_video/transformer-original": ("hunyuan_video", False, lambda t, ls: files.names_hunyuan_video_original(
        t.model, ls, "transformer."), {}),
    "hunyuan_video/musubi": ("hunyuan_video", False,
                             lambda t, ls: files.names_hunyuan_video_original(t.model, ls, "lora_unet_"), {}),
    "hunyuan_video/peft": ("hunyuan_video", True, lambda t, ls: files.names_hunyuan_video_diffusers(t.model, ls),
                           {"style": "lora_A", "alpha_in": "metadata", "swap": files.swapped_in_diffusers}),
    # LTX-Video: original names (ComfyUI's) and diffusers names.
    "ltxv/comfy": ("ltxv", False, lambda t, ls: files.names_comfy(ls), {}),
    "ltxv/kohya": ("ltxv", False, lambda t, ls: files.names_comfy(ls, "lora_unet_"), {}),
    "ltxv/peft": ("ltxv", False, lambda t, ls: files.names_ltxv_diffusers(ls),
                  {"style": "lora_A", "alpha_in": "metadata"}),
}


def _nameable(tiny, name_of, chosen):
    """The (key, rows) the layout can name (a probe layer per target)."""
    out = []
    for key, rows in chosen:
        probe = files.Layer(key, rows, torch.zeros(1, 1), torch.zeros(1, 1), None)
        try:
            name_of(tiny, [probe])
        except KeyError:
            continue
        out.append((key, rows))
    return out


@pytest.mark.parametrize("layout", [pytest.param(n, marks=pytest.mark.slow) if n.split("/")[0] in SLOW else n
                                    for n in LAYOUTS])
def test_every_layout_is_applied_exactly(layout, tmp_path):
    family, cut, name_of, options = LAYOUTS[layout]
    tiny = cm.build(family)
    state = tiny.model.state_dict()
    every = [(k, r) for k, r in files.targets(tiny.model, r"\.weight$", fused_rows(tiny) if cut else {})
             if state[k].dim() == 2]
    chosen = _nameable(tiny, name_of, every)
    assert len(chosen) >= 0.6 * len(every), f"{layout}: only {len(chosen)} of {len(every)} weights named"
    layers = files.random_layers(tiny.model, chosen, rank=lambda i: 2 + i % 3, alpha=lambda i: 1.0 + i % 4, seed=5)
    if options.get("swap") == "diffusers":
        options = dict(options, swap=_swapped(tiny))
    path = files.write(tmp_path / "lora.safetensors", layers, name_of(tiny, layers), **options)
    other = pair(tiny, tmp_path)[3]
    w0 = cm.weights(tiny.patcher)
    model = kc.apply(tiny.patcher, path, other, method="content")
    comfy.model_management.load_models_gpu([model])
    got = cm.weights(tiny.patcher)
    expected = files.expected_weights(w0, [(layers, 1.0)])
    adapted = {l.key for l in layers}
    for key, value in got.items():
        if key in adapted:
            assert torch.allclose(value.double(), expected[key], rtol=1e-5, atol=1e-6), (layout, key)
        else:
            assert torch.equal(value, w0[key]), (layout, key)


def test_full_weight_parts_switch_with_their_lora_and_stay_on_elsewhere(tmp_path):
    tiny = cm.build("wan21")
    content, style, _, _ = pair(tiny, tmp_path)
    gen = torch.Generator().manual_seed(3)

    def full_parts(layers, norm_block):
        biases = {f"{l.module}.diff_b": 0.05 * torch.randn(l.B.shape[0], generator=gen) for l in layers}
        norm = f"diffusion_model.blocks.{norm_block}.norm3"
        return biases, {f"{norm}.diff": 0.05 * torch.randn(32, generator=gen),
                        f"{norm}.diff_b": 0.05 * torch.randn(32, generator=gen)}

    parts = {"content": full_parts(content, 0), "style": full_parts(style, 1)}
    paths = {role: files.write(tmp_path / f"{role}-full.safetensors", layers, files.names_comfy(layers),
                               extra={**parts[role][0], **parts[role][1]})
             for role, layers in (("content", content), ("style", style))}
    for method in ("content", "style"):
        ours = cm.sample(tiny, kc.apply(tiny.patcher, paths["content"], paths["style"], method=method), steps=3)
        assert close(ours, cm.sample(tiny, loader(tiny.patcher, paths[method]), steps=3)), method

    log_path = tmp_path / "log.json"
    ours = cm.sample(tiny, kc.apply(tiny.patcher, paths["content"], paths["style"], pattern="s", log_path=log_path),
                     steps=4)
    latent, by_place = None, {(l.key, l.rows): l for l in style}
    for i, choices in enumerate(schedule_of(log_path)):
        chosen, extra = [], {**parts["content"][1], **parts["style"][1]}  # norms: no choice there, always on
        for c in content:
            role = choices[c.module]
            chosen.append(c if role == "content" else by_place[(c.key, c.rows)])
            extra[f"{c.module}.diff_b"] = parts[role][0][f"{c.module}.diff_b"]
        step_file = files.write(tmp_path / f"step{i}.safetensors", chosen, files.names_comfy(chosen), extra=extra)
        latent = cm.sample(tiny, loader(tiny.patcher, step_file), steps=4, start_step=i, last_step=i + 1,
                           latent=latent, disable_noise=latent is not None, force_full_denoise=i == 3)
    assert relative_error(ours, latent) < 2e-6


# --- strengths ------------------------------------------------------------------------------

def test_strengths_scale_the_applied_delta_not_the_choice(tmp_path):
    tiny = cm.build("wan21")
    content, style, content_file, style_file = pair(tiny, tmp_path)
    halved = kc.apply(tiny.patcher, content_file, style_file, method="content", content_strength=0.5)
    assert close(cm.sample(tiny, halved, steps=3), cm.sample(tiny, loader(tiny.patcher, content_file, 0.5), steps=3))
    plain = kc.attached(kc.apply(tiny.patcher, content_file, style_file, pattern="s"))
    scaled = kc.attached(kc.apply(tiny.patcher, content_file, style_file, pattern="s", content_strength=3.0,
                                  style_strength=0.25))
    assert [plain.choices_at(i / 8) for i in range(8)] == [scaled.choices_at(i / 8) for i in range(8)]
    assert scaled.gamma == plain.gamma  # the log's statistics are the files' own
    header = scaled.selection_log()
    assert (header["content_scale"], header["style_scale"]) == (3.0, 0.25)
    assert header["layers"] == plain.selection_log()["layers"]
    assert "content_scale" not in plain.selection_log()


# --- the nodes, as ComfyUI calls them --------------------------------------------------------

@pytest.fixture
def comfy_folders(tmp_path):
    """ComfyUI's loras and output folders pointed at temporary ones (never the checkout's)."""
    import folder_paths

    loras, output = tmp_path / "loras", tmp_path / "output"
    loras.mkdir()
    output.mkdir()
    saved_loras, saved_output = folder_paths.folder_names_and_paths["loras"], folder_paths.get_output_directory()
    folder_paths.folder_names_and_paths["loras"] = ([str(loras)], saved_loras[1])
    folder_paths.filename_list_cache.pop("loras", None)
    folder_paths.set_output_directory(str(output))
    try:
        yield loras, output
    finally:
        folder_paths.folder_names_and_paths["loras"] = saved_loras
        folder_paths.filename_list_cache.pop("loras", None)
        folder_paths.set_output_directory(saved_output)


def test_nodes_interface_and_a_workflow_with_every_input_set(comfy_folders, tmp_path):
    from klora.comfyui_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    loras, output = comfy_folders
    tiny = cm.build("wan21")
    content, style, content_file, style_file = pair(tiny, loras)
    node = NODE_CLASS_MAPPINGS["KLoRALoader"]
    assert NODE_DISPLAY_NAME_MAPPINGS["KLoRALoader"] == "K-LoRA (content + style)"
    inputs = node.INPUT_TYPES()
    assert list(inputs["required"]) == ["model", "content_lora", "style_lora", "pattern", "alpha", "beta", "method",
                                        "progress", "selection_log"]
    assert list(inputs["optional"]) == ["content_strength", "style_strength", "np_mu", "switch_every"]
    assert inputs["required"]["content_lora"][0] == ["content.safetensors", "style.safetensors"]
    assert inputs["required"]["pattern"][0] == ["s*", "s"] and inputs["required"]["alpha"][1]["default"] == 1.5
    assert inputs["required"]["method"][0] == ["klora", "est", "switch", "np", "merge", "content", "style"]
    assert inputs["required"]["progress"][0] == ["steps", "percent"]
    assert node.RETURN_TYPES == ("MODEL",) and node.CATEGORY.startswith("loaders")

    (model,) = getattr(node(), node.FUNCTION)(model=tiny.patcher, content_lora="content.safetensors",
                                              style_lora="style.safetensors", pattern="s*", alpha=1.5,
                                              beta=inputs["required"]["beta"][1]["default"], method="klora",
                                              progress="steps", selection_log="klora/log")
    log_file = output / "klora" / "log_00001_.json"
    assert json.loads(log_file.read_text())["generations"] == []  # written when the node runs...
    latent = cm.sample(tiny, model, steps=4)
    log = json.loads(log_file.read_text())  # ...and when each run ends
    assert log["beta"] == pytest.approx(1.275) and log["pattern"] == "s*" and len(log["generations"]) == 1
    assert log["content"] == "content LoRA 'content.safetensors'"

    mapper = NODE_CLASS_MAPPINGS["KLoRASelectionMap"]
    assert NODE_DISPLAY_NAME_MAPPINGS["KLoRASelectionMap"] == "K-LoRA selection map"
    (image,) = getattr(mapper(), mapper.FUNCTION)(model=model, samples={"samples": latent})
    assert image.dtype == torch.float32 and image.dim() == 4 and image.shape[0] == 1 and image.shape[3] == 3
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    colours = {tuple(pixel) for pixel in (image[0] * 255).round().int().reshape(-1, 3).unique(dim=0).tolist()}
    assert (230, 120, 40) in colours and (40, 110, 200) in colours  # content and style cells

    with pytest.raises(KLoRAError, match="style LoRA 'missing.safetensors': no such file"):
        node().load(tiny.patcher, "content.safetensors", "missing.safetensors", "s", 1.5, -1.0, "klora", "steps", "")
    with pytest.raises(KLoRAError, match="must be a file-name prefix inside ComfyUI's output folder"):
        node().load(tiny.patcher, "content.safetensors", "style.safetensors", "s", 1.5, -1.0, "klora", "steps", "../x")
    with pytest.raises(KLoRAError, match="has no K-LoRA"):
        mapper().render(tiny.patcher, {"samples": latent})


def test_peft_lora_b_bias_is_a_bias_delta_scaled_like_its_layer(tmp_path):
    tiny = cm.build("wan21")
    chosen = files.targets(tiny.model, r"self_attn\.[qk]\.weight$")
    layers = files.random_layers(tiny.model, chosen, rank=4, alpha=8.0, seed=4)
    names = files.names_wan_diffusers(layers)
    bias = {names[id(l)]: 0.1 * torch.randn(l.B.shape[0]) for l in layers}
    path = files.write(tmp_path / "bias.safetensors", layers, names, style="lora_A", alpha_in="metadata",
                       extra={f"{n}.lora_B.bias": b for n, b in bias.items()})
    w0 = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    model = kc.apply(tiny.patcher, path, pair(tiny, tmp_path)[3], method="content")
    comfy.model_management.load_models_gpu([model])
    state = tiny.model.state_dict()
    for l in layers:
        expected = w0[l.key].double() + l.delta()
        assert torch.allclose(state[l.key].double(), expected, atol=1e-6)
        bias_key = l.module + ".bias"
        assert torch.allclose(state[bias_key].double(), w0[bias_key].double() + l.scale * bias[names[id(l)]].double(),
                              atol=1e-6)


def test_an_all_zero_side_never_competes_and_one_lora_layers_are_always_on(tmp_path, caplog):
    tiny = cm.build("wan21")
    content, style, _, _ = pair(tiny, tmp_path, same_layers=False)  # the style LoRA lacks content's first layer
    content[1].B.zero_()  # and content's second layer is all zero
    content_file = write_comfy(tiny, tmp_path / "zero.safetensors", content)
    style_file = write_comfy(tiny, tmp_path / "style2.safetensors", style)
    log_path = tmp_path / "log.json"
    with caplog.at_level("WARNING"):
        model = kc.apply(tiny.patcher, content_file, style_file, pattern="s", log_path=log_path)
    assert "1 layers both LoRAs adapt are all zero in the content LoRA" in caplog.text
    cm.sample(tiny, model, steps=4)
    log = json.loads(log_path.read_text())
    assert log["only"] == {content[0].module: "content", content[1].module: "style"}
    stats = files.pair_stats(content[2:], style[1:], lambda l: False)
    assert set(log["layers"]) == set(stats)
    assert math.isclose(log["gamma"], files.expected_gamma([s["ratio"] for s in stats.values()]), rel_tol=1e-6)
    expected = stepwise_reference(tiny, tmp_path, content, style, schedule_of(log_path), 4, fixed=log["only"])
    assert relative_error(cm.sample(tiny, model, steps=4), expected) < 2e-6


# --- the other methods: NP-LoRA, EST-LoRA, LoRA Switch --------------------------------------

def loaded_weights(patcher) -> dict[str, torch.Tensor]:
    """The denoiser's weights with ``patcher`` loaded as a sampler loads it, then unloaded again."""
    comfy.model_management.load_models_gpu([patcher])
    try:
        return cm.weights(patcher)
    finally:
        comfy.model_management.unload_all_models()


@pytest.mark.parametrize("family,cut", [("flux", True), ("flux", False), ("wan21", None),
                                        pytest.param("sdxl", None, marks=pytest.mark.slow)])
def test_np_equals_comfyuis_loader_on_the_merge_recomputed_with_a_dense_svd(family, cut, tmp_path):
    """NP-LoRA (the content projected off the style's right singular vectors, on each diffusers layer of a fused
    weight) equals ``LoraLoaderModelOnly`` on one ordinary LoRA file of the merge, which the test makes itself
    from a dense float64 SVD of each layer's style delta; the style LoRA lacks one of the content's layers and
    adapts one the content does not."""
    tiny = cm.build(family)
    content, style, content_file, _ = pair(tiny, tmp_path, cut=cut, same_layers=False)
    extra = files.random_layers(tiny.model, files.targets(tiny.model, r"(ffn\.0|ff\.net\.2|img_mlp\.0)\.weight$")[:1],
                                rank=3, seed=6, scale=0.07)
    style = style + extra
    style_file = write_comfy(tiny, tmp_path / "style-more.safetensors", style)
    rows = fused_rows(tiny)
    merged = loaded_weights(kc.apply(tiny.patcher, content_file, style_file, method="merge"))
    for mu, strengths in ((0.5, (1.0, 1.0)), (math.inf, (1.0, 1.0)), (2.0, (0.7, 1.3))):
        reference = files.np_merged(split(content, rows), split(style, rows), mu, *strengths)
        reference_file = write_comfy(tiny, tmp_path / f"np-{mu}.safetensors", reference)
        expected = loaded_weights(loader(tiny.patcher, reference_file))
        ours = loaded_weights(kc.apply(tiny.patcher, content_file, style_file, method="np", np_mu=mu,
                                       content_strength=strengths[0], style_strength=strengths[1]))
        for key, value in ours.items():
            difference = float((value - expected[key]).abs().max())
            assert torch.allclose(value, expected[key], rtol=1e-5, atol=1e-6), (mu, key, difference)
        if strengths == (1.0, 1.0):
            projected = [k for k in ours if not torch.allclose(ours[k], merged[k], rtol=1e-5, atol=1e-6)]
            assert projected, "NP-LoRA changed nothing against the merge: the test proves nothing"
            only = {l.key for l in content[:1]} | {l.key for l in extra}  # one LoRA there: as under merge
            assert all(torch.equal(ours[k], merged[k]) for k in only if k not in {l.key for l in content[1:]})


def est_stats(tiny, content, style):
    """{log key: (content energy, style energy)} and gamma, recomputed from the layers."""
    rows = fused_rows(tiny)
    content, style = split(content, rows), split(style, rows)
    by_place = {(l.key, l.rows): l for l in style}
    energies = {c.log_key(c.key in rows): (files.energy(c), files.energy(by_place[(c.key, c.rows)]))
                for c in content if (c.key, c.rows) in by_place}
    stats = files.pair_stats(content, style, lambda l: l.key in rows)
    return energies, files.expected_gamma([s["ratio"] for s in stats.values()])


@pytest.mark.parametrize("family", ["wan21", "flux"])
def test_est_logs_the_energies_and_chooses_by_them(family, tmp_path):
    tiny = cm.build(family)
    content, style, content_file, style_file = pair(tiny, tmp_path)
    energies, gamma = est_stats(tiny, content, style)
    # beta where the ratios E_c / (gamma E_s) are, so that layers switch during the run
    ratios = sorted(ec / (gamma * es) for ec, es in energies.values())
    beta = max(0.0, ratios[len(ratios) // 2] - 0.75 * 1.5)
    log_path = tmp_path / "log.json"
    model = kc.apply(tiny.patcher, content_file, style_file, method="est", pattern="s", beta=beta, log_path=log_path)
    ours = cm.sample(tiny, model, steps=4)
    log = json.loads(log_path.read_text())
    assert log["method"] == "est" and log["beta"] == beta and math.isclose(log["gamma"], gamma, rel_tol=1e-5)
    assert set(log["layers"]) == set(energies)
    for key, (content_energy, style_energy) in energies.items():
        assert math.isclose(log["layers"][key]["content_energy"], content_energy, rel_tol=1e-5), key
        assert math.isclose(log["layers"][key]["style_energy"], style_energy, rel_tol=1e-5), key
    (generation,) = log["generations"]
    switched = set()
    for entry in generation["steps"]:
        scale = files.expected_scale(entry["step"] / 4, "s", 1.5, beta)
        assert entry["scale"] == pytest.approx(scale)
        expected = {key: files.expected_est_choice(*e, gamma, scale) for key, e in energies.items()}
        assert entry["choices"] == expected, entry["step"]
        switched |= {key for key, choice in expected.items() if choice == "style"}
    assert switched and switched != set(energies), "the test pair should make some layers switch and not others"
    expected = stepwise_reference(tiny, tmp_path, content, style, schedule_of(log_path), 4)
    assert relative_error(ours, expected) < 2e-6, relative_error(ours, expected)


def record_weights(patcher):
    """A clone whose model calls record (sigma, every denoiser weight then); K-LoRA's wrapper runs first."""
    calls = []

    def wrapper(executor, *args, **kwargs):
        options = kwargs.get("transformer_options", args[5] if len(args) > 5 else {})
        calls.append((float(options["sigmas"].flatten()[0]), cm.weights(patcher)))
        return executor(*args, **kwargs)

    clone = patcher.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test-record", wrapper)
    return clone, calls


def test_switch_alternates_whole_loras_every_n_steps(tmp_path):
    """LoRA Switch as its paper's code runs it (a step-end callback after steps 2, 4, ...): content for steps 0-2,
    style for 3-4, content for 5 (switch_every 2); at a style step the weights are what ComfyUI's loader gives
    the style LoRA alone, so a layer only the content adapts is off."""
    tiny = cm.build("wan21")
    content, style, content_file, _ = pair(tiny, tmp_path, same_layers=False)  # content's first layer: content only
    style = style + files.random_layers(tiny.model, files.targets(tiny.model, r"ffn\.0\.weight$")[:1], seed=6)
    style_file = write_comfy(tiny, tmp_path / "style-more.safetensors", style)  # ... and one layer style only
    log_path = tmp_path / "log.json"
    model = kc.apply(tiny.patcher, content_file, style_file, method="switch", switch_every=2, log_path=log_path)
    recorded, calls = record_weights(model)
    cm.sample(tiny, recorded, steps=6)
    log = json.loads(log_path.read_text())
    assert log["method"] == "switch" and log["switch_every"] == 2
    (generation,) = log["generations"]
    assert [s["step"] for s in generation["steps"]] == list(range(6))
    roles = ["content", "content", "content", "style", "style", "content"]
    for entry, role in zip(generation["steps"], roles):
        assert entry["scale"] is None and set(entry["choices"].values()) == {role}, entry
        assert set(entry["choices"]) == {l.module for l in content[1:]}  # the rows: layers both adapt

    sigmas = comfy.samplers.calculate_sigmas(tiny.model.model_sampling, "simple", 6)
    by_step = {max(j for j in range(6) if float(sigmas[j]) >= sigma * (1 - 1e-5)): weights for sigma, weights in calls}
    comfy.model_management.unload_all_models()
    w0 = cm.weights(tiny.patcher)
    alone = {role: loaded_weights(loader(tiny.patcher, path)) for role, path in (("content", content_file),
                                                                                   ("style", style_file))}
    content_only, style_only = content[0].key, style[-1].key
    for step, weights in by_step.items():
        role = roles[step]
        for key, value in weights.items():
            assert torch.allclose(value, alone[role][key], rtol=1e-6, atol=1e-7), (step, key)
        on, off = (content_only, style_only) if role == "content" else (style_only, content_only)
        assert torch.equal(weights[off], w0[off]), (step, off, "the other LoRA must be off on every layer")
        assert not torch.equal(weights[on], w0[on]), (step, on)


@pytest.mark.parametrize("method,progress", [("switch", "steps"), ("est", "percent"), ("klora", "steps")])
def test_wan22_experts_number_their_steps_as_the_run_does(method, progress, tmp_path):
    """Two KSamplerAdvanced (steps 0-2 and 2-4 of 4): the low-noise expert's log and selection map number its
    steps 2 and 3, and LoRA Switch continues its blocks there (switch_every 2: steps 0-2 content, 3 style)."""
    from klora.selection_map import layout

    experts = wan22(tmp_path, progress, method=method, switch_every=2, pattern="s")
    run_wan22(experts)
    for first, (tiny, model, content, style, log_path, _) in zip((0, 2), experts):
        log = json.loads(log_path.read_text())
        (generation,) = log["generations"]
        assert generation["num_inference_steps"] == 4
        assert [s["step"] for s in generation["steps"]] == [first, first + 1]
        assert [n for n, _, _ in layout(kc.attached(model).render_log()).columns] == [first, first + 1]
        if method == "switch":
            for entry in generation["steps"]:
                assert set(entry["choices"].values()) == {"content" if entry["step"] <= 2 else "style"}
        if method == "est":
            energies, gamma = est_stats(tiny, content, style)
            for entry in generation["steps"]:
                scale = files.expected_scale(entry["progress"], "s", 1.5, 0.5)
                assert entry["choices"] == {k: files.expected_est_choice(*e, gamma, scale) for k, e in energies.items()}


# --- what a new user runs into ----------------------------------------------------------------

def test_a_pt_lora_loads_as_comfyuis_loader_loads_it(comfy_folders, tmp_path):
    from safetensors.torch import load_file

    from klora.comfyui_nodes import KLoRALoader

    loras, _ = comfy_folders
    tiny = cm.build("wan21")
    _, _, content_file, style_file = pair(tiny, tmp_path)
    torch.save(load_file(str(content_file)), loras / "content.pt")
    style_file.rename(loras / "style.safetensors")
    assert "content.pt" in KLoRALoader.INPUT_TYPES()["required"]["content_lora"][0]
    (model,) = KLoRALoader().load(tiny.patcher, "content.pt", "style.safetensors", "s*", 1.5, -1.0, "content",
                                  "steps", "")
    reference = loader(tiny.patcher, loras / "content.pt")  # ComfyUI's LoraLoaderModelOnly reads .pt files too
    assert close(cm.sample(tiny, model, steps=3), cm.sample(tiny, reference, steps=3))
    (loras / "broken.pt").write_bytes(b"not a pickle")
    with pytest.raises(LoRAError, match=r"content LoRA 'broken.pt': not a readable LoRA file"):
        KLoRALoader().load(tiny.patcher, "broken.pt", "style.safetensors", "s*", 1.5, -1.0, "klora", "steps", "")


def test_a_text_encoder_lora_is_refused_as_such(tmp_path):
    tiny = cm.build("wan21")
    text_encoder = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 8),
                    "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, 2),
                    "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(2.0)}
    message = refused(tiny, tmp_path, text_encoder, "its layers are all for the text encoder")
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in message and "low-rank" not in message


def klora_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == kc.logger.name]


def test_every_warning_starts_with_k_lora_and_says_what_is_true(tmp_path, caplog):
    tiny = cm.build("wan21")
    content, style, content_file, style_file = pair(tiny, tmp_path)
    for layer in style:
        layer.B.zero_()
    zero_file = write_comfy(tiny, tmp_path / "zero.safetensors", style)
    with caplog.at_level("WARNING"):
        kc.apply(tiny.patcher, content_file, zero_file)
    lines = klora_warnings(caplog)
    assert lines and all(line.startswith("K-LoRA: ") for line in lines), lines
    assert any(f"{len(content)} layers both LoRAs adapt are all zero in the style LoRA" in line for line in lines)
    assert not any("no layer in common" in line for line in lines), "they share every layer"

    caplog.clear()
    other = files.random_layers(tiny.model, files.targets(tiny.model, r"ffn\.0\.weight$"), alpha=2.0, seed=6)
    with caplog.at_level("WARNING"):
        kc.apply(tiny.patcher, content_file, write_comfy(tiny, tmp_path / "ffn.safetensors", other), method="est")
    assert klora_warnings(caplog) == ["K-LoRA: the content and style LoRAs adapt no layer in common: there is "
                                      "nothing to choose or project, each LoRA is applied on its own layers"]

    caplog.clear()
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(content_file))
    tensors.update({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
                    "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2)})
    save_file(tensors, str(tmp_path / "with-te.safetensors"))
    with caplog.at_level("WARNING"):
        kc.apply(tiny.patcher, tmp_path / "with-te.safetensors", style_file)
    lines = klora_warnings(caplog)
    assert lines and all(line.startswith("K-LoRA: ") for line in lines), lines


def test_the_same_file_as_content_and_style_is_warned_about_once(tmp_path, caplog):
    tiny = cm.build("wan21")
    _, _, content_file, style_file = pair(tiny, tmp_path)
    with caplog.at_level("WARNING"):
        kc.apply(tiny.patcher, content_file, content_file)
    same = [line for line in klora_warnings(caplog) if "same file" in line]
    assert len(same) == 1 and same[0].startswith("K-LoRA: the content and style LoRAs are the same file ("), same
    caplog.clear()
    with caplog.at_level("WARNING"):
        kc.apply(tiny.patcher, content_file, style_file)
    assert not any("same file" in line for line in klora_warnings(caplog))


def test_the_methods_knobs_are_checked(comfy_folders, tmp_path):
    from klora.comfyui_nodes import KLoRALoader

    loras, output = comfy_folders
    tiny = cm.build("wan21")
    _, _, content_file, style_file = pair(tiny, loras)
    for np_mu, expected in ((-1.0, math.inf), (0.0, 0.0), (0.5, 0.5)):  # -1: the node's infinity
        KLoRALoader().load(tiny.patcher, "content.safetensors", "style.safetensors", "s", 1.5, -1.0, "np", "steps",
                           f"np{np_mu}", np_mu=np_mu)
        assert json.loads((output / f"np{np_mu}_00001_.json").read_text())["np_mu"] == expected
    for kwargs, match in (({"beta": -0.5}, "beta must be a finite number >= 0"),
                          ({"np_mu": -0.5, "method": "np"}, "np_mu must be a number >= 0 or inf"),
                          ({"switch_every": 0, "method": "switch"}, "switch_every must be a whole number of steps")):
        with pytest.raises(KLoRAError, match=match):
            kc.apply(tiny.patcher, content_file, style_file, **kwargs)
    with pytest.raises(KLoRAError, match=r"np_mu must be -1 \(infinity: the hard projection\) or a number >= 0"):
        KLoRALoader().load(tiny.patcher, "content.safetensors", "style.safetensors", "s", 1.5, -1.0, "np", "steps", "",
                           np_mu=-0.5)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux", "sd3", "qwen_image"])
def test_comfyuis_own_loader_reads_the_exported_layout(family, tmp_path, caplog):
    """``klora.export.state_dict`` (what ``--export_lora`` writes) for layers named by their diffusers paths:
    ComfyUI's ``LoraLoaderModelOnly`` maps every key and applies each layer exactly (ranks differ per layer,
    so the UNet's per-layer alpha and the transformers' padding to one rank both matter)."""
    from klora.export import state_dict

    tiny = cm.build(family)
    cut = family in ("flux", "sd3")
    state = tiny.model.state_dict()
    every = [(k, r) for k, r in files.targets(tiny.model, r"\.weight$", fused_rows(tiny) if cut else {})
             if state[k].dim() == 2]
    if family in ("sd15", "sdxl"):
        name_of, component = (lambda ls: files.names_from_map(ls, _unet_map(tiny), prefix="")), "unet"
    elif cut:
        name_of, component = (lambda ls: files.names_from_map(ls, _mmdit_map(tiny), prefix="")), "transformer"
    else:
        name_of, component = (lambda ls: files.names_comfy(ls, prefix="")), "transformer"
    chosen = _nameable(tiny, lambda t, ls: name_of(ls), every)
    assert len(chosen) >= 0.5 * len(every), f"only {len(chosen)} of {len(every)} weights named"
    layers = files.random_layers(tiny.model, chosen, rank=lambda i: 2 + i % 3, alpha=lambda i: 1.0 + i % 4, seed=9)
    names = name_of(layers)
    swapped = _swapped(tiny) if cut else (lambda layer: False)  # diffusers' order of (shift, scale) rows

    def up(layer):
        B = (layer.B.double() * layer.scale).float()
        return torch.cat(B.chunk(2)[::-1]) if swapped(layer) else B

    exported = {names[id(l)]: (up(l), l.A.float()) for l in layers}
    path = tmp_path / "exported.safetensors"
    from safetensors.torch import save_file

    save_file(state_dict(exported, component), str(path))
    w0 = cm.weights(tiny.patcher)
    with caplog.at_level("WARNING"):
        got = loaded_weights(loader(tiny.patcher, path))
    assert "lora key not loaded" not in caplog.text
    expected = files.expected_weights(w0, [(layers, 1.0)])
    adapted = {l.key for l in layers}
    for key, value in got.items():
        if key in adapted:
            assert torch.allclose(value.double(), expected[key], rtol=1e-5, atol=1e-6), key
        else:
            assert torch.equal(value, w0[key]), key
