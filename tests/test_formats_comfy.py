"""The name tables and alphas the ComfyUI adapter adds to ComfyUI's key map, checked without ComfyUI.

The diffusers -> original tables of ``klora.formats`` against the hand-written ground-truth tables of
``video_lora_files``; ``checks.metadata_alphas`` against PEFT's rule (alpha / rank, alpha / sqrt(rank)
with rsLoRA). The ComfyUI side of these tables is tested in ``test_comfyui.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from klora import checks, formats
from video_lora_files import HUNYUAN_VIDEO_FUSED, HUNYUAN_VIDEO_SWAPPED, HUNYUAN_VIDEO_TO_ORIGINAL, WAN_TO_ORIGINAL


@pytest.mark.parametrize("block", [0, 13])
def test_wan_diffusers_names_give_the_original_modules(block):
    for diffusers, original in WAN_TO_ORIGINAL.items():
        name = diffusers.replace("{i}", str(block))
        assert formats.original_module("wan", name) == (original.replace("{i}", str(block)), None), name
    assert formats.original_module("wan", "blocks.0.attn1.to_qkv") is None


@pytest.mark.parametrize("block", [0, 21])
def test_hunyuan_video_diffusers_names_give_original_modules_and_rows(block):
    for diffusers, original in HUNYUAN_VIDEO_TO_ORIGINAL.items():
        name = diffusers.replace("{i}", str(block))
        rows = "swapped" if diffusers in HUNYUAN_VIDEO_SWAPPED else None
        assert formats.original_module("hunyuan_video", name) == (original.replace("{i}", str(block)), rows), name
    for original, members in HUNYUAN_VIDEO_FUSED.items():
        for j, member in enumerate(members):
            name = member.replace("{i}", str(block))
            assert formats.original_module("hunyuan_video", name) == (original.replace("{i}", str(block)),
                                                                       ("q", "k", "v", "mlp")[j]), name


def test_fused_rows_cut_q_k_v_and_the_mlp():
    assert [formats.fused_rows(r, 32, 96) for r in "qkv"] == [(0, 32), (32, 32), (64, 32)]
    assert formats.fused_rows("mlp", 3072, 3 * 3072 + 12288) == (9216, 12288)


def test_musubi_and_ltx_video_names():
    assert formats.musubi_module("hunyuan_video", "double_blocks_3_img_mod_linear") == "double_blocks.3.img_mod.linear"
    assert formats.musubi_module("hunyuan_video", "txt_in_individual_token_refiner_blocks_1_self_attn_qkv") == \
        "txt_in.individual_token_refiner.blocks.1.self_attn_qkv"
    assert formats.musubi_module("wan", "blocks_2_cross_attn_k_img") == "blocks.2.cross_attn.k_img"
    assert formats.musubi_module("hunyuan_video", "double_blocks_0_nonsense") is None
    assert formats.original_module("ltx_video", "proj_in") == ("patchify_proj", None)
    assert formats.original_module("ltx_video", "time_embed.emb.timestep_embedder.linear_1") == \
        ("adaln_single.emb.timestep_embedder.linear_1", None)
    assert formats.original_module("ltx_video", "transformer_blocks.3.attn1.norm_q") == \
        ("transformer_blocks.3.attn1.q_norm", None)
    assert formats.original_module("flux", "transformer_blocks.0.attn.to_q") is None


def _peft(ranks: dict[str, int], metadata: dict) -> tuple[dict, dict]:
    tensors = {}
    for name, r in ranks.items():
        tensors[f"transformer.{name}.lora_A.weight"] = torch.ones(r, 8)
        tensors[f"transformer.{name}.lora_B.weight"] = torch.ones(8, r)
    return tensors, {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in metadata.items()})}


def test_metadata_alphas_follow_peft():
    tensors, metadata = _peft({"a": 4, "b": 2}, {"r": 4, "lora_alpha": 8, "rank_pattern": {"^b$": 2},
                                                 "alpha_pattern": {"^b$": 3}})
    assert checks.check_file(tensors, metadata, "f") == []
    assert checks.metadata_alphas(tensors, metadata) == {"transformer.a": 8.0, "transformer.b": 3.0}
    tensors["transformer.a.alpha"] = torch.tensor(8.0)  # an .alpha key wins: nothing to add there
    assert checks.metadata_alphas(tensors, metadata) == {"transformer.b": 3.0}

    tensors, metadata = _peft({"a": 4}, {"r": 4, "lora_alpha": 8, "use_rslora": True})
    (value,) = checks.metadata_alphas(tensors, metadata).values()
    assert value / 4 == pytest.approx(8 / math.sqrt(4))  # ComfyUI's alpha / rank = PEFT's rsLoRA scale
    assert checks.metadata_alphas(tensors, {}) == {}
