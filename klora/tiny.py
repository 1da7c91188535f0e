"""Tiny offline models: real diffusers classes with random weights.

They exist so that the demo and the tests run the exact loading code a real
model goes through (``save_pretrained`` here, ``from_pretrained`` there) on a
machine without a model hub. Their images are noise; they check the plumbing,
not image quality.

One builder per family (``TINY_BUILDERS``), each writing a folder that
``DiffusionPipeline.from_pretrained`` reloads offline (tokenizers are built in
memory; ``from_pretrained`` returns the models in eval mode, the builders never
run them). ``TINY_CALL_KWARGS`` and ``TINY_SIZES`` say how to call each one;
``write_demo_loras`` writes two LoRAs for any of their denoisers.
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


def _sdxl_parts(seed: int) -> dict:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
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
    return dict(vae=_vae(seed + 2), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler)


def build_tiny_sdxl(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny Stable Diffusion XL pipeline to ``folder`` and return the path.

    The UNet has the layout of SDXL (a plain down block, then attention blocks
    with 1 and 2 transformer layers, two text encoders, added time embeddings)
    at a size that runs a 64x64 image in a few tens of milliseconds per step.
    """
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline(**_sdxl_parts(seed)).save_pretrained(folder)
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


def _t5_encoder(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37,
                                   num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _flux_vae(seed: int):
    """The FLUX.1 VAE layout (no quant convs, shifted latents), also used by SD3 and Chroma."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, norm_num_groups=8, sample_size=32,
                         use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035)


def build_tiny_flux(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny FLUX.1 pipeline (2 double and 2 single blocks) to ``folder``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

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
    text_encoder_2 = _t5_encoder(len(t5_tokenizer))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flux_vae(seed + 2),
                        text_encoder=text_encoder, tokenizer=clip_tok,
                        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer,
                        transformer=transformer)
    pipe.save_pretrained(folder)
    return str(folder)


def build_tiny_sd3(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny Stable Diffusion 3 pipeline (2 joint blocks, the last one
    context-pre-only as in SD3; two CLIP encoders with projection and a T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    # pooled_projection_dim = the two CLIP projections side by side; joint_attention_dim = T5
    # width, which must cover the two CLIP hidden states concatenated (32 + 32).
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
        joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=32,
    )
    clip_tok = clip_tokenizer()
    t5_tokenizer = _t5_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModelWithProjection(_clip_config(len(clip_tok)))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(len(clip_tok)))
    text_encoder_3 = _t5_encoder(len(t5_tokenizer), d_model=64)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flux_vae(seed + 2),
        text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(), text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(folder)
    return str(folder)


def build_tiny_chroma(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny Chroma pipeline (FLUX.1 layout without CLIP: T5 only, a
    modulation approximator instead of per-block timestep embeddings)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1,
    )
    tokenizer = _t5_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = _t5_encoder(len(tokenizer))
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flux_vae(seed + 2),
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)
    return str(folder)


# Qwen's byte-level BPE. Every byte is a symbol (space -> "Ġ", newline -> "Ċ"); the words
# of the prompt templates below get merges, so that a template tokenizes into as many
# tokens as with the real tokenizer. That matters for Qwen-Image, which drops the first
# 34 tokens (the system prompt) of every encoded prompt.
_QWEN_TEMPLATE_WORDS = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:\nsystem\nuser\nassistant"
)
_QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat template, reduced to what the pipelines use: user turns, the generation
# prompt, and the empty thinking block that enable_thinking=False adds.
_QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
_QWEN_VOCAB_SIZE = 512  # > the tokenizer's 369 entries; Qwen-Image puts its vision tokens at 508-510


def qwen_tokenizer():
    """A Qwen2 tokenizer (Qwen-Image, Z-Image, FLUX.2 klein) built in memory, with Qwen3's chat template."""
    import re

    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbol = bytes_to_unicode()
    vocab = {symbol: i for i, symbol in enumerate(byte_symbol.values())}
    merges = []
    for word in re.findall(r" ?[A-Za-z]+", _QWEN_TEMPLATE_WORDS):
        word = "".join(byte_symbol[b] for b in word.encode())
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                merges.append((word[:end - 1], word[end - 1]))
                vocab[word[:end]] = len(vocab)
    for token in _QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None,
                               pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": _QWEN_SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = _QWEN3_CHAT_TEMPLATE
    return tokenizer


def _qwen3_config(tokenizer):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=_QWEN_VOCAB_SIZE, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def build_tiny_qwen_image(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny Qwen-Image pipeline (2 dual-stream blocks, Qwen2.5-VL text encoder, Wan-style VAE)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    # in_channels = 4 latent channels x a 2x2 patch; the three rope axes add up to the head size.
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    )
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed + 1)
    # mrope_section: the rotary frequencies (head size / 2 = 4) split between time, height and width.
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": _QWEN_VOCAB_SIZE, "hidden_size": 16, "intermediate_size": 16,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                     "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        vision_start_token_id=508, vision_end_token_id=509, image_token_id=510, video_token_id=511,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)
    return str(folder)


