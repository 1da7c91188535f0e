"""Shared fixtures: tiny pipelines written once per test session, loaded like real ones."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Tiny models gain nothing from threads; on a busy 2-core machine extra threads only contend
# (a 2-step tiny SDXL call measured 9.3 s with 2 threads under load, 0.3 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def pipe(tiny_sdxl_dir):
    """A fresh tiny SDXL pipeline (random weights, real diffusers classes), loaded from its folder."""
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory) -> str:
    """A folder with a tiny ViT (random weights) and its image processor: a DINO model for ``klora.dino``."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("tiny-dino")
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                      resample=2).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    from klora.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> str:
    from klora.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> str:
    from klora.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="session")
def demo_sdxl_loras(tiny_sdxl_dir, tmp_path_factory) -> tuple[str, str]:
    """(content, style) synthetic rank-8 LoRAs for the tiny SDXL, diffusers format."""
    from diffusers import UNet2DConditionModel

    from klora.tiny import write_demo_loras

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    return write_demo_loras(unet, tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory):
    """key -> folder of that tiny video pipeline (klora.tiny_video), built once per session when first asked for."""
    from klora.tiny_video import build_tiny_video

    root = tmp_path_factory.mktemp("tiny-video")
    built = {}

    def folder(key):
        if key not in built:
            built[key] = build_tiny_video(key, root / key)
        return built[key]

    return folder


def run_script(script: str, *args: str, cwd=None, timeout: int = 300):
    """Run one of the top-level scripts as a user would; returns CompletedProcess."""
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
