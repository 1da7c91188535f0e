"""inference_video.py as a user runs it, on tiny video models built in code (Wan 2.1/2.2 and others)."""

from __future__ import annotations

import json

import imageio
import numpy as np
import pytest
from PIL import Image

import inference_video
from klora import video
from klora.tiny_video import build_tiny_video, write_demo_video_loras
from test_inference import check_log_against_files, expected_choices, one_error, rule_from_files, spy_on_calls
from test_inference import run as run_main


def run(argv, capsys, monkeypatch):
    return run_main(argv, capsys, monkeypatch, main=inference_video.main)


@pytest.fixture(scope="session")
def tiny_videos(tmp_path_factory):
    """{key: model folder}, built once, on demand."""
    built = {}

    def get(key):
        if key not in built:
            built[key] = build_tiny_video(key, tmp_path_factory.mktemp(f"tiny-video-{key}") / "model")
        return built[key]

    return get


@pytest.fixture(scope="session")
def wan_loras(tiny_videos, tmp_path_factory):
    """Two pairs of LoRAs for the tiny Wan: (content, style) and a different (content_2, style_2)."""
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(tiny_videos("wan22"), subfolder="transformer")
    first, second = tmp_path_factory.mktemp("wan-loras"), tmp_path_factory.mktemp("wan-loras-2")
    return (*write_demo_video_loras(transformer, first, rank=8, seed=0),
            *write_demo_video_loras(transformer, second, rank=4, seed=7))


def wan_args(tiny_videos, wan_loras, out, key="wan22", steps=8, frames=5):
    return ["--pretrained_model_name_or_path", tiny_videos(key), "--lora_name_or_path_content", wan_loras[0],
            "--lora_name_or_path_style", wan_loras[1], "--prompt", "a sbu dog in szn style",
            "--num_inference_steps", steps, "--height", 16, "--width", 16, "--num_frames", frames,
            "--max_sequence_length", 16, "--device", "cpu", "--output_folder", out]


def mp4_frames(path):
    with imageio.get_reader(str(path), format="FFMPEG") as reader:
        return [frame for frame in reader], reader.get_meta_data()


