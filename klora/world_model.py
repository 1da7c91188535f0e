"""The world's model: a small SDXL (the real diffusers and transformers classes), untrained.

``build_parts`` makes every component of a ``StableDiffusionXLPipeline`` for the
world of ``klora/world.py``: a word-level CLIP tokenizer for the world's words,
two small CLIP text encoders, a two-block ``AutoencoderKL`` (8 latent channels at
half the picture size), an SDXL ``UNet2DConditionModel`` (``addition_embed_type="text_time"``)
with cross-attention at both of its levels, and a v-prediction, zero-terminal-SNR
``EulerDiscreteScheduler``. ``klora/world_training.py`` trains them.
"""

from __future__ import annotations

import torch

from . import world

MAX_TOKENS = 20  # the longest caption is 14 tokens with its start and end
TEXT_HIDDEN = 32  # per encoder; SDXL's cross-attention sees both side by side
POOLED = 32  # projection of the second encoder
TIME_EMBED = 8  # per time id; SDXL has six (original size, crop corner, target size)
LATENT_CHANNELS = 8  # at 16 x 16: 2,048 numbers for a 32 x 32 x 3 picture


def tokenizer():
    """A CLIP tokenizer whose vocabulary is the world's words, each one token.

    CLIP's tokenizer is byte-pair encoding; each word gets a chain of merges that
    spells it from its letters. A merge of one word can cut into another (the
    ``tr`` of "triangle" inside "stripes"), so a word that does not come out whole
    has its chain moved ahead until every word does.
    """
    from transformers import CLIPTokenizer

    order = sorted(world.words(), key=lambda w: (-len(w), w))
    for _ in range(len(order) ** 2):
        vocab, merges = _vocab_and_merges(order)
        made = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
        split = [w for w in order if len(made(w).input_ids) != 3]
        if not split:
            return made
        order.remove(split[0])
        order.insert(0, split[0])
    raise RuntimeError(f"no merge order spells every word whole (last split: {split})")


def _vocab_and_merges(order):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges = []

    def add(token):
        vocab.setdefault(token, len(vocab))

    for word in order:
        parts = [*word[:-1], word[-1] + "</w>"]
        for part in parts:
            add(part)
        joined = parts[0]
        for part in parts[1:]:
            if (joined, part) not in merges:  # a repeated pair would take its later rank
                merges.append((joined, part))
            joined += part
            add(joined)
    return vocab, merges


def _clip_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=64,
                          num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=MAX_TOKENS,
                          projection_dim=POOLED, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                          hidden_act="gelu")


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=16, sample_size=world.SIZE,
                         mid_block_add_attention=False, force_upcast=False)


def unet(channels=(48, 96)):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.SIZE // 2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=channels,
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
        use_linear_projection=True, transformer_layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=2 * TEXT_HIDDEN, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED, projection_class_embeddings_input_dim=6 * TIME_EMBED + POOLED)


def scheduler():
    """v-prediction on SDXL's betas rescaled to zero terminal SNR (Lin et al. 2024), sampled from
    the last timestep ("trailing"); DDPMScheduler reads the same config for training."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                  timestep_spacing="trailing")


def build_parts(seed: int = 0) -> dict:
    """Every component of the world's SDXL pipeline, freshly initialised from ``seed``."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = tokenizer()
    torch.manual_seed(seed)
    parts = {"tokenizer": tok, "tokenizer_2": tokenizer(),
             "text_encoder": CLIPTextModel(_clip_config(len(tok))),
             "text_encoder_2": CLIPTextModelWithProjection(_clip_config(len(tok))),
             "vae": vae(), "unet": unet(), "scheduler": scheduler()}
    return parts
