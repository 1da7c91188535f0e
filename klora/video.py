"""Video output: which frame counts a family's model takes, its frame rate, and writing the clip.

Clips are written as H.264 MP4 (yuv420p, ``+faststart``: plays in a browser) with
imageio's ffmpeg writer and the ffmpeg binary that the ``imageio-ffmpeg`` wheel
bundles, with the settings ``diffusers.utils.export_to_video`` uses (quality 5,
sides padded to a multiple of 16), plus a progress bar and an atomic rename. With
``save_frames`` the frames also go out as numbered PNGs.

What differs between families is data: ``FRAME_STEP`` (the frame counts the
VAE's time compression allows) and ``DEFAULT_FPS`` (the rate diffusers' own
examples export each family at).
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .atomic import replacing
from .errors import KLoRAError

# num_frames must be FRAME_STEP * k + 1: the VAE keeps the first frame on its own and
# packs every FRAME_STEP following frames into one latent frame (the LTX and CogVideoX
# transformers also need the latent frame count they were trained on: 8k + 1 frames).
FRAME_STEP = {"Wan": 4, "SkyReels-V2": 4, "HunyuanVideo": 4, "LTX-Video": 8, "LTX-2": 8, "CogVideoX": 8}

# Frames per second of the exported clip, as the pipelines' docstring examples export
# them. A pipeline whose __call__ takes ``frame_rate`` / ``fps`` says it itself (LTX: 25).
DEFAULT_FPS = {"Wan": 16, "SkyReels-V2": 24, "HunyuanVideo": 15, "LTX-Video": 24, "LTX-2": 24, "CogVideoX": 8,
               "AnimateDiff": 8, "AnimateDiff SDXL": 8, "Sana Video": 16, "Cosmos": 16}
FALLBACK_FPS = 16
FPS_ARGUMENTS = ("frame_rate", "fps")  # __call__ arguments through which a pipeline is told the frame rate

MP4_QUALITY = 5.0  # imageio's 0-10 scale, what export_to_video uses
MACRO_BLOCK = 16


def check_num_frames(family_name: str, num_frames: int | None, maximum: int | None = None) -> None:
    """Refuse a frame count the family's model cannot take, before anything is generated."""
    if num_frames is None:
        return
    if num_frames < 1:
        raise KLoRAError(f"--num_frames {num_frames}: must be at least 1")
    step = FRAME_STEP.get(family_name)
    if step is not None and (num_frames - 1) % step:
        below = (num_frames - 1) // step * step + 1
        options = f"{below} or {below + step}" if below >= 1 + step else f"{below + step}"
        raise KLoRAError(f"--num_frames {num_frames}: {family_name} takes {step}k + 1 frames "
                         f"(e.g. {options})")
    if maximum is not None and num_frames > maximum:
        raise KLoRAError(f"--num_frames {num_frames}: this {family_name} model makes at most {maximum} frames "
                         "(its motion modules' position table)")


def max_frames(pipe) -> int | None:
    """The most frames a pipeline's denoiser can take, where it says (AnimateDiff's motion modules)."""
    for name in ("unet", "transformer"):
        config = getattr(getattr(pipe, name, None), "config", None)
        value = getattr(config, "motion_max_seq_length", None) if config is not None else None
        if isinstance(value, int):
            return value
    return None


def default_fps(pipe, family_name: str) -> int:
    """The frame rate of the model's clips: the pipeline's own ``frame_rate`` default, else the table."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    for name in FPS_ARGUMENTS:
        if name in parameters and isinstance(parameters[name].default, (int, float)):
            return int(parameters[name].default)
    config = getattr(pipe, "config", {})
    if family_name == "Wan" and config.get("expand_timesteps"):
        return 24  # Wan 2.2 TI2V-5B makes 24 fps clips
    transformer = getattr(pipe, "transformer", None)
    if family_name == "CogVideoX" and getattr(getattr(transformer, "config", None), "patch_size_t", None):
        return 16  # CogVideoX 1.5
    return DEFAULT_FPS.get(family_name, FALLBACK_FPS)


def to_uint8(frames) -> list[np.ndarray]:
    """A pipeline's frames (float array in [0, 1], uint8 array, tensor, or PIL images) as HxWx3 uint8 arrays."""
    if hasattr(frames, "detach"):  # a torch tensor (output_type="pt"): frames x channels x H x W
        frames = frames.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    out = []
    for frame in frames:
        array = np.asarray(frame.convert("RGB") if hasattr(frame, "convert") else frame)
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        out.append(np.ascontiguousarray(array[..., :3]))
    if not out:
        raise KLoRAError("the pipeline returned no frames")
    return out


def write_mp4(frames: list[np.ndarray], path: str | os.PathLike, fps: float, progress: bool = True) -> Path:
    """Write ``frames`` (HxWx3 uint8) as an H.264 MP4, atomically (a temporary file, then a rename)."""
    import imageio
    from tqdm.auto import tqdm

    path = Path(path)
    # ffmpeg picks the container from the extension: the temporary name ends in .mp4 too.
    with replacing(path, ".mp4") as tmp:
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=MP4_QUALITY,
                                    pixelformat="yuv420p", macro_block_size=MACRO_BLOCK,
                                    output_params=["-movflags", "+faststart"], ffmpeg_log_level="error")
        with writer:
            for frame in tqdm(frames, desc=f"writing {path.name}", unit="frame", disable=not progress,
                              leave=False):
                writer.append_data(frame)
    return path


def write_frames(frames: list[np.ndarray], folder: str | os.PathLike, progress: bool = True) -> Path:
    """Write ``frames`` as ``folder/0000.png``, ``0001.png``, ...; the folder appears complete or not at all."""
    from PIL import Image
    from tqdm.auto import tqdm

    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the frames folder should not be
    try:
        for index, frame in enumerate(tqdm(frames, desc=f"writing {folder.name}/", unit="frame",
                                           disable=not progress, leave=False)):
            Image.fromarray(frame).save(tmp / f"{index:04d}.png", format="PNG")
        old = None
        if folder.exists():  # --overwrite: swap the folders, then remove the old one
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


@contextmanager
def decoding_progress(pipe, num_frames: int | None):
    """A progress bar over the VAE decoder's passes while a clip is decoded.

    The Wan VAE decodes one latent frame per pass (81 frames: 21 passes), so its bar
    has a total; other VAEs (tiled or batched decoding) show a count of passes.
    """
    import torch
    from tqdm.auto import tqdm

    vae = getattr(pipe, "vae", None)
    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, torch.nn.Module):
        yield
        return
    total = None
    temporal = getattr(pipe, "vae_scale_factor_temporal", None)
    if type(vae).__name__ == "AutoencoderKLWan" and not getattr(vae, "use_tiling", False) and num_frames \
            and isinstance(temporal, int):
        total = (num_frames - 1) // temporal + 1
    bar = None

    def count(module, args):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="decoding", unit="pass", leave=False)
        bar.update(1)

    handle = decoder.register_forward_pre_hook(count)
    try:
        yield
    finally:
        handle.remove()
        if bar is not None:
            bar.close()