def expert_of_each_step(model, steps):
    """Which Wan 2.2 expert runs each step: t >= boundary_ratio * T, from a fresh scheduler."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler.from_pretrained(model, subfolder="scheduler")
    scheduler.set_timesteps(steps)
    boundary = json.loads(open(f"{model}/model_index.json").read())["boundary_ratio"] * 1000
    return ["transformer" if float(t) >= boundary else "transformer_2" for t in scheduler.timesteps]


def test_demo_writes_an_mp4_the_map_and_a_two_expert_log(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    code, stdout, err = run(["--demo", "--num_frames", 9, "--output_folder", out], capsys, monkeypatch)
    assert code == 0, err
    assert "clip is noise" in stdout and "K-LoRA on Wan (WanPipeline)" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["klora-sstar_seed0.mp4", "klora-sstar_seed0_selection.png",
                                                     "selection_log.json"]
    frames, meta = mp4_frames(out / "klora-sstar_seed0.mp4")
    assert len(frames) == 9 and frames[0].shape == (16, 16, 3) and meta["fps"] == 16 and meta["codec"] == "h264"
    assert Image.open(out / "klora-sstar_seed0_selection.png").size[0] > 100
    log = json.loads((out / "selection_log.json").read_text())
    assert log["denoisers"] == ["transformer", "transformer_2"]
    assert set(log["gamma"]) == {"transformer", "transformer_2"}
    steps = log["generations"][0]["steps"]
    assert [s["component"] for s in steps] == ["transformer"] * 4 + ["transformer_2"] * 4
    assert all(key.startswith(s["component"] + ".") for s in steps for key in s["choices"])


def test_second_expert_loras_follow_their_own_files(tiny_videos, wan_loras, tmp_path, capsys, monkeypatch):
    """HIGH/LOW pairs: transformer's layers follow the first files, transformer_2's the _2 files."""
    out = tmp_path / "out"
    argv = wan_args(tiny_videos, wan_loras, out) + [
        "--lora_name_or_path_content_2", wan_loras[2], "--lora_name_or_path_style_2", wan_loras[3],
        "--pattern", "s", "--selection_log", out / "log.json"]
    code, stdout, err = run(argv, capsys, monkeypatch)
    assert code == 0, err
    log = json.loads((out / "log.json").read_text())
    high, gamma_high = rule_from_files(wan_loras[0], wan_loras[1], "transformer.")
    low, gamma_low = rule_from_files(wan_loras[2], wan_loras[3], "transformer_2.")
    assert log["gamma"] == pytest.approx({"transformer": gamma_high, "transformer_2": gamma_low}, rel=1e-5)
    assert gamma_high != pytest.approx(gamma_low, rel=1e-3)
    assert log["layers"].keys() == high.keys() | low.keys()
    for key, (k, s_c, s_s) in {**high, **low}.items():
        assert (log["layers"][key]["k"], log["layers"][key]["content_topk_sum"], log["layers"][key]["style_topk_sum"]) \
            == (k, pytest.approx(s_c, rel=1e-5), pytest.approx(s_s, rel=1e-5))
    assert {k for k in log["layers"] if log["layers"][k]["k"] == 64} == set(high)  # rank 8 x 8 vs 4 x 4
    (generation,) = log["generations"]
    experts = expert_of_each_step(tiny_videos("wan22"), 8)
    assert [s["component"] for s in generation["steps"]] == experts
    seen = set()
    for entry in generation["steps"]:
        p = entry["step"] / 8
        stats, gamma = (high, gamma_high) if entry["component"] == "transformer" else (low, gamma_low)
        assert entry["progress"] == pytest.approx(p)  # the whole run's step / steps, across the switch
        assert entry["choices"] == expected_choices(stats, gamma, p, pattern="s")
        seen |= set(entry["choices"].values())
    assert seen == {"content", "style"}
    frames, _ = mp4_frames(out / "klora-s_seed0.mp4")
    assert len(frames) == 5


def test_one_file_pair_goes_into_both_experts_and_save_frames(tiny_videos, wan_loras, tmp_path, capsys, monkeypatch):
    from diffusers import WanPipeline

    calls = spy_on_calls(monkeypatch, WanPipeline)
    out = tmp_path / "out"
    code, stdout, err = run(wan_args(tiny_videos, wan_loras, out) + [
        "--save_frames", "--fps", 12, "--guidance_scale_2", 3, "--seeds", 4, "--selection_log", out / "log.json"],
        capsys, monkeypatch)
    assert code == 0, err
    assert calls[0]["guidance_scale_2"] == 3.0 and "fps" not in calls[0]  # Wan takes no frame rate
    folder = out / "klora-sstar_seed4_frames"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["0000.png", "0001.png", "0002.png", "0003.png", "0004.png"]
    frames, meta = mp4_frames(out / "klora-sstar_seed4.mp4")
    assert meta["fps"] == 12 and len(frames) == len(names)
    pngs = [np.asarray(Image.open(folder / name)) for name in names]
    # The MP4 is lossy; its frames are the PNG frames up to compression noise.
    assert all(np.abs(f.astype(int) - p.astype(int)).mean() < 40 for f, p in zip(frames, pngs))
    log = json.loads((out / "log.json").read_text())
    for component in ("transformer", "transformer_2"):
        stats, gamma = rule_from_files(wan_loras[0], wan_loras[1], f"{component}.")
        assert log["gamma"][component] == pytest.approx(gamma, rel=1e-5)
        assert {k: v for k, v in log["layers"].items() if k.startswith(component + ".")}.keys() == stats.keys()
    # --overwrite replaces the frames folder as a whole.
    (folder / "9999.png").write_bytes(b"stale")
    code, _, err = run(wan_args(tiny_videos, wan_loras, out) + ["--save_frames", "--seeds", 4, "--overwrite"],
                       capsys, monkeypatch)
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == names
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_one_expert_wan21_matches_the_image_log_format(tiny_videos, wan_loras, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, _, err = run(wan_args(tiny_videos, wan_loras, out, key="wan21", steps=4)
                       + ["--selection_log", out / "log.json"], capsys, monkeypatch)
    assert code == 0, err
    log = json.loads((out / "log.json").read_text())
    assert "denoisers" not in log and isinstance(log["gamma"], float)
    stats, gamma = rule_from_files(wan_loras[0], wan_loras[1])
    check_log_against_files(log, stats, gamma, steps=4)


def test_default_frame_rates_come_from_the_pipeline_or_the_table(tiny_videos):
    from diffusers import DiffusionPipeline

    assert video.default_fps(DiffusionPipeline.from_pretrained(tiny_videos("wan22")), "Wan") == 16
    assert video.default_fps(DiffusionPipeline.from_pretrained(tiny_videos("ltx-video")), "LTX-Video") == 25
    assert video.default_fps(DiffusionPipeline.from_pretrained(tiny_videos("cogvideox")), "CogVideoX") == 8


BAD = {
    "Wan LoRA on HunyuanVideo": (["@model", "hunyuanvideo", "--num_frames", 5],
                                 "this LoRA is for Wan; the model is HunyuanVideo"),
    "Wan frames not 4k+1": (["--num_frames", 6], "--num_frames 6: Wan takes 4k + 1 frames (e.g. 5 or 9)"),
    "LTX frames not 8k+1": (["@model", "ltx-video", "--num_frames", 5], "LTX-Video takes 8k + 1 frames"),
    "CogVideoX frames not 8k+1": (["@model", "cogvideox", "--num_frames", 13], "CogVideoX takes 8k + 1 frames"),
    "AnimateDiff too many frames": (["@model", "animatediff", "--num_frames", 33], "at most 32 frames"),
    "_2 LoRA on one expert": (["@model", "wan21", "--lora_name_or_path_style_2", "@style"],
                              "has one denoiser; the _2 LoRAs are for the second"),
    "guidance_scale_2 on one expert": (["@model", "wan21", "--guidance_scale_2", 3],
                                       "WanPipeline: `guidance_scale_2` is only supported"),
    "image model": (["@image-model"], "a image model: use inference.py"),
    "image to a text-to-video model": (["--image", "@style"], "--image: WanPipeline does not take 'image'"),
    "demo with a _2 LoRA": (["--demo", "--lora_name_or_path_content_2", "@style"],
                            "drop --lora_name_or_path_content_2"),
    "bad fps": (["--fps", 0], "--fps 0"),
    "zero frames": (["--num_frames", 0], "--num_frames 0: must be at least 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_no_files(case, tiny_videos, wan_loras, tiny_sdxl_dir, tmp_path, capsys,
                                                   monkeypatch):
    extra, message = BAD[case]
    out = tmp_path / "out"
    argv = wan_args(tiny_videos, wan_loras, out)
    extra = list(extra)
    if extra[0] == "@model":
        key = extra[1]
        argv[argv.index("--pretrained_model_name_or_path") + 1] = tiny_videos(key)
        if key == "animatediff":  # SD 1.5-style LoRAs for its UNet
            from diffusers import UNetMotionModel

            unet = UNetMotionModel.from_pretrained(tiny_videos(key), subfolder="unet")
            content, style = write_demo_video_loras(unet, tmp_path, prefix="unet")
            argv[argv.index("--lora_name_or_path_content") + 1] = content
            argv[argv.index("--lora_name_or_path_style") + 1] = style
            at = argv.index("--max_sequence_length")
            del argv[at:at + 2]  # AnimateDiff takes no max_sequence_length
        extra = extra[2:]
    elif extra[0] == "@image-model":
        argv[argv.index("--pretrained_model_name_or_path") + 1] = tiny_sdxl_dir
        extra = extra[1:]
    if "--demo" in extra:
        argv = ["--output_folder", out]
    argv += [wan_loras[1] if item == "@style" else item for item in extra]
    # A later --num_frames wins over wan_args' 5 (argparse keeps the last).
    code, _, err = run(argv, capsys, monkeypatch)
    assert message in one_error(code, err), err
    assert not out.exists() or not list(out.iterdir())
