"""Tiny offline video pipelines: build, reload, generate, Wan 2.2 expert routing, demo LoRAs, MP4 export."""

import json

import numpy as np
import pytest
import torch

from klora.tiny_video import (TINY_VIDEO_BUILDERS, TINY_VIDEO_CALL_KWARGS, TINY_VIDEO_SIZES, attention_projections,
                              build_tiny_video, write_demo_video_loras)

FAMILIES = list(TINY_VIDEO_BUILDERS)

# Written from the diffusers sources, independently of klora.tiny_video: the pipeline class a
# folder reloads as, its denoiser components, and denoiser calls per step with CFG on.
EXPECTED = {
    "wan21": ("WanPipeline", ("transformer",), 2),
    "wan22": ("WanPipeline", ("transformer", "transformer_2"), 2),
    "hunyuanvideo": ("HunyuanVideoPipeline", ("transformer",), 1),  # guidance-distilled
    "ltx-video": ("LTXPipeline", ("transformer",), 1),  # uncond + cond in one batch
    "cogvideox": ("CogVideoXPipeline", ("transformer",), 1),
    "animatediff": ("AnimateDiffPipeline", ("unet",), 1),
}


def _load(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, key, steps=2, seed=0):
    height, width, num_frames = TINY_VIDEO_SIZES[key]
    return pipe("a sbu cat in szn style", num_inference_steps=steps, guidance_scale=5.0, height=height,
                width=width, num_frames=num_frames, generator=torch.Generator().manual_seed(seed),
                output_type="np", **TINY_VIDEO_CALL_KWARGS[key]).frames


