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
