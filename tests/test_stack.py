"""K-LoRA inside a LoRA stack (issue 15): extra always-on LoRAs, the user's own adapters, strengths.

Every expectation is computed without K-LoRA: images from plain diffusers with the same LoRAs as
adapters (``set_adapters`` with weights), weights from the tensors written to the files.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

from klora import fusion
from klora.errors import KLoRAError, LoRAError
from klora.fusion import KLoRA
from applied import applied_delta, base_weights
from lora_files import attention_linears, delta, random_layers, write_peft

SWITCHING = ("fused", "adapters")


def _load(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(tiny_sdxl_dir):
    return _load(tiny_sdxl_dir)


@pytest.fixture(scope="module")
def stack(tiny_sdxl_dir, tmp_path_factory):
    """Content on every attention linear, style on the first 40, an extra LoRA on every third one (so it
    overlaps both), and the user's own ("mine"). PEFT files diffusers loads as they are."""
    folder = tmp_path_factory.mktemp("stack")
    unet = _load(tiny_sdxl_dir).unet
    paths = attention_linears(unet)
    layers = {
        "content": random_layers(unet, paths, rank=4, alpha=2.0, seed=21, scale=0.05),
        "style": random_layers(unet, paths[:40], rank=8, alpha=4.0, seed=22, scale=0.06),
        "extra": random_layers(unet, paths[::3], rank=4, alpha=4.0, seed=23, scale=0.08),
        # The user's own: half the attention linears, and feed-forward layers K-LoRA's files do not reach.
        "mine": random_layers(unet, paths[1::2] + [p for p, m in unet.named_modules() if p.endswith("ff.net.2")],
                              rank=2, alpha=2.0, seed=24, scale=0.08),
    }
    files = {}
    for name, value in layers.items():
        files[name] = folder / f"{name}.safetensors"
        write_peft(files[name], value)
    return files, layers


def _generate(pipe, steps=4, seed=0, **kwargs):
    return pipe("a sbu dog in szn style", num_inference_steps=steps, height=64, width=64, guidance_scale=5.0,
                output_type="np", generator=torch.Generator().manual_seed(seed), **kwargs).images


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


def _plain_diffusers(folder, files, adapters: dict[str, float]):
    """The image plain diffusers makes with these LoRAs as active adapters at these weights."""
    reference = _load(folder)
    for name in adapters:
        _quiet(lambda: reference.load_lora_weights(str(files[name]), adapter_name=name))
    reference.set_adapters(list(adapters), list(adapters.values()))
    return _generate(reference)


# --- extra LoRAs ---------------------------------------------------------------------------


@pytest.mark.parametrize("switching", SWITCHING)
@pytest.mark.parametrize("method", ["content", "style"])
def test_one_side_with_an_extra_lora_equals_diffusers_with_both_adapters(pipe, stack, tiny_sdxl_dir, switching,
                                                                        method):
    files, _ = stack
    expected = _plain_diffusers(tiny_sdxl_dir, files, {method: 1.0, "extra": 0.7})
    klora = _quiet(lambda: KLoRA(pipe, files["content"], files["style"], method=method,
                                 extra_loras=[(files["extra"], 0.7)], switching=switching))
    assert klora.switching == switching
    got = _generate(pipe)
    klora.detach()
    without_extra = _plain_diffusers(tiny_sdxl_dir, files, {method: 1.0})
    assert np.abs(expected - without_extra).max() > 1e-3  # the extra LoRA changes the image
    assert np.abs(got - expected).max() < 1e-5  # measured 1e-6 (fused) and 0 (adapters)


def test_extra_loras_take_no_part_in_the_choice(pipe, stack):
    files, _ = stack
    logs = []
    for extras in ([], [(files["extra"], 0.7), files["mine"]]):
        klora = _quiet(lambda: KLoRA(pipe, files["content"], files["style"], pattern="s", extra_loras=extras))
        _generate(pipe, steps=7)
        logs.append(klora.selection_log())
        klora.detach()
    without, with_extras = logs
    assert [entry["scale"] for entry in with_extras.pop("extra_loras")] == [0.7, 1.0]
    assert with_extras == without
    steps = without["generations"][0]["steps"]
    assert any(a["choices"] != b["choices"] for a, b in zip(steps, steps[1:]))  # layers did switch


