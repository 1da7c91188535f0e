"""inference.py as a user runs it, on tiny image models of several families built in code.

The selection log is checked against the K-LoRA rule recomputed here from the LoRA
files (float64, top-K sums and gamma straight from the written tensors), not
against the library's own numbers.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import inference
from klora import cli
from klora.errors import KLoRAError
from klora.tiny import build_tiny, write_demo_loras

# Per family: extra flags every run needs (short text sequences, the tiny models' CFG options), size.
FAMILIES = {
    "sdxl": ([], 64),
    "sd3": (["--max_sequence_length", "16"], 32),
    "qwen-image": (["--max_sequence_length", "32"], 32),
    "z-image": (["--max_sequence_length", "64", "--call_arg", "cfg_normalization=false",
                 "--call_arg", "cfg_truncation=1.0"], 32),
}


@pytest.fixture(scope="session")
def tiny_image_models(tmp_path_factory):
    """{family: (model folder, content LoRA, style LoRA)}, built once, on demand."""
    built = {}

    def get(family):
        if family not in built:
            import diffusers

            from klora.pipelines import family_for_model

            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            model = build_tiny(family, folder / "model")
            component = family_for_model(model)[0].denoisers[0]
            config = json.loads((folder / "model" / component / "config.json").read_text())
            denoiser = getattr(diffusers, config["_class_name"]).from_pretrained(model, subfolder=component)
            built[family] = (model, *write_demo_loras(denoiser, folder))
        return built[family]

    return get


def run(argv, capsys, monkeypatch, main=inference.main):
    """``cli.run(main)`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # cli.run replaces it; undo after
    try:
        code = cli.run(main, [str(a) for a in argv])
    except SystemExit as exit_:  # argparse usage errors exit from inside parse_args
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def model_args(models, family, out, steps=4, size=True):
    model, content, style = models(family)
    extra, side = FAMILIES[family]
    argv = ["--pretrained_model_name_or_path", model, "--lora_name_or_path_content", content,
            "--lora_name_or_path_style", style, "--prompt", "a sbu dog in szn style", "--device", "cpu",
            "--output_folder", out, *extra]
    if steps is not None:
        argv += ["--num_inference_steps", steps]
    if size:
        argv += ["--height", side, "--width", side]
    return argv


def one_error(code, err) -> str:
    """The run failed as a user mistake: exit 2, one ``error:`` line (the last), no traceback."""
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err
    return errors[0]


# --- the rule, recomputed from the files -------------------------------------------

def lora_layers(path):
    """{module path: (rank, scale * B @ A in float64)} of a diffusers-format LoRA file."""
    with safe_open(str(path), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    prefix = next(iter(tensors)).split(".")[0]
    scale = metadata[f"{prefix}.lora_alpha"] / metadata[f"{prefix}.r"]
    layers = {}
    for key, down in tensors.items():
        if key.endswith(".lora_A.weight"):
            up = tensors[key.replace(".lora_A.", ".lora_B.")]
            layers[key[len(prefix) + 1: -len(".lora_A.weight")]] = (down.shape[0], scale * up.double() @ down.double())
    return layers


def rule_from_files(content, style, key_prefix=""):
    """({log key: (k, S_c, S_s)}, gamma) for the layers both files adapt: the paper's statistics."""
    content, style = lora_layers(content), lora_layers(style)
    stats, ratios = {}, []
    for path in content.keys() & style.keys():
        (rank_c, delta_c), (rank_s, delta_s) = content[path], style[path]
        k = rank_c * rank_s
        stats[key_prefix + path] = (k, delta_c.abs().flatten().topk(k).values.sum().item(),
                                    delta_s.abs().flatten().topk(k).values.sum().item())
        ratios.append(delta_c.abs().sum().item() / delta_s.abs().sum().item())
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return stats, sum(kept) / len(kept)


def expected_choices(stats, gamma, progress, pattern="s*", alpha=1.5, beta=None):
    beta = (0.5 if pattern == "s" else 0.85 * alpha) if beta is None else beta
    scale = (alpha * progress + beta) % alpha if pattern == "s*" else alpha * progress + beta
    return {key: "content" if s_c / gamma > s_s * scale else "style" for key, (_, s_c, s_s) in stats.items()}


def check_log_against_files(log, stats, gamma, steps, pattern="s*"):
    assert log["gamma"] == pytest.approx(gamma, rel=1e-5)
    assert log["layers"].keys() == stats.keys()
    for key, (k, s_c, s_s) in stats.items():
        assert log["layers"][key]["k"] == k
        assert log["layers"][key]["content_topk_sum"] == pytest.approx(s_c, rel=1e-5)
        assert log["layers"][key]["style_topk_sum"] == pytest.approx(s_s, rel=1e-5)
    seen = set()
    for generation in log["generations"]:
        assert generation["num_inference_steps"] == steps
        assert [s["step"] for s in generation["steps"]] == list(range(steps))
        for entry in generation["steps"]:
            assert entry["progress"] == pytest.approx(entry["step"] / steps)
            assert entry["choices"] == expected_choices(stats, gamma, entry["step"] / steps, pattern), entry["step"]
            seen |= set(entry["choices"].values())
    assert seen == {"content", "style"}, "the demo LoRAs should make both sides win somewhere"


def spy_on_calls(monkeypatch, pipeline_class):
    """Record the keyword arguments of every call of ``pipeline_class`` (the signature stays visible)."""
    calls = []
    original = pipeline_class.__call__

    @functools.wraps(original)
    def recording(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", recording)
    return calls


# --- runs ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_outputs_and_log_follow_the_rule_from_the_files(family, tiny_image_models, tmp_path, capsys,
                                                                monkeypatch):
    import diffusers

    model, content, style = tiny_image_models(family)
    class_name = json.loads((Path(model) / "model_index.json").read_text())["_class_name"]
    calls = spy_on_calls(monkeypatch, getattr(diffusers, class_name))
    out = tmp_path / "out"
    extra = ["--seeds", 3, 5, "--selection_log", out / "log.json"]
    if family == "qwen-image":  # true CFG: two transformer calls per step
        extra += ["--negative_prompt", "blurry", "--true_cfg_scale", 3.0]
    code, stdout, err = run(model_args(tiny_image_models, family, out) + extra, capsys, monkeypatch)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "klora-sstar_seed3.png", "klora-sstar_seed3_selection.png", "klora-sstar_seed5.png",
        "klora-sstar_seed5_selection.png", "log.json"]
    side = FAMILIES[family][1]
    assert Image.open(out / "klora-sstar_seed3.png").size == (side, side)
    assert "K-LoRA on " in stdout and "fused switching" in stdout and "weight copies" in stdout
    stats, gamma = rule_from_files(content, style)
    check_log_against_files(json.loads((out / "log.json").read_text()), stats, gamma, steps=4)
    # Every argument reached the pipeline as given, and nothing else was added.
    assert len(calls) == 2
    expected = {"num_inference_steps": 4, "height": side, "width": side}
    expected.update({"sd3": {"max_sequence_length": 16}, "qwen-image": {"max_sequence_length": 32},
                     "z-image": {"max_sequence_length": 64, "cfg_normalization": False, "cfg_truncation": 1.0},
                     "sdxl": {}}[family])
    if family == "qwen-image":
        expected.update(negative_prompt="blurry", true_cfg_scale=3.0)
    for call in calls:
        assert {k: v for k, v in call.items() if k not in ("prompt", "generator")} == expected
    assert [c["generator"].initial_seed() for c in calls] == [3, 5]


def test_defaults_are_the_pipelines_own(tiny_image_models, tmp_path, capsys, monkeypatch):
    """No steps, guidance or size given: none is passed, and the run uses the pipeline's defaults."""
    import inspect

    from diffusers import StableDiffusionXLPipeline

    calls = spy_on_calls(monkeypatch, StableDiffusionXLPipeline)
    out = tmp_path / "out"
    code, stdout, err = run(model_args(tiny_image_models, "sdxl", out, steps=None, size=False)
                            + ["--selection_log", out / "log.json"], capsys, monkeypatch)
    assert code == 0, err
    (call,) = calls
    assert set(call) == {"prompt", "generator"}
    defaults = inspect.signature(StableDiffusionXLPipeline.__call__).parameters
    log = json.loads((out / "log.json").read_text())
    assert log["generations"][0]["num_inference_steps"] == defaults["num_inference_steps"].default == 50
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_image_models("sdxl")[0])
    side = pipe.default_sample_size * pipe.vae_scale_factor
    assert Image.open(out / "klora-sstar_seed0.png").size == (side, side)
    assert "num_inference_steps 50 (default)" in stdout and "guidance_scale 5 (default)" in stdout
    assert f"height {side} (default)" in stdout


def test_call_args_are_parsed_and_reach_the_pipeline(tiny_image_models, tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    calls = spy_on_calls(monkeypatch, StableDiffusionXLPipeline)
    code, _, err = run(model_args(tiny_image_models, "sdxl", tmp_path / "out", steps=2)
                       + ["--call_arg", "guidance_rescale=0.7", "--call_arg", "clip_skip=1",
                          "--call_arg", "prompt_2=in szn style", "--call_arg", "original_size=[64, 64]",
                          "--guidance_scale", "3"], capsys, monkeypatch)
    assert code == 0, err
    (call,) = calls
    assert call["guidance_rescale"] == 0.7 and call["clip_skip"] == 1 and call["prompt_2"] == "in szn style"
    assert call["original_size"] == (64, 64) and call["guidance_scale"] == 3.0  # a tuple, as annotated


def test_img2img_with_noise_progress_follows_the_timesteps_run(tiny_image_models, tmp_path, capsys, monkeypatch):
    """--image switches SDXL to its img2img pipeline; --progress noise gives p = 1 - t / 1000 of
    the timesteps strength 0.5 leaves, recomputed here from a fresh scheduler."""
    from diffusers import EulerDiscreteScheduler

    model = tiny_image_models("sdxl")[0]
    picture = tmp_path / "input.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(picture)
    out = tmp_path / "out"
    steps = 20
    code, stdout, err = run(model_args(tiny_image_models, "sdxl", out, steps=steps, size=False)
                            + ["--image", picture, "--strength", 0.5, "--progress", "noise",
                               "--selection_log", out / "log.json"], capsys, monkeypatch)
    assert code == 0, err
    assert "running StableDiffusionXLImg2ImgPipeline" in stdout
    assert Image.open(out / "klora-sstar_seed0.png").size == (64, 64)
    scheduler = EulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    scheduler.set_timesteps(steps)
    start = steps - int(steps * 0.5)
    run_timesteps = scheduler.timesteps[start * scheduler.order:]
    log = json.loads((out / "log.json").read_text())
    assert log["progress"] == "noise"
    (generation,) = log["generations"]
    progress = [s["progress"] for s in generation["steps"]]
    assert progress == pytest.approx([1 - float(t) / 1000 for t in run_timesteps], abs=1e-9)
    assert abs(progress[0] - 0.5) < 0.06 and len(progress) == steps // 2
    stats, gamma = rule_from_files(*tiny_image_models("sdxl")[1:])
    for entry in generation["steps"]:
        assert entry["choices"] == expected_choices(stats, gamma, entry["progress"])


def test_pipeline_class_for_image_inputs():
    import diffusers
    from types import SimpleNamespace

    def pick(name, image=None, mask=None, kind="image"):
        return cli.pipeline_class_for(getattr(diffusers, name), SimpleNamespace(image=image, mask_image=mask),
                                      kind).__name__

    assert pick("StableDiffusionXLPipeline") == "StableDiffusionXLPipeline"
    assert pick("StableDiffusionXLPipeline", "a.png") == "StableDiffusionXLImg2ImgPipeline"
    assert pick("StableDiffusionXLPipeline", "a.png", "m.png") == "StableDiffusionXLInpaintPipeline"
    assert pick("StableDiffusionXLControlNetPipeline", "a.png") == "StableDiffusionXLControlNetImg2ImgPipeline"
    assert pick("QwenImagePipeline", "a.png") == "QwenImageImg2ImgPipeline"
    assert pick("ZImagePipeline", "a.png") == "ZImageImg2ImgPipeline"
    assert pick("Flux2KleinPipeline", "a.png") == "Flux2KleinPipeline"  # takes reference images itself
    assert pick("StableDiffusionXLImg2ImgPipeline", "a.png") == "StableDiffusionXLImg2ImgPipeline"
    assert pick("WanImageToVideoPipeline", "a.png", kind="video") == "WanImageToVideoPipeline"
    with pytest.raises(KLoRAError, match="no image-to-image pipeline for Lumina2Pipeline"):
        pick("Lumina2Pipeline", "a.png")


def test_controlnet_runs_with_a_control_image_and_needs_one(tiny_image_models, tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionXLControlNetPipeline

    model = build_tiny("sdxl-controlnet", tmp_path / "controlnet")
    _, content, style = tiny_image_models("sdxl")  # the same UNet configuration
    control = tmp_path / "edges.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(control)
    base = ["--pretrained_model_name_or_path", model, "--lora_name_or_path_content", content,
            "--lora_name_or_path_style", style, "--prompt", "a dog", "--num_inference_steps", 2,
            "--height", 64, "--width", 64, "--output_folder", tmp_path / "out"]
    message = one_error(*run(base, capsys, monkeypatch)[::2])
    assert "StableDiffusionXLControlNetPipeline runs a ControlNet" in message and "--control_image" in message
    calls = spy_on_calls(monkeypatch, StableDiffusionXLControlNetPipeline)
    code, _, err = run(base + ["--control_image", control], capsys, monkeypatch)
    assert code == 0, err
    assert calls[0]["image"].size == (64, 64)  # the control image goes where this pipeline takes it
    assert (tmp_path / "out" / "klora-sstar_seed0.png").is_file()


def test_switching_progress_and_compile_reach_klora(tiny_image_models, tmp_path, capsys, monkeypatch):
    from klora.fusion import KLoRA

    compiled = []
    monkeypatch.setattr(KLoRA, "_compile", lambda self, options: compiled.append(options))
    out = tmp_path / "out"
    code, stdout, err = run(model_args(tiny_image_models, "sdxl", out, steps=2)
                            + ["--switching", "adapters", "--compile", "aot_eager", "--method", "merge",
                               "--selection_log", out / "log.json"], capsys, monkeypatch)
    assert code == 0, err
    assert compiled == [{"backend": "aot_eager"}]
    assert "adapters switching (weight copies: none)" in stdout
    log = json.loads((out / "log.json").read_text())
    assert (log["switching"], log["method"]) == ("adapters", "merge")
    assert sorted(p.name for p in out.iterdir()) == ["log.json", "merge_seed0.png"]
    code, _, err = run(model_args(tiny_image_models, "sdxl", out, steps=2) + ["--compile", "--overwrite"],
                       capsys, monkeypatch)
    assert code == 0, err and compiled[-1] == {}


def test_demo_on_another_family(tmp_path, capsys, monkeypatch):
    code, stdout, err = run(["--demo", "--demo_family", "flux2-klein", "--num_inference_steps", 3,
                             "--output_folder", tmp_path / "demo"], capsys, monkeypatch)
    assert code == 0, err
    assert "K-LoRA on FLUX.2 (Flux2KleinPipeline)" in stdout and "images are noise" in stdout
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [
        "klora-sstar_seed0.png", "klora-sstar_seed0_selection.png", "selection_log.json"]
    log = json.loads((tmp_path / "demo" / "selection_log.json").read_text())
    assert log["generations"][0]["num_inference_steps"] == 3


# --- bad input --------------------------------------------------------------------------

BAD = {
    "unknown call arg": (["--call_arg", "nonsense=1"], "--call_arg nonsense: StableDiffusionXLPipeline does not "
                                                       "take 'nonsense'"),
    "flag the family lacks": (["--true_cfg_scale", 2], "--true_cfg_scale: StableDiffusionXLPipeline does not take"),
    "strength without image": (["--strength", 0.5], "--strength: StableDiffusionXLPipeline does not take"),
    "size on img2img": (["--image", "@picture"], "--height: StableDiffusionXLImg2ImgPipeline does not take"),
    "call arg without =": (["--call_arg", "clip_skip"], "write KEY=VALUE"),
    "call arg with its own flag": (["--call_arg", "num_inference_steps=3"], "use --num_inference_steps"),
    "call arg set by the script": (["--call_arg", "generator=1"], "set by --seeds"),
    "call arg of the wrong kind": (["--call_arg", "original_size=big"], "StableDiffusionXLPipeline failed with the "
                                   "--call_arg values given (original_size): TypeError"),
    "mask without image": (["--mask_image", "@picture"], "--mask_image needs --image"),
    "missing image": (["--image", "@missing"], "no such file"),
    "not an image": (["--image", "@text"], "not an image file"),
    "bad strength": (["--strength", 1.5], "--strength 1.5"),
    "video model": (["@video"], "a video model: use inference_video.py"),
    "LoRA of another family": (["@qwen-model"], "this LoRA is for Stable Diffusion; the model is Qwen-Image"),
    "sequential offload on cpu": (["--sequential_cpu_offload"], "nothing to offload"),
    "demo family without demo": (["--demo_family", "sd3"], "add --demo"),
    "demo with a model": (["--demo"], "drop --pretrained_model_name_or_path"),
    "bad progress": (["--progress", "time"], "invalid choice"),
    "existing output": (["@existing"], "already exists"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_no_files(case, tiny_image_models, tmp_path, capsys, monkeypatch):
    extra, message = BAD[case]
    out = tmp_path / "out"
    argv = model_args(tiny_image_models, "sdxl", out, steps=2, size=case not in ("missing image", "not an image"))
    picture = tmp_path / "input.png"
    Image.new("RGB", (64, 64), "white").save(picture)
    (tmp_path / "notes.txt").write_text("not a picture")
    for item in extra:
        if item == "@video":
            from klora.tiny_video import build_tiny_video

            argv[argv.index("--pretrained_model_name_or_path") + 1] = build_tiny_video("wan21", tmp_path / "wan")
        elif item == "@qwen-model":  # with the SDXL LoRAs
            argv[argv.index("--pretrained_model_name_or_path") + 1] = tiny_image_models("qwen-image")[0]
        elif item == "@existing":
            out.mkdir()
            (out / "klora-sstar_seed0.png").write_bytes(b"mine")
        else:
            argv.append({"@picture": picture, "@missing": tmp_path / "nope.png",
                         "@text": tmp_path / "notes.txt"}.get(item, item))
    code, _, err = run(argv, capsys, monkeypatch)
    if case == "bad progress":  # argparse's own usage line
        assert code == 2 and message in err and "Traceback" not in err
    else:
        assert message in one_error(code, err), err
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == (["klora-sstar_seed0.png"] if case == "existing output" else [])
    if case == "existing output":
        assert (out / "klora-sstar_seed0.png").read_bytes() == b"mine"
