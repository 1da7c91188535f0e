"""inference_flux.py as a user runs it, on the tiny FLUX built in code."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import inference_flux
from conftest import run_script
from flux_lora_files import fused_units, write_kohya, write_xlabs
from klora import cli, flux_catalogue


@pytest.fixture(scope="module")
def flux_loras(tiny_flux_dir, tmp_path_factory):
    """(kohya content, XLabs style) files for the tiny FLUX."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    folder = tmp_path_factory.mktemp("flux-loras")
    write_kohya(folder / "subject.safetensors",
                fused_units(transformer, "kohya", rank=4, alpha=2.0, seed=21, keep=lambda n: n != "linear1"))
    write_xlabs(folder / "style.safetensors", fused_units(transformer, "xlabs", rank=8, seed=22))
    return str(folder / "subject.safetensors"), str(folder / "style.safetensors")


def run(argv, capsys, monkeypatch):
    """``cli.run(main)`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # cli.run replaces it; undo after
    try:
        code = cli.run(inference_flux.main, [str(a) for a in argv])
    except SystemExit as exit_:  # argparse usage errors exit from inside parse_args
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tiny_args(tiny_flux_dir, out, steps=3):
    return ["--pretrained_model_name_or_path", tiny_flux_dir, "--num_inference_steps", steps,
            "--height", 64, "--width", 64, "--device", "cpu", "--output_folder", out]


def test_list_prints_the_whole_catalogue(capsys, monkeypatch):
    code, out, _ = run(["--list"], capsys, monkeypatch)
    assert code == 0
    for index, entry in enumerate(flux_catalogue.SUBJECTS + flux_catalogue.STYLES):
        assert entry.repo_id in out and entry.weight_name in out and repr(entry.trigger) in out
    assert len(flux_catalogue.SUBJECTS) == 4 and len(flux_catalogue.STYLES) == 12


def fake_hub_cache(cache, repo_id, weight_name, source):
    """What the hub cache holds after a download of ``repo_id/weight_name`` (read offline)."""
    import shutil

    revision = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    shutil.copy(source, repo / "snapshots" / revision / weight_name)


def test_catalogue_indices_fetch_their_files_and_build_the_prompt(tiny_flux_dir, flux_loras, tmp_path,
                                                                   capsys, monkeypatch):
    import huggingface_hub.constants

    subject, style = flux_catalogue.SUBJECTS[0], flux_catalogue.STYLES[3]
    cache = tmp_path / "hub"
    fake_hub_cache(cache, subject.repo_id, subject.weight_name, flux_loras[0])
    fake_hub_cache(cache, style.repo_id, style.weight_name, flux_loras[1])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    out = tmp_path / "out"
    code, stdout, err = run(tiny_args(tiny_flux_dir, out) + ["--content_index", 0, "--style_index", 3,
                                                              "--selection_log", out / "log.json"],
                            capsys, monkeypatch)
    assert code == 0, err
    assert "prompt: eric cat in BluD!! style." in stdout
    log = json.loads((out / "log.json").read_text())
    assert log["content"].endswith(f"{subject.weight_name}'") and "ginipick--flux-lora-eric-cat" in log["content"]
    assert log["style"].endswith(f"{style.weight_name}'") and "maxxd4240_BlueDraw" in log["style"]
    assert (out / "klora-sstar_seed0.png").is_file()


def test_custom_loras_true_cfg_offload_and_log_match_the_library(tiny_flux_dir, flux_loras, tmp_path,
                                                                 capsys, monkeypatch):
    out = tmp_path / "out"
    argv = tiny_args(tiny_flux_dir, out) + [
        "--lora_name_or_path_content", flux_loras[0], "--lora_name_or_path_style", flux_loras[1],
        "--prompt", "a cat in a style", "--negative_prompt", "blurry", "--true_cfg_scale", 2.5,
        "--guidance_scale", 2.0, "--seeds", 3, 5, "--cpu_offload", "--selection_log", out / "log.json"]
    code, stdout, err = run(argv, capsys, monkeypatch)
    assert code == 0, err
    written = sorted(p.name for p in out.iterdir())
    assert written == ["klora-sstar_seed3.png", "klora-sstar_seed3_selection.png", "klora-sstar_seed5.png",
                       "klora-sstar_seed5_selection.png", "log.json"]
    log = json.loads((out / "log.json").read_text())
    assert [[s["progress"] for s in g["steps"]] for g in log["generations"]] == [[0.0, 1 / 3, 2 / 3]] * 2

    # The same settings through the library, without the command line.
    from diffusers import FluxPipeline

    from klora.fusion import KLoRA

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    KLoRA(pipe, flux_loras[0], flux_loras[1])
    expected = pipe("a cat in a style", negative_prompt="blurry", true_cfg_scale=2.5, guidance_scale=2.0,
                    num_inference_steps=3, height=64, width=64, generator=torch.Generator().manual_seed(5)).images[0]
    got = np.asarray(Image.open(out / "klora-sstar_seed5.png"), dtype=np.int16)
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1


def sdxl_lora(tiny_sdxl_dir, folder):
    from diffusers import UNet2DConditionModel

    from lora_files import attention_linears, random_layers, write_peft

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    path = folder / "sdxl.safetensors"
    write_peft(path, random_layers(unet, attention_linears(unet), 4))
    return path


BAD = {
    "index out of range": (["--content_index", 4, "--style_index", 0], "catalogue has 4 subjects"),
    "index and path": (["--content_index", 0, "--lora_name_or_path_content", "x.safetensors", "--style_index", 0],
                       "give one or the other"),
    "no content": (["--style_index", 0], "--lora_name_or_path_content is required"),
    "true cfg without negative": (["@loras", "--true_cfg_scale", 2], "needs --negative_prompt"),
    "negative without true cfg": (["@loras", "--negative_prompt", "blurry"], "unless --true_cfg_scale > 1"),
    "height not a multiple of 16": (["@loras", "--height", 72], "multiple of 16"),
    "sequential offload on cpu": (["@loras", "--sequential_cpu_offload"], "nothing to offload"),
    "two offloads": (["@loras", "--cpu_offload", "--sequential_cpu_offload"], "not allowed with"),
    "demo with a LoRA": (["--demo", "--content_index", 0], "drop --content_index"),
    "missing file": (["--lora_name_or_path_content", "@missing", "--style_index", 0, "--prompt", "x"],
                     "no such file"),
    "an SDXL LoRA": (["--lora_name_or_path_content", "@sdxl", "--lora_name_or_path_style", "@style",
                      "--prompt", "x"], "this LoRA is for Stable Diffusion; the model is FLUX.1"),
    "base model offline": (["--pretrained_model_name_or_path", "black-forest-labs/FLUX.1-dev", "@loras"],
                           "could not load a pipeline"),
    "catalogue LoRA offline": (["--content_index", 0, "--style_index", 0], "the hub could not provide"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_no_files(case, tiny_flux_dir, tiny_sdxl_dir, flux_loras, tmp_path,
                                                   capsys, monkeypatch):
    extra, message = BAD[case]
    places = {"@missing": str(tmp_path / "nope.safetensors"), "@style": flux_loras[1],
              "@sdxl": str(sdxl_lora(tiny_sdxl_dir, tmp_path)) if "@sdxl" in extra else None}
    argv = []
    for item in extra:
        if item == "@loras":
            argv += ["--lora_name_or_path_content", flux_loras[0], "--lora_name_or_path_style", flux_loras[1],
                     "--prompt", "x"]
        else:
            argv.append(places.get(item, item))
    out = tmp_path / "out"
    base = tiny_args(tiny_flux_dir, out)
    if "--pretrained_model_name_or_path" in argv or "--demo" in argv:
        base = base[2:]
    code, _, err = run(base + argv, capsys, monkeypatch)
    assert code == 2
    # stderr may also hold diffusers' loading progress bars; the error itself is one line, the last.
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    assert "error: " in errors[0] and message in errors[0], err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_demo_runs_as_the_readme_says(tmp_path):
    result = run_script("inference_flux.py", "--demo", "--output_folder", str(tmp_path / "demo"),
                        "--num_inference_steps", "6", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "images are noise" in result.stdout
    files = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert files == ["klora-sstar_seed0.png", "klora-sstar_seed0_selection.png", "selection_log.json"]
    log = json.loads((tmp_path / "demo" / "selection_log.json").read_text())
    assert len(log["layers"]) == 14 and len(log["generations"][-1]["steps"]) == 6
    assert all(p.startswith(("transformer_blocks.", "single_transformer_blocks.")) for p in log["layers"])