def build_tiny_z_image(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny Z-Image pipeline (single-stream DiT with noise and caption refiners, Qwen3 encoder)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )
    # Some diffusers versions create these two with torch.empty (NaNs wherever a sequence is
    # padded); 0.42.1 zeroes them. Give them a fixed value either way.
    with torch.no_grad():
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3Model(_qwen3_config(tokenizer))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=16, norm_num_groups=8, sample_size=32,
                        scaling_factor=0.3611, shift_factor=0.1159)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)
    return str(folder)


def build_tiny_flux2_klein(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny FLUX.2 [klein] pipeline (2 double and 2 single blocks, Qwen3 causal LM encoder).

    The real klein stacks the hidden states of three encoder layers; this one
    stacks two (``text_encoder_out_layers=(1, 2)``, see ``TINY_CALL_KWARGS``),
    so ``joint_attention_dim`` is 2 x 16.
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3ForCausalLM(_qwen3_config(tokenizer))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                             norm_num_groups=8, sample_size=32)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)
    return str(folder)


def gemma_tokenizer():
    """A Gemma tokenizer (Sana, Lumina 2) built in memory: single characters and
    "▁"+character (SentencePiece's word start), <bos> first as in Gemma."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "\u2581": 4}
    merges = []
    for ch in _CHARS:
        vocab[ch] = len(vocab)
    for ch in _CHARS:
        merges.append(("\u2581", ch))
        vocab["\u2581" + ch] = len(vocab)
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def _gemma2(vocab_size: int):
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(Gemma2Config(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                                    max_position_embeddings=2048, sliding_window=2048))


def build_tiny_sana(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny Sana pipeline (linear-attention DiT, deep-compression autoencoder, Gemma 2 encoder)."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=16, sample_size=32, patch_size=1,
    )
    tokenizer = gemma_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = _gemma2(len(tokenizer))
    torch.manual_seed(seed + 2)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)
    pipe.save_pretrained(folder)
    return str(folder)


def build_tiny_lumina2(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny Lumina-Image 2.0 pipeline (unified single-stream DiT with refiners, Gemma 2 encoder)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 4, 8), axes_lens=(256, 32, 32),
        cap_feat_dim=16,
    )
    tokenizer = gemma_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = _gemma2(len(tokenizer))
    torch.manual_seed(seed + 2)
    # Lumina2Pipeline assumes an 8x VAE (vae_scale_factor = 8, not read from the config): 4 blocks.
    vae = AutoencoderKL(block_out_channels=[8] * 4, in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        latent_channels=4, norm_num_groups=8, sample_size=32,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                           vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.save_pretrained(folder)
    return str(folder)


def build_tiny_sdxl_controlnet(folder: str | os.PathLike, seed: int = 0) -> str:
    """Write the tiny SDXL pipeline with a ControlNet copied from its UNet.

    A ControlNet starts with zeroed output convolutions (so training starts
    from the plain UNet); here they get small random weights, so that the
    control image visibly changes the output.
    """
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    parts = _sdxl_parts(seed)
    torch.manual_seed(seed + 3)
    # The tiny VAE downsamples 2x, so the conditioning embedding must too (one stride-2 stage).
    controlnet = ControlNetModel.from_unet(parts["unet"], conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            zeroed = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            if name.startswith(zeroed):
                param.normal_(0.0, 0.1)
    pipe = StableDiffusionXLControlNetPipeline(controlnet=controlnet, **parts)
    pipe.save_pretrained(folder)
    return str(folder)


# One row per family: how to build it, what a generation call needs beyond prompt,
# num_inference_steps, guidance_scale, height, width and generator, and a size that
# runs fast. Short max_sequence_length values keep the text sequences tiny (the
# defaults pad to 256-512 tokens). Pass the prompt by keyword: FLUX.2 klein's first
# argument is an image. "sdxl-controlnet" also needs ``image=``, a control image at the
# generation size, e.g. ``torch.rand(1, 3, size, size, generator=...)`` or a PIL image.
TINY_BUILDERS = {
    "sdxl": build_tiny_sdxl,
    "sd": build_tiny_sd,
    "flux": build_tiny_flux,
    "sd3": build_tiny_sd3,
    "qwen-image": build_tiny_qwen_image,
    "z-image": build_tiny_z_image,
    "flux2-klein": build_tiny_flux2_klein,
    "chroma": build_tiny_chroma,
    "sana": build_tiny_sana,
    "lumina2": build_tiny_lumina2,
    "sdxl-controlnet": build_tiny_sdxl_controlnet,
}
TINY_CALL_KWARGS = {
    "sdxl": {},
    "sd": {},
    "flux": {"max_sequence_length": 16},
    "sd3": {"max_sequence_length": 16},
    # Counted after the 34 system-prompt tokens the pipeline drops; pads to the longest prompt.
    "qwen-image": {"max_sequence_length": 32},
    # Pads to max_sequence_length, then drops the padding; 64 holds the chat template and a short
    # prompt (one token per character with the tiny tokenizer). The CFG options are the defaults.
    "z-image": {"max_sequence_length": 64, "cfg_normalization": False, "cfg_truncation": 1.0},
    # The tiny Qwen3 has 2 layers; the real klein stacks layers (9, 18, 27) of 36.
    "flux2-klein": {"max_sequence_length": 64, "text_encoder_out_layers": (1, 2)},
    "chroma": {"max_sequence_length": 16},
    # Resolution binning would generate at 512x512 and resize back.
    "sana": {"max_sequence_length": 16, "use_resolution_binning": False},
    "lumina2": {},
    "sdxl-controlnet": {},
}
TINY_SIZES = {
    "sdxl": 64, "sd": 64, "flux": 64, "sd3": 32, "qwen-image": 32, "z-image": 32, "flux2-klein": 32,
    "chroma": 32, "sana": 32, "lumina2": 64, "sdxl-controlnet": 64,
}


def build_tiny(family: str, folder: str | os.PathLike, seed: int = 0) -> str:
    """Write the tiny pipeline of ``family`` (a key of ``TINY_BUILDERS``) to ``folder``."""
    if family not in TINY_BUILDERS:
        raise ValueError(f"No tiny pipeline for {family!r}; choose one of {', '.join(TINY_BUILDERS)}.")
    return TINY_BUILDERS[family](folder, seed=seed)


# The attention projections a LoRA trainer targets, by the names diffusers gives them.
# IMAGE_PROJECTIONS act on the image tokens (UNet attn1/attn2, the image stream of joint
# blocks, single-stream blocks; FLUX.2 fuses q, k, v and the MLP input into one linear
# and names the output "attn.to_out"). TEXT_PROJECTIONS are the text stream of joint
# (MM-DiT) blocks: SD3, FLUX, Chroma, Qwen-Image, FLUX.2.
IMAGE_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj", "to_out")
TEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def attention_projections(denoiser, projections=IMAGE_PROJECTIONS) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``denoiser`` whose last name parts are one
    of ``projections``, in module order (input to output). A layer PEFT has already
    wrapped counts under its own name (its linear is ``<name>.base_layer``)."""
    suffixes = tuple("." + p for p in projections)
    names = [name.removesuffix(".base_layer") for name, module in denoiser.named_modules()
             if isinstance(module, torch.nn.Linear)]
    return [name for name in names if name.endswith(suffixes)]


def write_demo_loras(denoiser, folder: str | os.PathLike, rank: int = 8, seed: int = 0,
                     projections=IMAGE_PROJECTIONS) -> tuple[str, str]:
    """Two synthetic rank-``rank`` LoRAs on the attention projections of ``denoiser``.

    Any UNet or transformer denoiser: the layers are ``attention_projections(denoiser,
    projections)``; pass ``IMAGE_PROJECTIONS + TEXT_PROJECTIONS`` to cover the text
    stream of joint blocks too (the default leaves it out, as the demo always has).
    Their magnitudes drift in opposite directions through the network, so the
    K-LoRA selection map shows both LoRAs winning somewhere. Written in the
    current diffusers format (``<prefix>.<module>.lora_A.weight``, alpha in
    the metadata), i.e. what ``save_lora_weights`` produces.
    """
    import json

    from safetensors.torch import save_file

    prefix = "unet" if "UNet" in type(denoiser).__name__ else "transformer"
    names = attention_projections(denoiser, projections)
    if not names:
        raise ValueError(f"{type(denoiser).__name__} has no linear layer named {projections}: "
                         "pass the projection names its attention modules use.")
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