def test_fused_switches_rewrite_from_w0_plus_the_extras_and_detach_restores_w0(pipe, stack):
    files, layers = stack
    unet = pipe.unet
    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    w0 = base_weights(unet)
    klora = _quiet(lambda: KLoRA(pipe, files["content"], files["style"], pattern="s",
                                 extra_loras=[(files["extra"], 0.7)]))

    def expected(path, role):
        weight = w0[path].double() + 0.7 * delta(layers["extra"][path]) if path in layers["extra"] else \
            w0[path].double()
        return weight + delta(layers[role][path]) if role else weight

    _generate(pipe, steps=6)
    last = klora.selection_log()["generations"][-1]["steps"][-1]["choices"]
    modules = dict(unet.named_modules())
    for path in layers["content"]:
        role = last.get(path) or klora.only.get(path)
        got = modules[path].weight.double()
        torch.testing.assert_close(got, expected(path, role), rtol=0, atol=2e-6)
    after_one = {name: p.detach().clone() for name, p in unet.named_parameters()}
    for steps in (5, 9, 6):  # switches back and forth, other schedules, then the first run again
        _generate(pipe, steps=steps)
    assert all(torch.equal(p, after_one[name]) for name, p in unet.named_parameters()), "a switch drifted"
    klora.set_method("merge")
    klora.set_method("klora")
    _generate(pipe, steps=6)
    assert all(torch.equal(p, after_one[name]) for name, p in unet.named_parameters())
    klora.detach()
    assert all(torch.equal(p, before[name]) for name, p in unet.named_parameters())


def test_extra_lora_files_are_checked_like_the_pair(pipe, stack, tmp_path, tiny_flux_dir):
    files, layers = stack
    broken = dict(layers["extra"])
    path = next(iter(broken))
    A, B, alpha = broken[path]
    broken[path] = (A, torch.full_like(B, float("nan")), alpha)
    write_peft(tmp_path / "nan.safetensors", broken)
    with pytest.raises(LoRAError, match=r"^extra LoRA 2 '.*nan.safetensors': tensor .* contains NaN"):
        KLoRA(pipe, files["content"], files["style"], extra_loras=[files["extra"], tmp_path / "nan.safetensors"])
    from diffusers import FluxTransformer2DModel

    flux = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    write_peft(tmp_path / "flux.safetensors", random_layers(flux, ["transformer_blocks.0.attn.to_q"], rank=2),
               prefix="transformer")
    with pytest.raises(LoRAError, match=r"^extra LoRA 1 '.*flux.safetensors': none of its 1 layers exist in this "
                                           r"UNet2DConditionModel"):
        _quiet(lambda: KLoRA(pipe, files["content"], files["style"], extra_loras=[tmp_path / "flux.safetensors"]))
    with pytest.raises(KLoRAError, match=r"extra_loras scale must be a finite number other than 0"):
        KLoRA(pipe, files["content"], files["style"], extra_loras=[(files["extra"], 0)])
    with pytest.raises(KLoRAError, match=r"extra_2 LoRA was given.*one denoiser"):
        KLoRA(pipe, files["content"], files["style"], extra_loras_2=[files["extra"]])
    assert not hasattr(pipe.unet, "peft_config") or not pipe.unet.peft_config  # nothing half-attached


# --- the user's own LoRAs ------------------------------------------------------------------


def _adapter_state(unet) -> dict:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: (list(m.active_adapters), dict(m.scaling), bool(m.merged))
            for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}


