"""Tiny offline models: real diffusers classes with random weights.

They exist so that the demo and the tests run the exact loading code a real
model goes through (``save_pretrained`` here, ``from_pretrained`` there) on a
machine without a model hub. Their images are noise; they check the plumbing,
not image quality.
"""

from __future__ import annotations

import os

import torch

# A byte-level BPE vocabulary needs every single character the prompts may
# contain; printable ASCII with the "</w>" word-end variants is enough for the
# prompts the demo and the tests use (unknown characters map to <|endoftext|>).
_CHARS = [chr(c) for c in range(33, 127)]


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _CHARS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>",
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>", model_max_length=77)


def _clip_config(vocab_size: int, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                          projection_dim=projection_dim, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, hidden_act="gelu")


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, norm_num_groups=8, sample_size=32)


def build_tiny_sdxl(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny Stable Diffusion XL pipeline to ``folder`` and return the path.

    The UNet has the layout of SDXL (a plain down block, then attention blocks
    with 1 and 2 transformer layers, two text encoders, added time embeddings)
    at a size that runs a 64x64 image in a few tens of milliseconds per step.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 48), layers_per_block=1, sample_size=8,
        in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8,
    )
    tokenizer = clip_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_clip_config(len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(len(tokenizer)))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed + 2), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler,
    )
    pipe.save_pretrained(folder)
    return str(folder)


def build_tiny_sd(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny Stable Diffusion 1.x-style pipeline (one text encoder) to ``folder``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
        in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    tokenizer = clip_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_clip_config(len(tokenizer)))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=_vae(seed + 2), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return str(folder)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(ch, -2.0) for ch in _CHARS]
    pieces += [("\u2581" + ch, -1.5) for ch in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_tiny_flux(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny FLUX.1 pipeline (2 double and 2 single blocks) to ``folder``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    )
    clip_tok = clip_tokenizer()
    t5_tokenizer = _t5_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_clip_config(len(clip_tok)))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37,
                                             num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=32,
                        use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                        text_encoder=text_encoder, tokenizer=clip_tok,
                        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer,
                        transformer=transformer)
    pipe.save_pretrained(folder)
    return str(folder)


def write_demo_loras(denoiser, folder: str | os.PathLike, rank: int = 8, seed: int = 0) -> tuple[str, str]:
    """Two synthetic rank-``rank`` LoRAs on every attention projection of ``denoiser``.

    Their magnitudes drift in opposite directions through the network, so the
    K-LoRA selection map shows both LoRAs winning somewhere. Written in the
    current diffusers format (``<prefix>.<module>.lora_A.weight``, alpha in
    the metadata), i.e. what ``save_lora_weights`` produces.
    """
    import json
    import re

    from safetensors.torch import save_file

    prefix = "unet" if "UNet" in type(denoiser).__name__ else "transformer"
    names = [n for n, m in denoiser.named_modules()
             if isinstance(m, torch.nn.Linear) and re.search(r"\.(to_q|to_k|to_v|to_out\.0)$", n)]
    modules = dict(denoiser.named_modules())
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for role, tilt in (("content", 1.0), ("style", -1.0)):
        tensors = {}
        for i, name in enumerate(names):
            linear = modules[name]
            depth = i / max(1, len(names) - 1) - 0.5
            strength = 0.05 * (1.0 + 0.8 * tilt * depth)
            tensors[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=gen) * strength
            tensors[f"{prefix}.{name}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=gen) * strength
        config = {f"{prefix}.r": rank, f"{prefix}.lora_alpha": rank, f"{prefix}.target_modules": names}
        path = os.path.join(folder, f"demo_{role}_lora.safetensors")
        save_file(tensors, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
        paths.append(path)
    return paths[0], paths[1]


def build_demo(folder: str | os.PathLike, family: str = "unet") -> tuple[str, str, str]:
    """What every ``--demo`` needs: a tiny SDXL (``family='unet'``) or FLUX
    (``'transformer'``) pipeline and two demo LoRAs for it, written to ``folder``.
    Returns (model folder, content LoRA, style LoRA)."""
    if family == "unet":
        from diffusers import UNet2DConditionModel as Denoiser

        model = build_tiny_sdxl(os.path.join(folder, "tiny-sdxl"))
    else:
        from diffusers import FluxTransformer2DModel as Denoiser

        model = build_tiny_flux(os.path.join(folder, "tiny-flux"))
    denoiser = Denoiser.from_pretrained(model, subfolder=family)
    content, style = write_demo_loras(denoiser, folder)
    return model, content, style
