"""inference_sd.py as a user runs it: the README's demo, real-style runs, every bad input."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import inference_sd
from conftest import run_script
from klora import cli
from lora_files import attention_linears, random_layers, write_peft


def _run(argv, capsys):
    """In-process run through the same entry point as the script; (exit code, stdout, stderr)."""
    code = cli.run(inference_sd.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def base_args(tiny_sdxl_dir, demo_sdxl_loras, tmp_path):
    content, style = demo_sdxl_loras
    return ["--pretrained_model_name_or_path", tiny_sdxl_dir, "--lora_name_or_path_content", content,
            "--lora_name_or_path_style", style, "--prompt", "a sbu dog in szn style",
            "--num_inference_steps", "3", "--height", "64", "--width", "64", "--device", "cpu",
            "--output_folder", str(tmp_path / "out")]


@pytest.mark.slow
def test_readme_demo_command(tmp_path):
    """The world's demo: its model's own size, the world's step count, its prompt and LoRAs."""
    from klora import world_eval

    result = run_script("inference_sd.py", "--demo", "--overwrite", "--output_folder", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    assert "the sbu toy" in result.stdout and "noise" not in result.stdout and "docs/world.md" in result.stdout
    written = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert written == ["klora-sstar_seed0.png", "klora-sstar_seed0_selection.png", "selection_log.json"]
    assert Image.open(tmp_path / "demo" / "klora-sstar_seed0.png").size == (32, 32)
    log = json.loads((tmp_path / "demo" / "selection_log.json").read_text())
    assert len(log["generations"][0]["steps"]) == world_eval.STEPS
    assert "sbu.safetensors" in log["content"] and "szn.safetensors" in log["style"]
    assert "Traceback" not in result.stderr


def test_run_writes_images_map_and_log(base_args, tmp_path, capsys):
    log_path = tmp_path / "log.json"
    code, out, err = _run(base_args + ["--seeds", "1", "2", "--selection_log", str(log_path), "--pattern", "s"],
                          capsys)
    assert code == 0, err
    for name in ("klora-s_seed1.png", "klora-s_seed2.png", "klora-s_seed1_selection.png"):
        assert (tmp_path / "out" / name).is_file()
        assert f"wrote {tmp_path / 'out' / name}" in out
    log = json.loads(log_path.read_text())
    assert (log["pattern"], log["alpha"], log["beta"]) == ("s", 1.5, 0.5)
    assert len(log["generations"]) == 2
    first_layer = next(iter(log["layers"]))
    assert set(log["layers"][first_layer]) == {"k", "content_topk_sum", "style_topk_sum", "content_energy",
                                               "style_energy"}
    assert log["layers"][first_layer]["k"] == 64
    steps = log["generations"][0]["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2] and steps[1]["progress"] == pytest.approx(1 / 3)
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_same_seed_gives_same_file_and_methods_differ(base_args, tmp_path, capsys):
    images = {}
    for method in ("klora", "merge", "content", "style"):
        code, _, err = _run(base_args + ["--method", method, "--seeds", "5"], capsys)
        assert code == 0, err
        images[method] = torch.tensor(list(Image.open(tmp_path / "out" / f"{cli.method_tag(method, 's*')}_seed5.png")
                                           .getdata()))
    assert not torch.equal(images["content"], images["style"])
    assert not torch.equal(images["merge"], images["content"])
    code, _, err = _run(base_args + ["--seeds", "5", "--overwrite", "--output_folder", str(tmp_path / "again")], capsys)
    again = torch.tensor(list(Image.open(tmp_path / "again" / "klora-sstar_seed5.png").getdata()))
    assert torch.equal(again, images["klora"])


def test_sd15_base_model_works(tiny_sd_dir, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    paths = attention_linears(unet)
    write_peft(tmp_path / "c.safetensors", random_layers(unet, paths, rank=4, seed=1))
    write_peft(tmp_path / "s.safetensors", random_layers(unet, paths, rank=4, seed=2))
    code, out, err = _run(["--pretrained_model_name_or_path", tiny_sd_dir,
                           "--lora_name_or_path_content", str(tmp_path / "c.safetensors"),
                           "--lora_name_or_path_style", str(tmp_path / "s.safetensors"), "--prompt", "a dog",
                           "--num_inference_steps", "2", "--height", "64", "--width", "64",
                           "--output_folder", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "klora-sstar_seed0.png").is_file()


def _bad_files(tmp_path, tiny_sd_dir, tiny_sdxl_dir):
    from diffusers import UNet2DConditionModel

    files = {}
    sd_unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    write_peft(tmp_path / "sd15.safetensors", random_layers(sd_unet, attention_linears(sd_unet), rank=4))
    files["sd15"] = tmp_path / "sd15.safetensors"
    sdxl_unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    save_file({k: v.contiguous() for k, v in list(sdxl_unet.state_dict().items())[:10]},
              str(tmp_path / "checkpoint.safetensors"))
    files["checkpoint"] = tmp_path / "checkpoint.safetensors"
    save_file({"unet.nowhere.lora_A.weight": torch.ones(2, 4), "unet.nowhere.lora_B.weight": torch.ones(4, 2)},
              str(tmp_path / "nowhere.safetensors"))
    files["nowhere"] = tmp_path / "nowhere.safetensors"
    save_file({"unet.a.lora_A.weight": torch.full((2, 4), float("inf")), "unet.a.lora_B.weight": torch.ones(4, 2)},
              str(tmp_path / "inf.safetensors"))
    files["inf"] = tmp_path / "inf.safetensors"
    data = (tmp_path / "sd15.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 100])
    files["truncated"] = tmp_path / "truncated.safetensors"
    torch.save({"x": torch.ones(1)}, tmp_path / "lora.bin")
    files["pickle"] = tmp_path / "lora.bin"
    return files


BAD_STYLE = {
    "missing": ("/no/such/lora.safetensors", "no such file or folder"),
    "hub_offline": ("nobody-here/no-such-lora", "hub could not provide"),
    "checkpoint": (None, "not a LoRA"),
    "sd15": (None, "another base model"),
    "nowhere": (None, "none of its 1 layers exist"),
    "truncated": (None, "truncated or corrupted"),
    "inf": (None, "NaN or Inf"),
    "pickle": (None, "pickle files"),
}


def test_bad_lora_files_one_line_exit_2_nothing_written(base_args, tmp_path, tiny_sd_dir, tiny_sdxl_dir, capsys):
    files = _bad_files(tmp_path, tiny_sd_dir, tiny_sdxl_dir)
    index = base_args.index("--lora_name_or_path_style") + 1
    for case, (value, message) in BAD_STYLE.items():
        argv = list(base_args)
        argv[index] = str(files[case]) if value is None else value
        code, _, err = _run(argv, capsys)
        assert code == 2, case
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0] and "style LoRA" in lines[0], (case, err)
        assert "Traceback" not in err
        assert not list((tmp_path / "out").glob("*")), case


BAD_ARGS = [
    (["--pattern", "x"], "--pattern"),
    (["--num_inference_steps", "0"], "--num_inference_steps 0"),
    (["--height", "100"], "--height 100"),
    (["--width", "-8"], "--width -8"),
    (["--alpha", "0"], "--alpha"),
    (["--seeds", "1", "--num_images", "2"], "--seeds and --num_images"),
    (["--dtype", "fp8"], "--dtype"),
]


@pytest.mark.parametrize("extra,message", BAD_ARGS)
def test_bad_arguments(base_args, extra, message, tmp_path, capsys):
    code, _, err = _run(base_args + extra, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_missing_model_and_unwritable_output(base_args, tmp_path, capsys):
    argv = list(base_args)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(tmp_path / "no-model")
    code, _, err = _run(argv, capsys)
    assert code == 2 and "no such folder" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    argv = list(base_args)
    argv[argv.index("--output_folder") + 1] = str(blocker / "sub")
    code, _, err = _run(argv, capsys)
    assert code == 2 and "--output_folder" in err and "cannot write there" in err


def test_existing_outputs_refused_unless_overwrite(base_args, tmp_path, capsys):
    assert _run(base_args, capsys)[0] == 0
    image = tmp_path / "out" / "klora-sstar_seed0.png"
    before = image.stat().st_mtime_ns
    code, _, err = _run(base_args, capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert image.stat().st_mtime_ns == before
    assert _run(base_args + ["--overwrite"], capsys)[0] == 0


def test_no_shared_layers_warns_then_runs(tiny_sdxl_dir, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    paths = attention_linears(unet)
    write_peft(tmp_path / "c.safetensors", random_layers(unet, paths[:10], rank=4, seed=1))
    write_peft(tmp_path / "s.safetensors", random_layers(unet, paths[10:], rank=4, seed=2))
    code, _, err = _run(["--pretrained_model_name_or_path", tiny_sdxl_dir,
                         "--lora_name_or_path_content", str(tmp_path / "c.safetensors"),
                         "--lora_name_or_path_style", str(tmp_path / "s.safetensors"), "--prompt", "a dog",
                         "--num_inference_steps", "2", "--height", "64", "--width", "64",
                         "--output_folder", str(tmp_path / "out")], capsys)
    assert code == 0
    assert "warning: K-LoRA: the content and style LoRAs adapt no layer in common" in err


@pytest.mark.slow
def test_user_error_from_a_real_process_has_no_traceback(base_args, tmp_path):
    argv = list(base_args)
    argv[argv.index("--lora_name_or_path_content") + 1] = str(tmp_path / "missing.safetensors")
    result = run_script("inference_sd.py", *argv)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: content LoRA")
    assert "Traceback" not in result.stderr
    result = run_script("inference_sd.py", "--pattern", "q")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_demo_keeps_an_explicit_step_count(tmp_path, capsys):
    """The demo sets the world's step count only when none is asked for on the command line."""
    from klora import world_eval

    code, _, err = _run(["--demo", "--num_inference_steps", "7", "--output_folder", str(tmp_path)], capsys)
    assert code == 0, err
    log = json.loads((tmp_path / "selection_log.json").read_text())
    assert log["generations"][0]["num_inference_steps"] == 7
    code, _, err = _run(["--demo", "--overwrite", "--output_folder", str(tmp_path)], capsys)
    steps = json.loads((tmp_path / "selection_log.json").read_text())["generations"][0]["num_inference_steps"]
    assert steps == world_eval.STEPS


def test_a_transformer_model_is_refused_with_a_pointer_to_inference_py(base_args, tmp_path, capsys):
    from klora.tiny import build_tiny

    argv = list(base_args)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = build_tiny("sd3", tmp_path / "sd3")
    code, _, err = _run(argv, capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Stable Diffusion 3 (StableDiffusion3Pipeline), not a Stable Diffusion UNet model: use inference.py" in line
    assert not list((tmp_path / "out").glob("*"))


def test_size_defaults_to_the_models_own(base_args, tiny_sdxl_dir, tmp_path, capsys):
    """No --height/--width: the model's own size (UNet sample size x VAE factor), not a fixed 1024."""
    argv = list(base_args)
    for flag in ("--height", "--width"):
        del argv[argv.index(flag):argv.index(flag) + 2]
    code, _, err = _run(argv + ["--method", "content"], capsys)
    assert code == 0, err
    unet = json.loads((Path(tiny_sdxl_dir) / "unet" / "config.json").read_text())
    vae = json.loads((Path(tiny_sdxl_dir) / "vae" / "config.json").read_text())
    side = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    assert Image.open(tmp_path / "out" / "content_seed0.png").size == (side, side)


def test_outputs_get_the_permissions_a_plain_open_gives(tmp_path):
    """Atomic writes go through a private temporary file; the image must not stay private after the rename."""
    import os
    import stat

    result = run_script("inference_sd.py", "--demo", "--output_folder", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
