"""Tiny models of every family, built in-process from ComfyUI's own classes, and how to sample them.

Nothing here is K-LoRA: it is the harness the ComfyUI tests stand on. ``comfyui()`` puts the
checkout named by ``COMFYUI_PATH`` on ``sys.path`` (set to CPU first); ``build(family)`` makes a
``comfy.supported_models.<Family>`` model with small widths, initialises every weight from a seed
(ComfyUI skips initialisation) and wraps it in a real ``ModelPatcher``; ``sample`` runs
``comfy.sample.sample`` under inference mode with conditioning tensors made directly (the text
encoders have fixed, large configs).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

ENV = "COMFYUI_PATH"
HOW_TO_RUN = (f"set {ENV} to a ComfyUI checkout (0.3.64 tested) and run with a Python that has ComfyUI's "
              "requirements (torch + torchvision), e.g. COMFYUI_PATH=/path/to/ComfyUI python -m pytest "
              "tests/test_comfyui*.py (see docs/comfyui.md)")


def why_not_available() -> str | None:
    """None when ComfyUI can be imported here, else the reason (a skip message that says how to run)."""
    path = os.environ.get(ENV)
    if not path:
        return f"{ENV} is not set: {HOW_TO_RUN}"
    if not (Path(path) / "comfy" / "model_patcher.py").is_file():
        return f"{ENV}={path} is not a ComfyUI checkout: {HOW_TO_RUN}"
    try:
        import torchvision  # noqa: F401  (comfy.model_base imports it)
    except Exception as exc:  # a torchvision that does not match torch fails with RuntimeError too
        return f"this Python cannot import torchvision ({type(exc).__name__}), which ComfyUI needs: {HOW_TO_RUN}"
    return None


def checkout() -> Path:
    """The ComfyUI checkout ``COMFYUI_PATH`` names."""
    return Path(os.environ[ENV]).resolve()


def comfyui():
    """Import ComfyUI in this process on the CPU; returns the ``comfy`` package."""
    path = str(checkout())
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    return comfy


@dataclass
class Tiny:
    """A tiny model: its patcher, the latent shape it samples and the conditioning it takes."""

    family: str
    patcher: object
    latent_shape: tuple
    context: tuple  # (tokens, width) of the text conditioning
    extra: dict = field(default_factory=dict)  # pooled_output, guidance, ...
    cfg: float = 2.0

    @property
    def model(self):
        return self.patcher.model


# family -> (supported_models class name, unet_config, latent shape, context (tokens, width), extra cond widths)
FAMILIES = {
    "sd15": ("SD15", dict(
        in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
        transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
        num_heads=2, num_head_channels=-1, context_dim=32,
        use_linear_in_transformer=False, use_temporal_attention=False, use_temporal_resblock=False,
        adm_in_channels=None, image_size=32, use_spatial_transformer=True, legacy=False,
        ), (1, 4, 8, 8), (6, 32), {}),
    "sdxl": ("SDXL", dict(
        in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
        transformer_depth=[0, 2], transformer_depth_output=[0, 0, 2, 2], transformer_depth_middle=1,
        num_heads=-1, num_head_channels=16, context_dim=48,
        use_linear_in_transformer=True, use_temporal_attention=False, use_temporal_resblock=False,
        adm_in_channels=32 + 6 * 256, num_classes="sequential", image_size=32, use_spatial_transformer=True, legacy=False,
        ), (1, 4, 8, 8), (6, 48), {"pooled_output": 32, "width": 64, "height": 64}),
    "flux": ("Flux", dict(
        image_model="flux", in_channels=4, out_channels=4, patch_size=2, vec_in_dim=32, context_in_dim=32,
        hidden_size=32, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 4, 8],
        theta=10000, qkv_bias=True, guidance_embed=True,
        ), (1, 4, 8, 8), (5, 32), {"pooled_output": 32, "guidance": 3.5}),
    "sd3": ("SD3", dict(
        in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=32,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 48, "out_features": 128}},
        num_patches=64, pos_embed_max_size=8, qk_norm="rms", pos_embed_scaling_factor=None,
        ), (1, 16, 8, 8), (5, 48), {"pooled_output": 32}),
    "qwen_image": ("QwenImage", dict(
        image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(8, 4, 4),
        ), (1, 16, 1, 8, 8), (5, 24), {}),
    "wan21": ("WAN21_T2V", dict(
        image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=32, ffn_dim=64,
        freq_dim=32, text_dim=24, out_dim=16, num_heads=1, num_layers=2, eps=1e-6, window_size=(-1, -1),
        qk_norm=True, cross_attn_norm=True,
        ), (1, 16, 2, 8, 8), (5, 24), {}),
    "hunyuan_video": ("HunyuanVideo", dict(
        image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2], vec_in_dim=24,
        context_in_dim=24, hidden_size=32, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
        axes_dim=[4, 4, 8], theta=256, qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False,
        ), (1, 16, 2, 4, 4), (5, 24), {"pooled_output": 24, "guidance": 6.0}),
    "ltxv": ("LTXV", dict(
        image_model="ltxv", in_channels=128, cross_attention_dim=32, attention_head_dim=16,
        num_attention_heads=2, caption_channels=24, num_layers=2,
        ), (1, 128, 2, 2, 2), (5, 24), {"attention_mask": None}),
}


def build(family: str, seed: int = 0, config_class: str | None = None, dtype=torch.float32,
          unet_overrides: dict | None = None) -> Tiny:
    """A tiny ``family`` model (``FAMILIES``) in a fresh ``ModelPatcher``, every weight seeded.
    ``unet_overrides``: entries of its unet_config to change (e.g. FLUX's channels for a 16-channel latent)."""
    comfy = comfyui()
    class_name, unet_config, latent_shape, context, extra = FAMILIES[family]
    model_config = getattr(comfy.supported_models, config_class or class_name)({**unet_config, **(unet_overrides or {})})
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    init_weights(model, seed)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    return Tiny(family, patcher, latent_shape, context, dict(extra))


def init_weights(model, seed: int) -> None:
    """Every parameter and buffer of the denoiser from one seed: weights ~ N(0, 1/fan_in), norms ~1, biases
    and buffers small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.diffusion_model.named_parameters():
            if parameter.dim() >= 2:
                fan_in = math.prod(parameter.shape[1:])
                parameter.copy_(torch.randn(parameter.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith(("norm.weight", "scale", "norm_q.weight", "norm_k.weight")) or ".norm" in name:
                parameter.copy_(1.0 + 0.1 * torch.randn(parameter.shape, generator=gen))
            else:
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=gen))
        for name, buffer in model.diffusion_model.named_buffers():  # SD3's pos_embed is torch.empty
            if buffer.is_floating_point():
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=gen))


def conditioning(tiny: Tiny, seed: int):
    """(positive, negative) conditioning lists as ComfyUI's samplers take them."""
    gen = torch.Generator().manual_seed(seed)
    tokens, width = tiny.context
    out = []
    for _ in range(2):
        extra = {}
        for name, value in tiny.extra.items():
            if name == "pooled_output":
                extra[name] = torch.randn(1, value, generator=gen)
            elif name == "attention_mask":
                extra[name] = torch.ones(1, tokens, dtype=torch.long)
            else:
                extra[name] = value
        out.append([[torch.randn(1, tokens, width, generator=gen), extra]])
    return out[0], out[1]


def sample(tiny: Tiny, patcher=None, *, seed: int = 0, steps: int = 4, sampler: str = "euler",
           scheduler: str = "simple", cfg: float | None = None, denoise: float = 1.0, start_step=None,
           last_step=None, latent=None, force_full_denoise=False, disable_noise=False):
    """A latent from ``comfy.sample.sample``, as KSampler / KSamplerAdvanced call it."""
    comfy = comfyui()
    patcher = patcher if patcher is not None else tiny.patcher
    positive, negative = conditioning(tiny, 1234)
    latent = torch.zeros(tiny.latent_shape) if latent is None else latent
    if disable_noise:
        noise = torch.zeros(latent.shape)
    else:
        noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, steps, tiny.cfg if cfg is None else cfg, sampler, scheduler,
                                   positive, negative, latent, denoise=denoise, start_step=start_step,
                                   last_step=last_step, force_full_denoise=force_full_denoise,
                                   disable_pbar=True, seed=seed)


def weights(patcher) -> dict[str, torch.Tensor]:
    """A copy of every denoiser weight as it is now in the model."""
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items() if k.startswith("diffusion_model.")}
