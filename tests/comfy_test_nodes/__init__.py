"""Test-only ComfyUI nodes: tiny stand-ins for what the K-LoRA server tests cannot load at test size.

The server tests link this folder into ``<base>/custom_nodes/`` next to the K-LoRA pack. Its nodes
replace, in a workflow, the loaders and text encoders whose real files are gigabytes:

- ``KLoRATestModel``: a MODEL built in-process from ComfyUI's own classes (``tests/comfy_models.py``)
  for the families ``UNETLoader`` cannot load tiny (SDXL and SD 1.5 need 320 channels, FLUX and
  Qwen-Image hard-code 3072-wide blocks). Tiny Wan files load through the real ``UNETLoader``.
- ``KLoRATestConditioning``: what ``CLIPTextEncode`` gives for a family (a context tensor, and a
  pooled vector where the family takes one), from a seed derived from the text, so that positive
  and negative prompts differ and a test can rebuild the same tensor (``conditioning``).
- ``KLoRATestVAE``: a real ``comfy.sd.VAE`` (ComfyUI's AutoencoderKL, 3-D convolutions for the
  video latents of Wan and Qwen-Image) with 32 channels and seeded weights, so that ``VAEDecode``
  and the save nodes run on the tiny latents.

Nothing here is K-LoRA, and nothing here is installed with the pack (it lives under ``tests/``).
"""

from __future__ import annotations

import math
import sys
import zlib
from pathlib import Path

import torch

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import comfy_models as cm  # noqa: E402

# family -> (comfy_models family, unet_config overrides, (tokens, context width), pooled width or None).
# FLUX's latent has 16 channels in ComfyUI (its latent format), so the tiny FLUX takes 16.
FAMILIES = {
    "sdxl": ("sdxl", {}, (6, 48), 32),
    "flux": ("flux", {"in_channels": 16, "out_channels": 16}, (5, 32), 32),
    "qwen_image": ("qwen_image", {}, (5, 24), None),
    "wan": (None, {}, (5, 4096), None),  # Wan's text context is 4096 wide whatever the model's dim
}
# family -> (latent channels, video latent): what the test VAE decodes.
VAE_LATENTS = {"sdxl": (4, False), "flux": (16, False), "qwen_image": (16, True), "wan": (16, True)}


def model(family: str, seed: int):
    """The ModelPatcher ``KLoRATestModel`` outputs (same family and seed: same weights)."""
    name, overrides, _, _ = FAMILIES[family]
    if name is None:
        raise ValueError(f"{family}: load it with UNETLoader (a tiny file), not KLoRATestModel")
    return cm.build(name, seed=seed, unet_overrides=overrides).patcher


def conditioning(family: str, text: str):
    """The CONDITIONING ``KLoRATestConditioning`` outputs for ``text``."""
    _, _, (tokens, width), pooled = FAMILIES[family]
    generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    extra = {}
    context = torch.randn(1, tokens, width, generator=generator)
    if pooled is not None:
        extra["pooled_output"] = torch.randn(1, pooled, generator=generator)
    return [[context, extra]]


def vae(family: str, seed: int = 0):
    """A tiny real ``comfy.sd.VAE`` that decodes the latents of ``family`` 8x larger."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    channels, video = VAE_LATENTS[family]
    ddconfig = {"double_z": True, "z_channels": channels, "resolution": 64, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    if video:
        ddconfig.update(conv3d=True, time_compress=4)
    config = {"params": {"ddconfig": ddconfig, "embed_dim": channels}}
    weights = AutoencoderKL(**config["params"]).state_dict()
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in weights.items():  # ComfyUI's layers skip initialisation
        if tensor.dim() >= 2:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(math.prod(tensor.shape[1:])))
        elif "norm" in name and name.endswith("weight"):
            tensor.fill_(1.0)
        else:
            tensor.zero_()
    return comfy.sd.VAE(sd=weights, config=config)


class KLoRATestModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": ([f for f, row in FAMILIES.items() if row[0]],),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing/K-LoRA"

    def load(self, family, seed):
        return (model(family, seed),)


class KLoRATestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(FAMILIES),), "text": ("STRING", {"multiline": True, "default": ""})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing/K-LoRA"

    def encode(self, family, text):
        return (conditioning(family, text),)


class KLoRATestVAE:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(VAE_LATENTS),)}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "testing/K-LoRA"

    def load(self, family):
        return (vae(family),)


NODE_CLASS_MAPPINGS = {"KLoRATestModel": KLoRATestModel, "KLoRATestConditioning": KLoRATestConditioning,
                       "KLoRATestVAE": KLoRATestVAE}
