"""The three other methods on the command line: NP-LoRA's exported file read by diffusers alone,
EST-LoRA's --beta auto against DINO recomputed here, and one-line refusals."""

import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

import inference_sd
from klora import cli
from klora import world, world_eval


class Run:
    """One command-line run in this process, through the script's own entry point (``cli.run``)."""

    def __init__(self, capsys, *argv):
        self.returncode = cli.run(inference_sd.main, list(argv))
        self.stdout, self.stderr = capsys.readouterr()


def _image(path):
    return np.asarray(Image.open(path), dtype=np.float64)


def _world_pipe():
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(world_eval.MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("method, mu", [("np", "0.5"), ("np", "inf"), ("merge", "0.5")])
def test_exported_lora_loaded_by_diffusers_alone_gives_the_same_picture(tmp_path, capsys, method, mu):
    exported = tmp_path / "fused.safetensors"
    result = Run(capsys, "--demo", "--method", method, "--np_mu", mu, "--export_lora", str(exported),
                        "--output_folder", str(tmp_path / "out"), "--num_inference_steps", "20")
    assert result.returncode == 0, result.stderr
    ours = _image(tmp_path / "out" / f"{method}_seed0.png")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(exported.stat().st_mode) == 0o666 & ~umask  # not the temporary file's private mode
    from safetensors import safe_open

    with safe_open(str(exported), "pt") as f:
        metadata = f.metadata()
    assert metadata["klora_method"] == method
    assert "sbu.safetensors" in metadata["klora_content"] and "szn.safetensors" in metadata["klora_style"]
    assert json.loads(metadata["klora_np_mu"]) == (float(mu) if method == "np" else 0.0)

    pipe = _world_pipe()
    pipe.load_lora_weights(str(exported))  # diffusers alone, no K-LoRA code
    image = pipe(world.FUSED_PROMPT, num_inference_steps=20, generator=torch.Generator("cpu").manual_seed(0),
                 height=32, width=32).images[0]
    theirs = np.asarray(image, dtype=np.float64)
    assert np.abs(ours - theirs).max() <= 2, np.abs(ours - theirs).max()  # 8-bit rounding of float32 noise
    pipe.unload_lora_weights()
    plain = np.asarray(pipe(world.FUSED_PROMPT, num_inference_steps=20, height=32, width=32,
                            generator=torch.Generator("cpu").manual_seed(0)).images[0], dtype=np.float64)
    assert np.abs(ours - plain).mean() > 5  # the file does something


def test_beta_auto_is_one_minus_the_dino_cosine_of_content_and_style_pictures(tmp_path, capsys, tiny_dino):
    dino = tiny_dino
    log = tmp_path / "log.json"
    args = ("--demo", "--seeds", "3", "--num_inference_steps", "12", "--alpha", "2.0", "--pattern", "s")
    result = Run(capsys, *args, "--method", "est", "--beta", "auto", "--dino_model", str(dino),
                        "--selection_log", str(log), "--output_folder", str(tmp_path / "est"))
    assert result.returncode == 0, result.stderr
    for role in ("content", "style"):  # the two pictures, made by the command line as a user would
        done = Run(capsys, *args, "--method", role, "--output_folder", str(tmp_path / role))
        assert done.returncode == 0, done.stderr

    from transformers import ViTModel

    model = ViTModel.from_pretrained(dino, add_pooling_layer=False).eval()
    embeddings = []
    for role in ("content", "style"):  # the processor's arithmetic written out: resize, 1/255, (x - 0.5) / 0.5
        picture = Image.open(tmp_path / role / f"{role}_seed3.png").convert("RGB").resize((32, 32), Image.BILINEAR)
        x = torch.tensor(np.asarray(picture), dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
        with torch.no_grad():
            embeddings.append(model(pixel_values=(x - 0.5) / 0.5).last_hidden_state[0, 0].double())
    cosine = float(torch.nn.functional.cosine_similarity(embeddings[0], embeddings[1], dim=0))
    written = json.loads(log.read_text())
    assert written["method"] == "est" and written["alpha"] == 2.0 and written["pattern"] == "s"  # kept
    assert written["beta"] == pytest.approx(1 - cosine, abs=1e-5)
    assert written["beta_auto"]["seed"] == 3 and written["beta_auto"]["dino_model"] == str(dino)
    assert f"= {1 - cosine:.4f}" in result.stdout
    assert 0 < written["beta"] < 2


@pytest.mark.parametrize("args, message", [
    (("--method", "klora", "--beta", "auto"), "--beta auto is EST-LoRA's style discrepancy: use it with --method est"),
    (("--method", "est", "--beta", "-0.5"), "--beta must be a finite number >= 0, got -0.5"),
    (("--method", "est", "--beta", "lots"), "must be a number >= 0 or 'auto', got 'lots'"),
    (("--method", "np", "--np_mu", "-1"), "--np_mu must be a number >= 0 or inf"),
    (("--method", "switch", "--switch_every", "0"), "--switch_every must be a whole number of steps >= 1"),
    (("--method", "klora", "--export_lora", "x.safetensors"), "--export_lora writes a static merge: use it with "
                                                               "--method np or merge, not klora"),
    (("--method", "np", "--export_lora", "x.pt"), "--export_lora 'x.pt': the file name must end in .safetensors"),
    (("--method", "est", "--beta", "auto", "--dino_model", "/nonexistent/dino"), "--dino_model '/nonexistent/dino'"),
])
def test_bad_method_arguments_are_one_line_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    try:
        code = cli.run(inference_sd.main, ["--demo", *args, "--output_folder", str(tmp_path / "out")])
    except SystemExit as exc:  # argparse refuses a malformed number itself
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_existing_export_is_not_overwritten(tmp_path, capsys):
    exported = tmp_path / "fused.safetensors"
    exported.write_bytes(b"keep me")
    result = Run(capsys, "--demo", "--method", "np", "--export_lora", str(exported),
                        "--output_folder", str(tmp_path / "out"))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert exported.read_bytes() == b"keep me"
