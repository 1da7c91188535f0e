"""Tiny offline video pipelines: real diffusers classes with random weights.

The video counterpart of ``klora/tiny.py``: each builder writes a pipeline
folder that ``diffusers.DiffusionPipeline.from_pretrained(folder)`` reloads on
a machine without a model hub, small enough that a 2-4 step generation takes
well under a second on one CPU core. The frames are noise; they check the
plumbing (loading, LoRA adapters, the denoising loop, export), not quality.

What differs between the families is data at the bottom of this file:
``TINY_VIDEO_BUILDERS``, ``TINY_VIDEO_SIZES`` and ``TINY_VIDEO_CALL_KWARGS``.
"""

from __future__ import annotations

import json
import os
import re

import torch

from klora.tiny import _clip_config, _t5_tokenizer, clip_tokenizer

# The T5 hidden size every T5-conditioned denoiser below reads (Wan ``text_dim``,
# LTX ``caption_channels``, CogVideoX ``text_embed_dim``).
_T5_DIM = 32


def _t5_encoder(vocab_size: int, seed: int, umt5: bool = False):
    """A 2-layer T5 encoder; ``umt5=True`` gives the UMT5 variant Wan declares."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    torch.manual_seed(seed)
    config = config_class(vocab_size=vocab_size, d_model=_T5_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                          relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                          eos_token_id=1)
    return model_class(config).eval()


def _save(pipe, folder: str | os.PathLike) -> str:
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.save_pretrained(folder)
    return str(folder)


# --- Wan 2.1 / 2.2 ---------------------------------------------------------------

def _wan_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=16, out_channels=16, text_dim=_T5_DIM, freq_dim=256, ffn_dim=32,
                                 num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32)


def _wan_pipeline(folder, seed: int, flow_shift: float, boundary_ratio: float | None, two_experts: bool) -> str:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    tokenizer = _t5_tokenizer()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=flow_shift)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=_t5_encoder(len(tokenizer), seed + 1, umt5=True),
                       vae=vae, scheduler=scheduler, transformer=_wan_transformer(seed),
                       transformer_2=_wan_transformer(seed + 3) if two_experts else None,
                       boundary_ratio=boundary_ratio)
    return _save(pipe, folder)


def build_tiny_wan21(folder: str | os.PathLike, seed: int = 0, flow_shift: float = 3.0) -> str:
    """Write a tiny Wan 2.1 text-to-video pipeline (one 2-block transformer) to ``folder``.

    Measured on diffusers 0.42.1, 3 steps with CFG: 2 transformer calls per
    step (cond, then uncond, batch 1 each); ``timestep`` is an int64 tensor of
    shape (1,): 999, 857, 600 at shift 3 (int(1000 * sigma), the first sigma
    nudged below 1 by UniPC); ``scheduler.step_index`` is None during the
    first step's calls, then 1, 2; ``begin_index`` 0; 3 timesteps.
    ``num_frames`` = 4k + 1 (others are rounded down), height/width multiples of 16.
    """
    return _wan_pipeline(folder, seed, flow_shift, boundary_ratio=None, two_experts=False)


def build_tiny_wan22(folder: str | os.PathLike, seed: int = 0, flow_shift: float = 5.0,
                     boundary_ratio: float = 0.875) -> str:
    """Write a tiny Wan 2.2 A14B-style pipeline: two different random experts.

    ``transformer`` (high noise) denoises the steps with t >= boundary_ratio *
    1000, ``transformer_2`` (low noise) the rest, so the split follows from
    ``flow_shift``. Measured with 8 steps and boundary 0.875: shift 5 (the
    default here) gives 4/4 (t = 999, 972, 937, 893 | 833, 750, 625, 418),
    shift 3 gives 3/5, shift 12 (official T2V) 6/2. With 3 steps at shift 5:
    999, 909 | 714. Per call as Wan 2.1; ``step_index`` keeps counting across
    the switch (4, 5, ... in the low-noise expert).
    """
    return _wan_pipeline(folder, seed, flow_shift, boundary_ratio=boundary_ratio, two_experts=True)


# --- HunyuanVideo ------------------------------------------------------------------

def _llama_tokenizer():
    """A SentencePiece-style (Metaspace BPE) Llama tokenizer built in memory:
    every printable ASCII character, alone and after the word marker."""
    from transformers import LlamaTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "\u2581": 4}
    merges = []
    for code in range(33, 127):
        ch = chr(code)
        vocab[ch] = len(vocab)
        vocab["\u2581" + ch] = len(vocab)
        merges.append(("\u2581", ch))
    return LlamaTokenizerFast(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>",
                              eos_token="</s>", pad_token="<pad>")


def build_tiny_hunyuanvideo(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny HunyuanVideo pipeline (Llama + CLIP text encoders) to ``folder``.

    Guidance is distilled into the transformer (``guidance_embeds``): one call
    per step whatever ``guidance_scale``; two (cond, uncond) only with
    ``true_cfg_scale > 1`` and a ``negative_prompt``. Measured, 3 steps:
    ``timestep`` float32 (1,) = 1000, 933.3, 777.8 (shift 7); ``step_index``
    None, 1, 2; ``begin_index`` 0. ``num_frames`` = 4k + 1, sides multiples of 16.
    Call with ``TINY_VIDEO_CALL_KWARGS["hunyuanvideo"]``: the default prompt
    template crops 95 tokens the tiny tokenizer does not have.
    """
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextModel, LlamaConfig, LlamaModel

    llama_dim = 16
    tokenizer, tokenizer_2 = _llama_tokenizer(), clip_tokenizer()
    clip_config = _clip_config(len(tokenizer_2))
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=llama_dim, pooled_projection_dim=clip_config.hidden_size, rope_axes_dim=(2, 4, 4))
    torch.manual_seed(seed + 1)
    text_encoder = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=llama_dim, intermediate_size=37,
                                          num_attention_heads=4, num_hidden_layers=2, hidden_act="gelu",
                                          bos_token_id=1, eos_token_id=2, pad_token_id=3))
    text_encoder_2 = CLIPTextModel(clip_config)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True)
    pipe = HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    return _save(pipe, folder)


