"""The real FLUX.1 transformer architecture, at full size, without its memory.

The model is built on the meta device (no weights). LoRAs with the real layer
sizes are mapped onto it: a 494-layer "all linear" diffusers LoRA and a full
kohya LoRA (fused qkv, single-block linear1 with its 3 x 3072 + 12288 split).
The expected layer lists are written out from FLUX's block structure here,
not taken from diffusers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from flux_lora_files import block_linears, diffusers_units, fused_units, probe_truth
from klora import loras

DOUBLE_LINEARS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2", "norm1.linear", "norm1_context.linear"]
SINGLE_LINEARS = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"]
ALL_LINEARS = sorted([f"transformer_blocks.{i}.{m}" for i in range(19) for m in DOUBLE_LINEARS]
                     + [f"single_transformer_blocks.{i}.{m}" for i in range(38) for m in SINGLE_LINEARS])


@pytest.fixture(scope="module")
def flux1_on_meta():
    """FLUX.1-dev's transformer (19 double + 38 single blocks, width 3072), weights on meta."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                      pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def as_file(units, kind):
    """The tensors a file of this layout holds, in memory (rank 1, bf16: ~22 MB for 494 layers)."""
    tensors = {}
    for u in units:
        if kind == "diffusers":
            tensors[f"transformer.{u.key}.lora_A.weight"] = u.A
            tensors[f"transformer.{u.key}.lora_B.weight"] = u.B
            tensors[f"transformer.{u.key}.alpha"] = torch.tensor(float(u.alpha))
        else:
            tensors[f"{u.key}.lora_down.weight"] = u.A
            tensors[f"{u.key}.lora_up.weight"] = u.B
            tensors[f"{u.key}.alpha"] = torch.tensor(float(u.alpha))
    return loras.LoRAFile(label=f"{kind} LoRA", path=Path("<memory>"), tensors=tensors)


def check_maps_exactly(adapter, units, transformer):
    """Every named layer is adapted with the file's own update: compare dW @ x on a probe x."""
    x = torch.randn(max(u.A.shape[1] for u in units), generator=torch.Generator().manual_seed(0))
    expected = probe_truth(units, transformer, x)
    assert sorted(adapter.modules) == sorted(expected)
    modules = dict(transformer.named_modules())
    alpha_of = {m.strip("^$").replace("\\", ""): a for m, a in adapter.config["alpha_pattern"].items()}
    for path, want in expected.items():
        A = adapter.state_dict[f"{path}.lora_A.weight"].double()
        B = adapter.state_dict[f"{path}.lora_B.weight"].double()
        scale = alpha_of.get(path, adapter.config["lora_alpha"]) / A.shape[0]
        got = scale * (B @ (A @ x.double()[: A.shape[1]]))
        assert B.shape[0] == modules[path].out_features and A.shape[1] == modules[path].in_features
        assert torch.allclose(got, want, rtol=2e-2, atol=1e-6), path  # bf16 factors


def test_the_real_architecture_has_494_block_linears(flux1_on_meta):
    assert len(ALL_LINEARS) == 494
    assert sorted(block_linears(flux1_on_meta)) == ALL_LINEARS


def _in_model_order(model):
    return [n for n, _ in model.named_modules()]


def test_an_all_linear_lora_maps_onto_all_494_layers(flux1_on_meta):
    units = diffusers_units(flux1_on_meta, ALL_LINEARS, rank=1, alpha=lambda i: 0.5 + (i % 3), seed=0,
                            dtype=torch.bfloat16)
    adapter = loras.to_denoiser_adapter(as_file(units, "diffusers"), flux1_on_meta)
    assert sorted(adapter.modules) == ALL_LINEARS
    loras.check_fits(adapter, flux1_on_meta, "all-linear LoRA")
    check_maps_exactly(adapter, units, flux1_on_meta)

    # PEFT wraps exactly those layers of the real model (weights stay on meta: nothing is allocated).
    from peft.tuners.lora import LoraLayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying ... to a meta parameter is a no-op"
        loras.load_adapter(flux1_on_meta, adapter, "probe", "all-linear LoRA")
    try:
        wrapped = sorted(n for n, m in flux1_on_meta.named_modules() if isinstance(m, LoraLayer))
        assert wrapped == ALL_LINEARS
    finally:
        flux1_on_meta.unload_lora()
    assert not any(isinstance(m, LoraLayer) for m in flux1_on_meta.modules())


def test_a_full_kohya_lora_with_real_sizes_maps_onto_every_layer_it_names(flux1_on_meta):
    units = fused_units(flux1_on_meta, "kohya", rank=1, alpha=0.25, seed=1, dtype=torch.bfloat16)
    assert len(units) == 19 * 10 + 38 * 3  # 304 kohya modules, fused
    assert units[-3].key == "lora_unet_single_blocks_37_linear1" and units[-3].B.shape[0] == 3 * 3072 + 12288
    adapter = loras.to_denoiser_adapter(as_file(units, "kohya"), flux1_on_meta)
    assert sorted(adapter.modules) == ALL_LINEARS  # fused qkv and linear1 split into their 494 layers
    loras.check_fits(adapter, flux1_on_meta, "kohya LoRA")
    check_maps_exactly(adapter, units, flux1_on_meta)


def materialize_without_memory(model):
    """Give every meta tensor real storage of one element, broadcast to its shape.

    PEFT and K-LoRA then work on the real architecture; nothing of size is
    allocated except the LoRA factors themselves.
    """
    for module in model.modules():
        for name, value in list(module._parameters.items()):
            if value is not None and value.is_meta:
                module._parameters[name] = torch.nn.Parameter(
                    torch.zeros((), dtype=value.dtype).expand(value.shape), requires_grad=False)
        for name, value in list(module._buffers.items()):
            if value is not None and value.is_meta:
                module._buffers[name] = torch.zeros((), dtype=value.dtype).expand(value.shape)
    return model


def test_the_selection_log_names_the_real_module_paths(flux1_on_meta, tmp_path):
    import copy
    import json

    from klora.fusion import KLoRA

    model = materialize_without_memory(copy.deepcopy(flux1_on_meta))
    # One layer of each kind the rule meets (full-size stats cost ~0.5 s a layer on this CPU).
    layers = ["transformer_blocks.0.attn.to_q", "transformer_blocks.18.attn.add_v_proj",
              "single_transformer_blocks.37.attn.to_k"]
    content = diffusers_units(model, layers, rank=2, alpha=2.0, seed=3)
    style = diffusers_units(model, layers, rank=4, alpha=4.0, seed=4)
    klora = KLoRA(model, {f"transformer.{u.key}.lora_A.weight": u.A for u in content}
                  | {f"transformer.{u.key}.lora_B.weight": u.B for u in content},
                  {f"transformer.{u.key}.lora_A.weight": u.A for u in style}
                  | {f"transformer.{u.key}.lora_B.weight": u.B for u in style}, num_inference_steps=28,
                  switching="adapters")  # the weights are stride-0 stand-ins: nothing to write into
    klora.save_selection_log(tmp_path / "log.json")
    log = json.loads((tmp_path / "log.json").read_text())
    real_paths = set(_in_model_order(flux1_on_meta))
    assert set(log["layers"]) == set(layers) <= real_paths
    assert all(entry["k"] == 8 for entry in log["layers"].values())
    assert set(klora.choices_at(0.5)) == set(layers)
    klora.detach()