def _record_calls(pipe, components):
    """Forward pre-hooks on the denoisers; each call appends (component, timestep tensor)."""
    calls, handles = [], []
    for name in components:
        def hook(module, args, kwargs, name=name):
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]  # the UNet gets it positionally
            calls.append((name, torch.as_tensor(timestep).clone()))

        handles.append(getattr(pipe, name).register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles


@pytest.mark.parametrize("key", FAMILIES)
def test_builds_reloads_and_generates_deterministically(video_dir, key):
    pipe = _load(video_dir(key))
    class_name, components, calls_per_step = EXPECTED[key]
    assert type(pipe).__name__ == class_name
    calls, handles = _record_calls(pipe, components)

    frames = _generate(pipe, key, steps=3)
    height, width, num_frames = TINY_VIDEO_SIZES[key]
    assert frames.shape == (1, num_frames, height, width, 3)
    assert np.isfinite(frames).all() and frames.min() >= 0.0 and frames.max() <= 1.0

    # Every step calls the denoiser calls_per_step times, with that step's scheduler timestep.
    timesteps = pipe.scheduler.timesteps
    assert len(timesteps) == 3 and len(calls) == 3 * calls_per_step
    for i, (_, timestep) in enumerate(calls):
        assert torch.all(timestep.float() == timesteps[i // calls_per_step].float())

    for handle in handles:
        handle.remove()
    assert np.array_equal(_generate(pipe, key, steps=3), frames)
    assert not np.allclose(_generate(pipe, key, steps=3, seed=1), frames)


def test_builder_seed_fixes_the_weights(tmp_path):
    from diffusers import WanTransformer3DModel

    def weights(seed, name):
        folder = build_tiny_video("wan21", tmp_path / name, seed=seed)
        return WanTransformer3DModel.from_pretrained(folder, subfolder="transformer").state_dict()

    first, again, other = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_wan22_routes_steps_to_both_experts_by_the_boundary(video_dir):
    pipe = _load(video_dir("wan22"))
    assert pipe.config.boundary_ratio == 0.875
    high, low = pipe.transformer.state_dict(), pipe.transformer_2.state_dict()
    assert not all(torch.equal(high[k], low[k]) for k in high), "the two experts must differ"
    calls, _ = _record_calls(pipe, ("transformer", "transformer_2"))

    _generate(pipe, "wan22", steps=8)

    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    high_steps = [t for t in pipe.scheduler.timesteps if t >= boundary]
    expected = ["transformer"] * 2 * len(high_steps) + ["transformer_2"] * 2 * (8 - len(high_steps))
    assert [name for name, _ in calls] == expected
    assert 3 <= len(high_steps) <= 5, "each expert should run several of the 8 steps"


# Steps per expert (high, low) for 8 steps, from the table in PIPELINES_FACTS.md section 2.
@pytest.mark.parametrize("options, split", [
    ({"flow_shift": 3.0}, (3, 5)),
    ({"flow_shift": 12.0}, (6, 2)),
    ({"flow_shift": 5.0, "boundary_ratio": 0.9}, (3, 5)),
])
def test_wan22_options_move_the_expert_split(tmp_path, options, split):
    pipe = _load(build_tiny_video("wan22", tmp_path / "wan22", **options))
    calls, _ = _record_calls(pipe, ("transformer", "transformer_2"))

    _generate(pipe, "wan22", steps=8)

    names = [name for name, _ in calls]
    assert (names.count("transformer") // 2, names.count("transformer_2") // 2) == split


@pytest.mark.parametrize("key", FAMILIES)
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # the second adapter, on purpose
def test_demo_loras_load_with_the_family_loader(video_dir, tmp_path, key):
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    pipe = _load(video_dir(key))
    prefix = EXPECTED[key][1][0]
    denoiser = getattr(pipe, prefix)
    content, style = write_demo_video_loras(denoiser, tmp_path, prefix=prefix)
    names = attention_projections(denoiser)
    assert names

    # File format: diffusers keys, r / alpha / targets in the metadata; content and style
    # updates tilted in opposite directions through depth, so each is larger somewhere.
    norms = {}
    for role, path in (("content", content), ("style", style)):
        with safe_open(path, "pt") as f:
            config = json.loads(f.metadata()["lora_adapter_metadata"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert config == {f"{prefix}.r": 8, f"{prefix}.lora_alpha": 8, f"{prefix}.target_modules": names}
        assert set(tensors) == {f"{prefix}.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
        norms[role] = [(tensors[f"{prefix}.{n}.lora_B.weight"] @ tensors[f"{prefix}.{n}.lora_A.weight"]).norm()
                       for n in names]
    log_ratio = [float(torch.log(c / s)) for c, s in zip(norms["content"], norms["style"])]
    half = len(log_ratio) // 2
    assert np.mean(log_ratio[:half]) < -0.3 and np.mean(log_ratio[-half:]) > 0.3

    before = _generate(pipe, key)
    pipe.load_lora_weights(content, adapter_name="content")
    pipe.load_lora_weights(style, adapter_name="style")
    loaded = [prefix]
    if key == "wan22":
        pipe.load_lora_weights(content, adapter_name="content", load_into_transformer_2=True)
        pipe.load_lora_weights(style, adapter_name="style", load_into_transformer_2=True)
        loaded.append("transformer_2")
    assert pipe.get_list_adapters() == {c: ["content", "style"] for c in loaded}
    for component in loaded:
        modules = dict(getattr(pipe, component).named_modules())
        for name in names:
            assert isinstance(modules[name], LoraLayer), f"{component}.{name}"
            assert set(modules[name].lora_A) == {"content", "style"}
    pipe.set_adapters("content")
    assert not np.allclose(_generate(pipe, key), before, atol=1e-4)


def test_animatediff_loras_skip_the_motion_modules(video_dir):
    pipe = _load(video_dir("animatediff"))
    names = attention_projections(pipe.unet)
    motion = [n for n, m in pipe.unet.named_modules()
              if isinstance(m, torch.nn.Linear) and ".motion_modules." in n and n.endswith(".to_q")]
    assert motion, "the UNetMotionModel should have temporal attention"
    assert not any("motion_modules" in n for n in names)
    assert any(".attn1.to_q" in n for n in names) and any(".attn2.to_k" in n for n in names)


def test_unknown_family_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny video family 'sora'.*wan22"):
        build_tiny_video("sora", tmp_path)


@pytest.mark.parametrize("key", FAMILIES)
def test_export_to_video_writes_an_h264_mp4_with_every_frame(video_dir, tmp_path, key):
    iio = pytest.importorskip("imageio.v3")
    pytest.importorskip("imageio_ffmpeg")
    import imageio
    from diffusers.utils import export_to_video

    frames = _generate(_load(video_dir(key)), key)[0]
    path = export_to_video(frames, str(tmp_path / "video.mp4"), fps=8)

    height, width, num_frames = TINY_VIDEO_SIZES[key]
    assert iio.imread(path).shape == (num_frames, height, width, 3)
    assert iio.immeta(path)["codec"] == "h264"
    with imageio.get_reader(path) as reader:
        assert sum(1 for _ in reader) == num_frames