# --- LTX-Video ---------------------------------------------------------------------

def build_tiny_ltx_video(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny LTX-Video pipeline (two transformer blocks, T5) to ``folder``.

    CFG is batched: one call per step on a batch of 2 (uncond, cond) with
    ``timestep`` float32 (2,) = 1000, 666.7, 333.3 (3 steps, no shift);
    ``step_index`` None, 1, 2; ``begin_index`` stays None (LTX never sets it).
    Sides multiples of 32; the real model wants ``num_frames`` = 8k + 1 (this
    tiny VAE compresses time 4x, so 4k + 1 also runs).
    """
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline,
                           LTXVideoTransformer3DModel)

    tokenizer = _t5_tokenizer()
    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                             num_layers=2, caption_channels=_T5_DIM)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8,) * 4,
        decoder_block_out_channels=(8,) * 4, layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False)
    # Frame-by-frame VAE passes are a memory saving for long videos; with 8
    # channels they only add work.
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    pipe = LTXPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                       text_encoder=_t5_encoder(len(tokenizer), seed + 1), tokenizer=tokenizer)
    return _save(pipe, folder)


# --- CogVideoX ---------------------------------------------------------------------

def build_tiny_cogvideox(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny CogVideoX (1.0-style) pipeline to ``folder``.

    CFG is batched: one call per step, batch 2, ``timestep`` int64 (2,) =
    999, 666, 332 (3 steps, trailing spacing). ``CogVideoXDPMScheduler`` has
    no ``step_index`` or ``begin_index`` at all. ``num_frames`` = 8k + 1 gives
    exactly that many frames; 4k + 1 with an even number of latent frames
    comes back rounded up to a multiple of 8 (5 -> 8, 13 -> 16).
    """
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)

    tokenizer = _t5_tokenizer()
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=_T5_DIM, num_layers=2, sample_width=16, sample_height=16, sample_frames=9,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8,) * 4, latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=_t5_encoder(len(tokenizer), seed + 1), vae=vae,
                             transformer=transformer,
                             scheduler=CogVideoXDPMScheduler(timestep_spacing="trailing"))
    return _save(pipe, folder)


# --- AnimateDiff -------------------------------------------------------------------