@pytest.mark.parametrize("switching", SWITCHING)
@pytest.mark.parametrize("user_fused", [False, True], ids=["user-adapter", "user-fused"])
def test_the_users_own_lora_stays_as_set_and_is_as_before_after_detach(pipe, stack, tiny_sdxl_dir, switching,
                                                                       user_fused):
    files, _ = stack
    _quiet(lambda: pipe.load_lora_weights(str(files["mine"]), adapter_name="mine"))
    pipe.set_adapters(["mine"], [0.7])
    if user_fused:
        pipe.fuse_lora(adapter_names=["mine"])
    state = _adapter_state(pipe.unet)
    weights = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
    alone = _generate(pipe)

    klora = _quiet(lambda: KLoRA(pipe, files["content"], files["style"], method="content", switching=switching))
    assert klora.switching == switching
    got = _generate(pipe)
    expected = _plain_diffusers(tiny_sdxl_dir, files, {"mine": 0.7, "content": 1.0})
    assert np.abs(expected - _plain_diffusers(tiny_sdxl_dir, files, {"content": 1.0})).max() > 1e-3
    assert np.abs(got - expected).max() < 1e-5
    klora.set_method("klora")
    _generate(pipe, steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        klora.detach()
    assert not caught, [str(w.message) for w in caught]  # PEFT's "... was active which is now deleted" included

    assert _adapter_state(pipe.unet) == state
    assert all(torch.equal(p, weights[name]) for name, p in pipe.unet.named_parameters())
    assert np.array_equal(_generate(pipe), alone)


def test_a_fused_user_lora_stays_fused_under_adapter_switching(pipe, stack):
    """PEFT skips every adapter of a layer a LoRA is merged into, and loading another adapter unmerges it by
    subtraction: K-LoRA marks such layers unmerged while attached, with the fused LoRA off (it is in the
    weight), and never touches the weight."""
    files, layers = stack
    _quiet(lambda: pipe.load_lora_weights(str(files["mine"]), adapter_name="mine"))
    pipe.fuse_lora(adapter_names=["mine"])
    merged = base_weights(pipe.unet)  # W0 + mine, as fused
    modules = dict(pipe.unet.named_modules())
    path = next(p for p in layers["mine"] if p in layers["style"])
    klora = _quiet(lambda: KLoRA(pipe, files["content"], files["style"], method="style", switching="adapters"))
    assert modules[path].active_adapters == ["klora_style"] and not modules[path].merged
    _generate(pipe, steps=3)
    assert all(torch.equal(modules[p].base_layer.weight, merged[p]) for p in layers["mine"])
    klora.detach()
    assert modules[path].merged_adapters == ["mine"] and modules[path].active_adapters == ["mine"]
    assert all(torch.equal(modules[p].base_layer.weight, merged[p]) for p in layers["mine"])


# --- strengths -----------------------------------------------------------------------------


@pytest.mark.parametrize("switching", SWITCHING)
def test_strengths_scale_what_a_lora_applies_and_not_the_choice(pipe, stack, switching):
    files, layers = stack
    before = base_weights(pipe.unet)
    plain = _quiet(lambda: KLoRA(pipe, files["content"], files["style"], pattern="s", switching=switching))
    _generate(pipe, steps=7)
    reference = plain.selection_log()
    plain.detach()

    klora = _quiet(lambda: KLoRA(pipe, files["content"], files["style"], pattern="s", switching=switching,
                                 content_scale=0.5, style_scale=1.7))
    _generate(pipe, steps=7)
    log = klora.selection_log()
    assert (log["content_scale"], log["style_scale"]) == (0.5, 1.7)
    assert [s["choices"] for s in log["generations"][0]["steps"]] == \
        [s["choices"] for s in reference["generations"][0]["steps"]]  # the choice does not move
    # ... because S_c and gamma scale alike: S_c by 0.5, S_s by 1.7, gamma by 0.5 / 1.7.
    assert log["gamma"] == pytest.approx(reference["gamma"] * 0.5 / 1.7, rel=1e-5)
    for key, stats in log["layers"].items():
        assert stats["content_topk_sum"] == pytest.approx(0.5 * reference["layers"][key]["content_topk_sum"], rel=1e-5)
        assert stats["style_topk_sum"] == pytest.approx(1.7 * reference["layers"][key]["style_topk_sum"], rel=1e-5)
    for role, strength in (("content", 0.5), ("style", 1.7)):
        klora.set_method(role)
        for path in list(layers[role])[::7]:
            got = applied_delta(pipe.unet, path, before, fusion.adapter_name(role) if switching == "adapters" else None)
            torch.testing.assert_close(got, strength * delta(layers[role][path]), rtol=1e-5, atol=1e-7)
    klora.detach()
    with pytest.raises(KLoRAError, match="style_scale must be a finite number other than 0"):
        KLoRA(pipe, files["content"], files["style"], style_scale=0.0)


# --- from the command line, the notebook API and Wan 2.2's two experts ------------------------


def _run(script_main, argv, capsys):
    from klora import cli

    code = cli.run(script_main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_command_line_extra_loras_and_strengths_equal_the_library(pipe, stack, tiny_sdxl_dir, tmp_path, capsys):
    import json

    from PIL import Image

    import inference_sd

    files, _ = stack
    argv = ["--pretrained_model_name_or_path", tiny_sdxl_dir, "--lora_name_or_path_content", str(files["content"]),
            "--lora_name_or_path_style", str(files["style"]), "--prompt", "a sbu dog in szn style",
            "--num_inference_steps", "4", "--height", "64", "--width", "64", "--device", "cpu", "--pattern", "s",
            "--extra_lora", str(files["extra"]), "--extra_lora_scale", "0.7", "--extra_lora", str(files["mine"]),
            "--content_scale", "0.8", "--output_folder", str(tmp_path / "out"),
            "--selection_log", str(tmp_path / "log.json")]
    code, out, err = _run(inference_sd.main, argv, capsys)
    assert code == 0, err
    assert "content scale 0.8, style scale 1, 2 extra LoRA(s) always on" in out
    log = json.loads((tmp_path / "log.json").read_text())
    assert [(e["scale"], e["file"].split("'")[1]) for e in log["extra_loras"]] == \
        [(0.7, str(files["extra"])), (1.0, str(files["mine"]))]
    written = np.asarray(Image.open(tmp_path / "out" / "klora-s_seed0.png"), dtype=np.int16)

    klora = _quiet(lambda: KLoRA(pipe, files["content"], files["style"], pattern="s", content_scale=0.8,
                                 extra_loras=[(files["extra"], 0.7), files["mine"]]))
    image = pipe("a sbu dog in szn style", num_inference_steps=4, height=64, width=64, guidance_scale=5.0,
                 generator=torch.Generator("cpu").manual_seed(0)).images[0]
    klora.detach()
    assert np.abs(np.asarray(image, dtype=np.int16) - written).max() <= 1


@pytest.mark.parametrize("extra, message", [
    (["--extra_lora_scale", "0.5"], "--extra_lora_scale given 1 times for 0 --extra_lora"),
    (["--content_scale", "0"], "--content_scale 0.0: must be a finite number other than 0"),
    (["--extra_lora", "{extra}", "--extra_lora_scale", "nan"], "--extra_lora_scale nan: must be a finite number"),
    (["--extra_lora", "{broken}"], "extra LoRA 1 '{broken}': tensor"),
])
def test_command_line_stack_mistakes_are_one_line(stack, tiny_sdxl_dir, tmp_path, capsys, extra, message):
    import inference_sd

    files, layers = stack
    broken = {p: (A, B * float("inf"), alpha) for p, (A, B, alpha) in list(layers["extra"].items())[:2]}
    write_peft(tmp_path / "broken.safetensors", broken)
    names = {"extra": str(files["extra"]), "broken": str(tmp_path / "broken.safetensors")}
    argv = ["--pretrained_model_name_or_path", tiny_sdxl_dir, "--lora_name_or_path_content", str(files["content"]),
            "--lora_name_or_path_style", str(files["style"]), "--prompt", "p", "--device", "cpu",
            "--output_folder", str(tmp_path / "out"), *[a.format(**names) for a in extra]]
    code, out, err = _run(inference_sd.main, argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and message.format(**names) in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_insert_klora_takes_extra_loras_and_strengths(pipe, stack):
    from utils import insert_klora, remove_klora

    files, layers = stack
    before = base_weights(pipe.unet)
    klora = _quiet(lambda: insert_klora(pipe, files["content"], files["style"], method="style", style_scale=0.5,
                                        extra_loras=[(files["extra"], -0.4)]))
    path = next(p for p in layers["style"] if p in layers["extra"])
    torch.testing.assert_close(applied_delta(pipe.unet, path, before),
                               0.5 * delta(layers["style"][path]) - 0.4 * delta(layers["extra"][path]),
                               rtol=1e-5, atol=1e-7)
    assert klora.extra_scales == {"extra1": -0.4}
    remove_klora(pipe)
    assert all(torch.equal(w, before[p]) for p, w in base_weights(pipe.unet).items())


def test_four_steps_on_wan22_with_a_speed_lora_per_expert(video_dir, tmp_path):
    """lightx2v-style runs: 4 steps, 2 per expert, a HIGH/LOW speed LoRA pair always on. The schedule is
    p = 0, 0.25, 0.5, 0.75 across both experts, and the log and the map show it."""
    from diffusers import DiffusionPipeline

    from klora import selection_map
    from video_lora_files import write_wan_peft

    pipe = DiffusionPipeline.from_pretrained(video_dir("wan22"))
    pipe.set_progress_bar_config(disable=True)
    experts = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    attention = [p for p, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)
                 and re.search(r"^blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", p)]
    content = random_layers(pipe.transformer, attention, rank=4, alpha=4.0, seed=1, scale=0.1)
    style = random_layers(pipe.transformer, attention, rank=4, alpha=4.0, seed=2, scale=0.12)
    speed = {"high": random_layers(pipe.transformer, attention[::2], rank=2, alpha=2.0, seed=3, scale=0.1),
             "low": random_layers(pipe.transformer, attention[1::2], rank=2, alpha=2.0, seed=4, scale=0.1)}
    for name, value in (("c", content), ("s", style), ("high", speed["high"]), ("low", speed["low"])):
        write_wan_peft(tmp_path / f"{name}.safetensors", value)
    w0 = {c: base_weights(d) for c, d in experts.items()}
    klora = _quiet(lambda: KLoRA(pipe, tmp_path / "c.safetensors", tmp_path / "s.safetensors", pattern="s",
                                 extra_loras=[tmp_path / "high.safetensors"],
                                 extra_loras_2=[(tmp_path / "low.safetensors", 0.5)]))
    pipe("a sbu cat", num_inference_steps=4, guidance_scale=5.0, height=16, width=16, num_frames=5,
         output_type="np", generator=torch.Generator().manual_seed(0))
    log = klora.selection_log()
    steps = log["generations"][-1]["steps"]
    assert [(s["step"], s["progress"], s["component"]) for s in steps] == [
        (0, 0.0, "transformer"), (1, 0.25, "transformer"), (2, 0.5, "transformer_2"), (3, 0.75, "transformer_2")]
    assert [s["scale"] for s in steps] == pytest.approx([0.5, 0.875, 1.25, 1.625])
    assert [e["second_expert"] for e in log["extra_loras"]] == [False, True]
    drawn = selection_map.layout(log)  # the map: one column per step, one panel per expert
    assert [column[0] for column in drawn.columns] == [0, 1, 2, 3]
    assert [panel.component for panel in drawn.panels] == ["transformer", "transformer_2"]
    assert [{key.split(".")[0] for key in column} for column in drawn.choices] == \
        [{"transformer"}, {"transformer"}, {"transformer_2"}, {"transformer_2"}]
    # Each expert carries its own speed LoRA on top of W0 wherever the choice leaves it.
    for component, extra, scale in (("transformer", speed["high"], 1.0), ("transformer_2", speed["low"], 0.5)):
        modules = dict(experts[component].named_modules())
        last = next(s["choices"] for s in reversed(steps) if s["component"] == component)
        for path in attention:
            want = w0[component][path].double() + delta((content if last[f"{component}.{path}"] == "content"
                                                         else style)[path])
            if path in extra:
                want = want + scale * delta(extra[path])
            torch.testing.assert_close(modules[path].weight.double(), want, rtol=0, atol=2e-6)
    klora.detach()
    assert all(torch.equal(w, w0[c][p]) for c, d in experts.items() for p, w in base_weights(d).items())