def build_tiny_animatediff(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny AnimateDiff pipeline (SD 1.5-style UNet + MotionAdapter) to ``folder``.

    The pipeline turns the UNet into a ``UNetMotionModel`` (spatial layers of
    the image UNet, temporal "motion modules" of the adapter between them),
    which is what ``save_pretrained`` writes as ``unet``.

    CFG is batched: one UNet call per step on (2, 4, frames, h/2, w/2), the
    ``timestep`` passed positionally as an int64 scalar: 667, 334, 1 (3 DDIM
    steps, offset 1). DDIM has no ``step_index``/``begin_index``. Any
    ``num_frames`` up to ``motion_max_seq_length`` (32).
    """
    from diffusers import (AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel

    channels = (32, 64)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    torch.manual_seed(seed + 3)
    motion_adapter = MotionAdapter(block_out_channels=channels, motion_layers_per_block=1,
                                   motion_num_attention_heads=2, motion_norm_num_groups=8,
                                   motion_max_seq_length=32)
    tokenizer = clip_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_clip_config(len(tokenizer)))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    # AnimateDiff's motion modules were trained with the linear beta schedule.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                              steps_offset=1)
    pipe = AnimateDiffPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                               motion_adapter=motion_adapter, scheduler=scheduler)
    return _save(pipe, folder)


# --- Demo LoRAs --------------------------------------------------------------------

# Attention projections that LoRA trainers adapt: to_q/k/v/out in every family,
# plus the text-stream projections of dual-stream blocks (HunyuanVideo).
_ATTENTION_PROJECTION = re.compile(r"\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$")


def attention_projections(denoiser) -> list[str]:
    """Names of the attention projection linears a LoRA for ``denoiser`` adapts,
    in module order. The temporal motion modules of an AnimateDiff UNet are
    left out: an SD 1.5 LoRA adapts only the spatial layers."""
    return [name for name, module in denoiser.named_modules()
            if isinstance(module, torch.nn.Linear) and _ATTENTION_PROJECTION.search(name)
            and "motion_modules" not in name]


def write_demo_video_loras(denoiser, folder: str | os.PathLike, rank: int = 8, seed: int = 0,
                           prefix: str = "transformer") -> tuple[str, str]:
    """Two synthetic rank-``rank`` LoRAs (content, style) on the attention
    projections of a video ``denoiser``, written to ``folder``.

    The content LoRA grows stronger with depth, the style LoRA weaker, so each
    one has the larger update somewhere and a K-LoRA selection map shows both.
    The files are in the format ``save_lora_weights`` writes today:
    ``<prefix>.<module>.lora_A.weight`` keys, and r / lora_alpha /
    target_modules in the ``lora_adapter_metadata`` JSON. Use ``prefix="unet"``
    for AnimateDiff. Returns (content path, style path).
    """
    from safetensors.torch import save_file

    names = attention_projections(denoiser)
    if not names:
        raise ValueError(f"{type(denoiser).__name__} has no attention projections named "
                         f"{_ATTENTION_PROJECTION.pattern}; is it a diffusers denoiser?")
    modules = dict(denoiser.named_modules())
    generator = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for role, tilt in (("content", 1.0), ("style", -1.0)):
        tensors = {}
        for depth, name in enumerate(names):
            linear = modules[name]
            # position: depth scaled to [-1, 1]; strengths run 0.02 -> 0.08 (content)
            # and 0.08 -> 0.02 (style)
            position = 2.0 * depth / max(1, len(names) - 1) - 1.0
            strength = 0.05 * (1.0 + 0.6 * tilt * position)
            down = torch.randn(rank, linear.in_features, generator=generator) / linear.in_features ** 0.5
            up = torch.randn(linear.out_features, rank, generator=generator) * strength
            tensors[f"{prefix}.{name}.lora_A.weight"] = down
            tensors[f"{prefix}.{name}.lora_B.weight"] = up
        config = {f"{prefix}.r": rank, f"{prefix}.lora_alpha": rank, f"{prefix}.target_modules": names}
        path = os.path.join(folder, f"demo_video_{role}_lora.safetensors")
        save_file(tensors, path, metadata={"format": "pt",
                                           "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)})
        paths.append(path)
    return paths[0], paths[1]


# --- The table ---------------------------------------------------------------------

TINY_VIDEO_BUILDERS = {
    "wan21": build_tiny_wan21,
    "wan22": build_tiny_wan22,
    "hunyuanvideo": build_tiny_hunyuanvideo,
    "ltx-video": build_tiny_ltx_video,
    "cogvideox": build_tiny_cogvideox,
    "animatediff": build_tiny_animatediff,
}

# (height, width, num_frames): the smallest real video each tiny model makes with
# every frame kept; sides are multiples of 16, the MP4 encoder's macroblock.
TINY_VIDEO_SIZES = {
    "wan21": (16, 16, 5),
    "wan22": (16, 16, 5),
    "hunyuanvideo": (16, 16, 5),
    "ltx-video": (32, 32, 9),
    "cogvideox": (16, 16, 9),
    "animatediff": (16, 16, 4),
}

# What a call needs beyond prompt, num_inference_steps, guidance_scale, height,
# width, num_frames and generator.
TINY_VIDEO_CALL_KWARGS = {
    "wan21": {"max_sequence_length": 16},
    "wan22": {"max_sequence_length": 16},
    "hunyuanvideo": {"max_sequence_length": 16, "prompt_template": {"template": "{}", "crop_start": 0}},
    "ltx-video": {"max_sequence_length": 16},
    "cogvideox": {"max_sequence_length": 16},
    "animatediff": {},
}


def build_tiny_video(key: str, folder: str | os.PathLike, **options) -> str:
    """Build the tiny pipeline of family ``key`` (a key of ``TINY_VIDEO_BUILDERS``) in ``folder``."""
    if key not in TINY_VIDEO_BUILDERS:
        raise ValueError(f"unknown tiny video family {key!r}; choose one of {', '.join(TINY_VIDEO_BUILDERS)}")
    return TINY_VIDEO_BUILDERS[key](folder, **options)
