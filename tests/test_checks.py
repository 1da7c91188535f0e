"""Every LoRA file is checked against itself before anything loads it (klora/checks.py).

Each case is a real .safetensors file written here and read back with
``klora.loras.read``, as a user's file would be. Expected messages are written
out from the tensors the test put in the file, not from the checker.
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from klora import loras
from klora.checks import check_file, zero_layers

Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
K = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
NO_ALPHA = "no alpha in the file (no alpha metadata, no .alpha keys): alpha = rank assumed, i.e. scale 1"


def lora_file(tmp_path, tensors, metadata=None, name="lora.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return unchecked(path)


def unchecked(path, role="content LoRA"):
    """The file as ``loras.read`` sees it, without the checks ``read`` runs itself (tested at the end)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return loras.LoRAFile(label=f"{role} '{path}'", path=path, tensors={k: f.get_tensor(k) for k in f.keys()},
                              metadata=f.metadata() or {})


def check(lora):
    return check_file(lora.tensors, lora.metadata, lora.label)


def refused(lora) -> str:
    with pytest.raises(loras.LoRAError) as caught:
        check(lora)
    message = str(caught.value)
    assert message.startswith(lora.label + ": ") and "\n" not in message, message
    return message


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def peft(name, A, B, prefix="unet"):
    return {f"{prefix}.{name}.lora_A.weight": A, f"{prefix}.{name}.lora_B.weight": B}


def peft_metadata(component="unet", **config):
    return {"format": "pt", "lora_adapter_metadata": json.dumps({f"{component}.{k}": v for k, v in config.items()})}


# (layer name in the file, down key, up key, down name, up name) for every pair naming in use.
NAMINGS = {
    "peft": (f"unet.{Q}", f"unet.{Q}.lora_A.weight", f"unet.{Q}.lora_B.weight", "lora_A", "lora_B"),
    "peft_adapter_infix": (f"unet.{Q}", f"unet.{Q}.lora_A.default.weight", f"unet.{Q}.lora_B.default.weight",
                           "lora_A", "lora_B"),
    "kohya": ("lora_unet_" + Q.replace(".", "_"), "lora_unet_" + Q.replace(".", "_") + ".lora_down.weight",
              "lora_unet_" + Q.replace(".", "_") + ".lora_up.weight", "lora_down", "lora_up"),
    "old_diffusers": (f"unet.{Q}", f"unet.{Q}.lora.down.weight", f"unet.{Q}.lora.up.weight", "lora.down", "lora.up"),
    "old_processor": (f"unet.{Q[:-5]}.processor.to_q", f"unet.{Q[:-5]}.processor.to_q_lora.down.weight",
                      f"unet.{Q[:-5]}.processor.to_q_lora.up.weight", "_lora.down", "_lora.up"),
    "text_encoder": ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight",
                     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight",
                     "lora_linear_layer.down", "lora_linear_layer.up"),
    "xlabs": ("double_blocks.0.processor.qkv_lora1", "double_blocks.0.processor.qkv_lora1.down.weight",
              "double_blocks.0.processor.qkv_lora1.up.weight", "down", "up"),
}


# --- pairs ----------------------------------------------------------------------

@pytest.mark.parametrize("naming", sorted(NAMINGS))
def test_every_naming_is_read_as_pairs(naming, tmp_path):
    name, down, up, _, _ = NAMINGS[naming]
    other = {f"unet.{K}.lora_A.weight": randn(8, 32, seed=3), f"unet.{K}.lora_B.weight": randn(64, 8, seed=4)}
    lora = lora_file(tmp_path, {down: randn(8, 32), up: randn(64, 8, seed=1), **other})
    assert check(lora) == [f"{lora.label}: {NO_ALPHA}"]


@pytest.mark.parametrize("naming", sorted(NAMINGS))
def test_a_missing_factor_is_refused_naming_the_layer(naming, tmp_path):
    name, down, up, down_name, up_name = NAMINGS[naming]
    other = {f"unet.{K}.lora_A.weight": randn(8, 32, seed=3), f"unet.{K}.lora_B.weight": randn(64, 8, seed=4)}
    no_down = lora_file(tmp_path, {up: randn(64, 8), **other}, name="no_down.safetensors")
    assert refused(no_down) == f"{no_down.label}: layer '{name}' has {up_name} (64x8) but no {down_name}"
    no_up = lora_file(tmp_path, {down: randn(8, 32), **other}, name="no_up.safetensors")
    assert refused(no_up) == f"{no_up.label}: layer '{name}' has {down_name} (8x32) but no {up_name}"


def test_the_broken_layer_is_found_among_many(tmp_path):
    tensors = {}
    names = [f"up_blocks.0.attentions.{i}.transformer_blocks.0.attn2.to_v" for i in range(12)]
    for i, name in enumerate(names):
        tensors.update(peft(name, randn(4, 32, seed=2 * i), randn(48, 4, seed=2 * i + 1)))
    del tensors[f"unet.{names[7]}.lora_A.weight"]
    lora = lora_file(tmp_path, tensors, peft_metadata(r=4, lora_alpha=4))
    assert refused(lora) == f"{lora.label}: layer 'unet.{names[7]}' has lora_B (48x4) but no lora_A"


def test_ranks_that_disagree_are_refused_with_both_shapes(tmp_path):
    lora = lora_file(tmp_path, peft(Q, randn(4, 32), randn(64, 8)))
    assert refused(lora) == (f"{lora.label}: layer 'unet.{Q}': ranks disagree (lora_A 4x32, lora_B 64x8): "
                             "lora_A has rank 4, lora_B has rank 8")


def test_factors_must_be_2d_or_4d_and_alike(tmp_path):
    flat = lora_file(tmp_path, peft(Q, randn(32), randn(64, 1)), name="flat.safetensors")
    assert refused(flat) == (f"{flat.label}: layer 'unet.{Q}': lora_A is 1-D (32); LoRA factors are 2-D (linear) "
                             "or 4-D (conv)")
    mixed = lora_file(tmp_path, peft(Q, randn(4, 32, 3, 3), randn(64, 4)), name="mixed.safetensors")
    assert refused(mixed) == (f"{mixed.label}: layer 'unet.{Q}': lora_A is 4-D but lora_B is 2-D "
                              "(lora_A 4x32x3x3, lora_B 64x4)")


def test_conv_pairs(tmp_path):
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    good = {f"{conv}.lora_down.weight": randn(4, 32, 3, 3), f"{conv}.lora_up.weight": randn(32, 4, 1, 1),
            f"{conv}.alpha": torch.tensor(2.0)}
    assert check(lora_file(tmp_path, good, name="good.safetensors")) == []
    wide_up = dict(good, **{f"{conv}.lora_up.weight": randn(32, 4, 3, 3)})
    lora = lora_file(tmp_path, wide_up, name="wide.safetensors")
    assert refused(lora) == f"{lora.label}: layer '{conv}': conv lora_up must be 1x1 (lora_down 4x32x3x3, lora_up 32x4x3x3)"
    rank = dict(good, **{f"{conv}.lora_up.weight": randn(32, 8, 1, 1)})
    lora = lora_file(tmp_path, rank, name="rank.safetensors")
    assert "ranks disagree (lora_down 4x32x3x3, lora_up 32x8x1x1)" in refused(lora)
    # LoCon with a Tucker core: 1x1 down, r x r x kh x kw middle, 1x1 up
    tucker = {f"{conv}.lora_down.weight": randn(4, 32, 1, 1), f"{conv}.lora_mid.weight": randn(4, 4, 3, 3),
              f"{conv}.lora_up.weight": randn(32, 4, 1, 1), f"{conv}.alpha": torch.tensor(4.0)}
    assert check(lora_file(tmp_path, tucker, name="tucker.safetensors")) == []
    tucker[f"{conv}.lora_mid.weight"] = randn(2, 4, 3, 3)
    lora = lora_file(tmp_path, tucker, name="tucker_bad.safetensors")
    assert refused(lora).startswith(f"{lora.label}: layer '{conv}': lora_mid 2x4x3x3 does not fit rank 4")


def test_factors_must_be_floating_point(tmp_path):
    lora = lora_file(tmp_path, peft(Q, torch.ones(4, 32, dtype=torch.int8), randn(64, 4)))
    assert refused(lora) == f"{lora.label}: layer 'unet.{Q}': lora_A is int8, not floating point"


def test_rank_zero_is_refused(tmp_path):
    lora = lora_file(tmp_path, peft(Q, torch.zeros(0, 32), torch.zeros(64, 0)))
    assert refused(lora) == f"{lora.label}: layer 'unet.{Q}' has rank 0 (lora_A 0x32, lora_B 64x0): rank must be positive"


def test_a_factor_twice_or_two_namings_in_one_layer_are_refused(tmp_path):
    twice = {**peft(Q, randn(4, 32), randn(64, 4)), f"unet.{Q}.lora_A.default.weight": randn(4, 32, seed=5)}
    lora = lora_file(tmp_path, twice, name="twice.safetensors")
    # safetensors stores keys sorted, so ".default." comes first
    assert refused(lora) == (f"{lora.label}: layer 'unet.{Q}' has the same factor twice "
                             f"('unet.{Q}.lora_A.default.weight' and 'unet.{Q}.lora_A.weight')")
    mixed = {f"unet.{Q}.lora_A.weight": randn(4, 32), f"unet.{Q}.lora_up.weight": randn(64, 4)}
    lora = lora_file(tmp_path, mixed, name="mixed.safetensors")
    assert refused(lora) == (f"{lora.label}: layer 'unet.{Q}' mixes two namings ('unet.{Q}.lora_A.weight' and "
                             f"'unet.{Q}.lora_up.weight'): no converter pairs them")


def test_biases_diffs_and_dora_scales(tmp_path):
    wan = "diffusion_model.blocks.0.self_attn.q"
    tensors = {
        **peft(Q, randn(4, 32), randn(64, 4)), f"unet.{Q}.lora_B.bias": randn(64, seed=2),
        f"{wan}.lora_down.weight": randn(4, 16), f"{wan}.lora_up.weight": randn(16, 4), f"{wan}.diff_b": randn(16),
        f"{wan}.alpha": torch.tensor(4.0), f"{wan}.dora_scale": torch.ones(16, 1),
        "diffusion_model.blocks.0.self_attn.k.diff": randn(16, 16),
        "diffusion_model.blocks.0.self_attn.k.diff_b": randn(16),
        "diffusion_model.blocks.0.norm3.diff": randn(16),
    }
    # the PEFT layer has no alpha: the warning names it, the others (alpha key, full diffs) need none
    assert check(lora_file(tmp_path, tensors)) == [
        f"content LoRA '{tmp_path / 'lora.safetensors'}': 1 of 2 layers have no alpha (no .alpha key, no alpha "
        f"metadata; e.g. 'unet.{Q}'): alpha = rank assumed for them, i.e. scale 1"]
    tensors[f"unet.{Q}.lora_B.bias"] = randn(32)
    lora = lora_file(tmp_path, tensors, name="bias.safetensors")
    assert refused(lora) == (f"{lora.label}: layer 'unet.{Q}': bias 'unet.{Q}.lora_B.bias' is 32, expected 64 "
                             "(the layer's output size)")


def test_lokr_and_loha_layers_are_not_broken_pairs(tmp_path):
    lokr = "lora_unet_" + Q.replace(".", "_")
    loha = "lora_unet_" + K.replace(".", "_")
    tensors = {f"{lokr}.lokr_w1": randn(4, 4), f"{lokr}.lokr_w2_a": randn(16, 2), f"{lokr}.lokr_w2_b": randn(2, 8),
               f"{lokr}.alpha": torch.tensor(2.0),
               f"{loha}.hada_w1_a": randn(64, 4), f"{loha}.hada_w1_b": randn(4, 32), f"{loha}.hada_w2_a": randn(64, 4),
               f"{loha}.hada_w2_b": randn(4, 32), f"{loha}.alpha": torch.tensor(4.0),
               f"{loha}.dora_scale": torch.ones(64, 1)}
    assert check(lora_file(tmp_path, tensors)) == []
    tensors[f"{lokr}.alpha"] = torch.tensor(-1.0)
    lora = lora_file(tmp_path, tensors, name="negative.safetensors")
    assert refused(lora) == f"{lora.label}: layer '{lokr}' has alpha -1 (its .alpha key): alpha must be positive"


def test_nan_is_refused_with_the_readers_message(tmp_path):
    path = tmp_path / "nan.safetensors"
    save_file(peft(Q, torch.full((4, 32), float("nan")), randn(64, 4)), str(path))
    with pytest.raises(loras.LoRAError) as by_reader:
        loras.read(path, role="content LoRA")
    with pytest.raises(loras.LoRAError) as by_check:
        check_file(load_file(str(path)), {}, f"content LoRA '{path}'")
    assert str(by_check.value) == str(by_reader.value) == (f"content LoRA '{path}': tensor 'unet.{Q}.lora_A.weight' "
                                                           "contains NaN or Inf values")


# --- rank and alpha -------------------------------------------------------------

def test_metadata_that_is_not_json_is_refused(tmp_path):
    lora = lora_file(tmp_path, peft(Q, randn(4, 32), randn(64, 4)),
                     {"lora_adapter_metadata": '{"unet.r": 4, "unet.lora_alpha": '})
    message = refused(lora)
    assert message.startswith(f"{lora.label}: metadata 'lora_adapter_metadata' is not valid JSON (")
    assert message.endswith("so its rank and alpha cannot be read; fix or remove that entry")
    listed = lora_file(tmp_path, peft(Q, randn(4, 32), randn(64, 4)), {"lora_adapter_metadata": "[4, 8]"},
                       name="list.safetensors")
    assert refused(listed) == (f"{listed.label}: metadata 'lora_adapter_metadata' is a JSON list, not an object of "
                               "'<component>.r', '<component>.lora_alpha', ...")


@pytest.mark.parametrize("config, says", [
    ({"r": 4, "lora_alpha": "abc"}, "'unet.lora_alpha' is \"abc\", not a number; fix the metadata or remove it"),
    ({"r": 4, "lora_alpha": "8"}, "'unet.lora_alpha' is \"8\", not a number; fix the metadata or remove it"),
    ({"r": "four", "lora_alpha": 8}, "'unet.r' is \"four\", not a number; fix the metadata or remove it"),
    ({"r": 0, "lora_alpha": 8}, "'unet.r' is 0: rank must be a positive number"),
    ({"r": 4, "lora_alpha": 0}, "'unet.lora_alpha' is 0: alpha must be a positive number"),
    ({"r": 4, "lora_alpha": -2.5}, "'unet.lora_alpha' is -2.5: alpha must be a positive number"),
    ({"r": 4.5, "lora_alpha": 8}, "'unet.r' is 4.5: a rank is a whole number"),
    ({"r": 4}, "has no 'unet.lora_alpha'; PEFT would use its default alpha 8 in silence: add the alpha the LoRA "
               "was trained with"),
    ({"r": 4, "lora_alpha": 8, "rank_pattern": {"to_q": 0}}, "'unet.rank_pattern'['to_q'] is 0: rank must be a "
                                                             "positive number"),
    ({"r": 4, "lora_alpha": 8, "alpha_pattern": {"to_q": None}}, "'unet.alpha_pattern'['to_q'] is null, not a "
                                                                 "number; fix the metadata or remove it"),
    ({"r": 4, "lora_alpha": 8, "alpha_pattern": ["to_q"]}, "'unet.alpha_pattern' is ['to_q'], not an object of "
                                                           "module pattern -> number"),
])
def test_unreadable_or_impossible_metadata_values_are_refused(config, says, tmp_path):
    lora = lora_file(tmp_path, peft(Q, randn(4, 32), randn(64, 4)), peft_metadata(**config))
    assert refused(lora) == f"{lora.label}: metadata 'lora_adapter_metadata' {says}"


def test_a_pattern_that_is_not_a_regex_is_refused(tmp_path):
    lora = lora_file(tmp_path, peft(Q, randn(4, 32), randn(64, 4)),
                     peft_metadata(r=4, lora_alpha=8, rank_pattern={"to_q(": 8}))
    assert refused(lora).startswith(f"{lora.label}: metadata 'lora_adapter_metadata' 'unet.rank_pattern': 'to_q(' "
                                    "is not a valid pattern (")


def test_metadata_rank_must_match_the_tensors(tmp_path):
    tensors = {**peft(Q, randn(4, 32), randn(64, 4)), **peft(K, randn(4, 32), randn(64, 4))}
    lora = lora_file(tmp_path, tensors, peft_metadata(r=8, lora_alpha=8))
    # safetensors stores keys sorted: to_k comes before to_q
    assert refused(lora) == (f"{lora.label}: layer 'unet.{K}' has rank 4 (lora_A 4x32) but metadata "
                             "'lora_adapter_metadata' 'unet.r' says 8 (1 more layers disagree likewise)")
    # rank_pattern matches module paths as PEFT does ("to_k" matches "...attn1.to_k"), first pattern wins
    tensors.update(peft(K, randn(2, 32), randn(64, 2)))
    good = peft_metadata(r=4, lora_alpha=8, rank_pattern={"attn1.to_k": 2, "to_k": 16})
    assert check(lora_file(tmp_path, tensors, good, name="pattern.safetensors")) == []
    bad = peft_metadata(r=4, lora_alpha=8, rank_pattern={"to_k": 16, "attn1.to_k": 2})
    lora = lora_file(tmp_path, tensors, bad, name="bad_pattern.safetensors")
    assert refused(lora) == (f"{lora.label}: layer 'unet.{K}' has rank 2 (lora_A 2x32) but metadata "
                             "'lora_adapter_metadata' 'unet.rank_pattern'['to_k'] says 16")


def test_metadata_alpha_must_match_alpha_keys(tmp_path):
    tensors = {**peft(Q, randn(4, 32), randn(64, 4)), f"unet.{Q}.alpha": torch.tensor(4.0)}
    lora = lora_file(tmp_path, tensors, peft_metadata(r=4, lora_alpha=8))
    assert refused(lora) == (f"{lora.label}: layer 'unet.{Q}': its .alpha key says 4 but metadata "
                             "'lora_adapter_metadata' 'unet.lora_alpha' says 8")
    agree = peft_metadata(r=4, lora_alpha=8, alpha_pattern={"attn1.to_q": 4})
    assert check(lora_file(tmp_path, tensors, agree, name="agree.safetensors")) == []
    # an alpha stored in bf16 agrees with the metadata to bf16's precision, no further
    tensors[f"unet.{Q}.alpha"] = torch.tensor(0.1, dtype=torch.bfloat16)
    assert check(lora_file(tmp_path, tensors, peft_metadata(r=4, lora_alpha=0.1), name="bf16.safetensors")) == []
    lora = lora_file(tmp_path, tensors, peft_metadata(r=4, lora_alpha=0.11), name="bf16_off.safetensors")
    assert "its .alpha key says 0.100098 but metadata 'lora_adapter_metadata' 'unet.lora_alpha' says 0.11" in refused(lora)


def test_bare_metadata_from_save_lora_adapter_covers_bare_layers(tmp_path):
    """``model.save_lora_adapter`` writes neither key nor config prefixes."""
    tensors = {f"{Q}.lora_A.weight": randn(4, 32), f"{Q}.lora_B.weight": randn(64, 4)}
    good = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 2, "target_modules": ["to_q"]})}
    assert check(lora_file(tmp_path, tensors, good)) == []
    lora = lora_file(tmp_path, tensors, {"lora_adapter_metadata": json.dumps({"r": 8, "lora_alpha": 2})},
                     name="bad.safetensors")
    assert refused(lora) == (f"{lora.label}: layer '{Q}' has rank 4 (lora_A 4x32) but metadata "
                             "'lora_adapter_metadata' 'r' says 8")


def test_alpha_keys_must_be_one_positive_number(tmp_path):
    base = peft(Q, randn(4, 32), randn(64, 4))
    zero = lora_file(tmp_path, {**base, f"unet.{Q}.alpha": torch.tensor(0.0)}, name="zero.safetensors")
    assert refused(zero) == (f"{zero.label}: layer 'unet.{Q}' has alpha 0 (its .alpha key): the layer would be "
                             "scaled to nothing (kohya reads 0 as alpha = rank, diffusers as scale 0); write the "
                             "alpha you mean")
    negative = lora_file(tmp_path, {**base, f"unet.{Q}.alpha": torch.tensor([-8.0])}, name="neg.safetensors")
    assert refused(negative) == f"{negative.label}: layer 'unet.{Q}' has alpha -8 (its .alpha key): alpha must be positive"
    two = lora_file(tmp_path, {**base, f"unet.{Q}.alpha": torch.tensor([4.0, 4.0])}, name="two.safetensors")
    assert refused(two) == f"{two.label}: 'unet.{Q}.alpha' is 2 of float32; an alpha is a single number"
    one_element = lora_file(tmp_path, {**base, f"unet.{Q}.alpha": torch.tensor([4])}, name="one.safetensors")
    assert check(one_element) == []


KOHYA_Q = "lora_unet_" + Q.replace(".", "_")
KOHYA_K = "lora_unet_" + K.replace(".", "_")  # sorts first: the layer messages name


def kohya(alpha_q=4.0, alpha_k=4.0, rank_k=8):
    tensors = {f"{KOHYA_Q}.lora_down.weight": randn(8, 32), f"{KOHYA_Q}.lora_up.weight": randn(64, 8),
               f"{KOHYA_K}.lora_down.weight": randn(rank_k, 32), f"{KOHYA_K}.lora_up.weight": randn(64, rank_k)}
    for key, alpha in ((KOHYA_Q, alpha_q), (KOHYA_K, alpha_k)):
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return tensors


@pytest.mark.parametrize("metadata, says", [
    ({"ss_network_dim": "16", "ss_network_alpha": "4"},
     f"layer '{KOHYA_K}' has rank 8 (lora_down 8x32) but kohya metadata ss_network_dim says 16"),
    ({"ss_network_dim": "8", "ss_network_alpha": "8.0"},
     f"layer '{KOHYA_K}': its .alpha key says 4 but kohya metadata ss_network_alpha says 8"),
    ({"ss_network_dim": "8", "ss_network_alpha": "0"},
     f"layer '{KOHYA_K}': its .alpha key says 4 but kohya metadata ss_network_alpha says 0 (kohya: alpha = rank)"),
    ({"ss_network_dim": "-8"}, "kohya metadata ss_network_dim says -8: it must be positive"),
    ({"ss_network_dim": "0"}, "kohya metadata ss_network_dim says 0: a rank must be positive"),
    ({"ss_network_alpha": "-1"}, "kohya metadata ss_network_alpha says -1: it must be positive"),
])
def test_kohya_metadata_must_match(metadata, says, tmp_path):
    lora = lora_file(tmp_path, kohya(), {"ss_network_module": "networks.lora", **metadata})
    assert refused(lora) == f"{lora.label}: {says}"


@pytest.mark.parametrize("metadata", [
    {"ss_network_dim": "8", "ss_network_alpha": "4"},
    {"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"},  # resized: per-layer ranks
    {"ss_network_dim": "None", "ss_network_alpha": "None"},
    {"ss_network_dim": "8", "ss_network_alpha": "abc"},  # not a number: not given (no loader reads it)
    # per-block dims or kind-specific dims: ss_network_dim is not every layer's rank
    {"ss_network_dim": "16", "ss_network_alpha": "1", "ss_network_args": json.dumps({"block_dims": "16,8,4"})},
    {"ss_network_dim": "16", "ss_network_alpha": "1", "ss_network_args": json.dumps({"split_qkv": "True"})},
    {"ss_network_dim": "16", "ss_network_alpha": "1", "ss_network_args": "not json"},
    # conv_dim / conv_alpha concern conv layers only
    {"ss_network_dim": "8", "ss_network_alpha": "4", "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "1"})},
])
def test_kohya_metadata_that_is_consistent_or_not_meant_for_every_layer_passes(metadata, tmp_path):
    lora = lora_file(tmp_path, kohya(), {"ss_network_module": "networks.lora", **metadata})
    assert check(lora) == []


def test_kohya_conv_layers_may_have_their_own_rank_and_alpha(tmp_path):
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = {**kohya(), f"{conv}.lora_down.weight": randn(4, 32, 3, 3), f"{conv}.lora_up.weight": randn(32, 4, 1, 1),
               f"{conv}.alpha": torch.tensor(1.0)}
    metadata = {"ss_network_dim": "8", "ss_network_alpha": "4", "ss_network_args": json.dumps({"conv_dim": "4"})}
    assert check(lora_file(tmp_path, tensors, metadata)) == []


def test_kohya_alpha_zero_means_alpha_equals_rank(tmp_path):
    lora = lora_file(tmp_path, kohya(alpha_q=8.0, alpha_k=8.0), {"ss_network_dim": "8", "ss_network_alpha": "0"})
    assert check(lora) == []


def test_kohya_rank_may_be_clamped_to_the_layer_size(tmp_path):
    name = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    tensors = {**kohya(), f"{name}.lora_down.weight": randn(4, 4), f"{name}.lora_up.weight": randn(4, 4),
               f"{name}.alpha": torch.tensor(4.0)}
    assert check(lora_file(tmp_path, tensors, {"ss_network_dim": "8", "ss_network_alpha": "4"})) == []


def test_kohya_alpha_in_metadata_but_not_in_the_tensors(tmp_path):
    lora = lora_file(tmp_path, kohya(alpha_q=None, alpha_k=None), {"ss_network_dim": "8", "ss_network_alpha": "1"})
    assert refused(lora) == (f"{lora.label}: layer '{KOHYA_K}' has no .alpha key, so it loads with alpha = rank = 8, "
                             "but kohya metadata ss_network_alpha says 1")
    agree = lora_file(tmp_path, kohya(alpha_q=None, alpha_k=None), {"ss_network_dim": "8", "ss_network_alpha": "8"},
                      name="agree.safetensors")
    assert check(agree) == []


def test_no_alpha_anywhere_is_a_warning(tmp_path):
    lora = lora_file(tmp_path, peft(Q, randn(4, 32), randn(64, 4)))
    assert check(lora) == [f"{lora.label}: {NO_ALPHA}"]
    kohya_without = lora_file(tmp_path, kohya(alpha_q=None, alpha_k=None), {"ss_network_module": "networks.lora",
                                                                            "ss_network_alpha": "None"},
                              name="kohya.safetensors")
    assert check(kohya_without) == [f"{kohya_without.label}: {NO_ALPHA}"]


def test_some_layers_without_alpha_and_stray_alpha_keys_are_warnings(tmp_path):
    tensors = {**kohya(alpha_k=None), "lora_unet_gone.alpha": torch.tensor(4.0)}
    lora = lora_file(tmp_path, tensors)
    assert check(lora) == [
        f"{lora.label}: 1 of 2 layers have no alpha (no .alpha key, no alpha metadata; e.g. '{KOHYA_K}'): alpha = "
        "rank assumed for them, i.e. scale 1",
        f"{lora.label}: 1 .alpha keys belong to no LoRA layer and are ignored (e.g. 'lora_unet_gone.alpha')"]


def test_alpha_keys_named_after_a_factor_find_their_layer(tmp_path):
    name = f"unet.{Q[:-5]}.processor.to_q"
    tensors = {f"{name}_lora.down.weight": randn(4, 32), f"{name}_lora.up.weight": randn(64, 4),
               f"{name}_lora.down.weight.alpha": torch.tensor(2.0)}
    assert check(lora_file(tmp_path, tensors)) == []


# --- degenerate LoRAs -------------------------------------------------------------

def test_an_all_zero_lora_is_a_warning(tmp_path):
    tensors = {**peft(Q, randn(4, 32), torch.zeros(64, 4)), **peft(K, torch.zeros(4, 32), torch.zeros(64, 4))}
    lora = lora_file(tmp_path, tensors, peft_metadata(r=4, lora_alpha=4))
    assert check(lora) == [f"{lora.label}: every weight delta in this LoRA is zero (2 layers): it changes nothing"]
    assert zero_layers(lora.tensors) == [f"unet.{K}", f"unet.{Q}"]  # in key order


def test_zero_layers_are_counted_and_named(tmp_path):
    names = [f"up_blocks.0.attentions.{i}.transformer_blocks.0.attn1.to_k" for i in range(10)]
    tensors, expected = {}, []
    for i, name in enumerate(names):
        A, B = randn(4, 32, seed=2 * i), randn(48, 4, seed=2 * i + 1)
        if i in (1, 4, 6, 8):
            (A if i == 4 else B).zero_()
            expected.append(f"unet.{name}")
        tensors.update(peft(name, A, B))
    # a bias keeps a layer alive even when B @ A is zero
    tensors[f"unet.{names[0]}.lora_B.weight"] = torch.zeros(48, 4)
    tensors[f"unet.{names[0]}.lora_B.bias"] = randn(48)
    lora = lora_file(tmp_path, tensors, peft_metadata(r=4, lora_alpha=4))
    assert check(lora) == [
        f"{lora.label}: 4 of 10 layers have a zero delta and change nothing (e.g. 'unet.{names[1]}' (lora_B all "
        f"zero), 'unet.{names[4]}' (lora_A all zero), 'unet.{names[6]}' (lora_B all zero) and 1 more)"]
    assert zero_layers(lora.tensors) == expected


def test_zero_layers_after_conversion_to_peft_names(tiny_flux_transformer, tmp_path):
    """Zeros survive diffusers' conversion: a fused kohya qkv with zero q rows zeroes to_q only."""
    from diffusers import FluxPipeline

    from flux_lora_files import KOHYA_DOUBLE, fused_units, write_kohya

    units = fused_units(tiny_flux_transformer, "kohya", rank=4, alpha=4.0, seed=5, keep=lambda n: n != "linear1")
    qkv = next(u for u in units if u.key == "lora_unet_double_blocks_0_img_attn_qkv")
    assert KOHYA_DOUBLE["img_attn_qkv"][0] == "attn.to_q"
    qkv.B[: qkv.B.shape[0] // 3] = 0  # the q rows
    write_kohya(tmp_path / "k.safetensors", units)
    lora = loras.read(tmp_path / "k.safetensors")
    assert check(lora) == []  # the file's layer is not zero...
    converted = FluxPipeline.lora_state_dict(dict(lora.tensors))
    assert zero_layers(converted) == ["transformer.transformer_blocks.0.attn.to_q"]  # ...one of its modules is


# --- every file the project reads today passes --------------------------------------

@pytest.fixture(scope="module")
def tiny_unet():
    """The tiny SDXL UNet of klora.tiny (same layout), built without the rest of the pipeline."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 48), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8)


@pytest.fixture(scope="module")
def tiny_flux_transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))


def _sd_writers():
    from lora_files import sgm_name, write_kohya, write_old_diffusers, write_peft

    return {  # name: (writer, stores an alpha)
        "peft_with_alpha_metadata": (lambda p, layers, cfg: write_peft(p, layers), True),
        "peft_without_metadata": (lambda p, layers, cfg: write_peft(p, layers, with_alpha_metadata=False), False),
        "old_diffusers": (lambda p, layers, cfg: write_old_diffusers(p, layers), False),
        "old_diffusers_with_alpha_keys": (lambda p, layers, cfg: write_old_diffusers(p, layers, with_alpha_keys=True),
                                          True),
        "paper_unet_unet_prefix": (lambda p, layers, cfg: write_old_diffusers(p, layers, prefix="unet.unet"), False),
        "paper_unet_unet_prefix_with_alpha_keys": (
            lambda p, layers, cfg: write_old_diffusers(p, layers, prefix="unet.unet", with_alpha_keys=True), True),
        "kohya_diffusers_names": (lambda p, layers, cfg: write_kohya(p, layers), True),
        "kohya_sgm_names": (lambda p, layers, cfg: write_kohya(p, layers, sgm_name(cfg)), True),
    }


@pytest.mark.parametrize("fmt", ["peft_with_alpha_metadata", "peft_without_metadata", "old_diffusers",
                                 "old_diffusers_with_alpha_keys", "paper_unet_unet_prefix",
                                 "paper_unet_unet_prefix_with_alpha_keys", "kohya_diffusers_names", "kohya_sgm_names"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_sd_format_written_today_passes(fmt, dtype, tiny_unet, tmp_path):
    from lora_files import attention_linears, random_layers

    writer, has_alpha = _sd_writers()[fmt]
    # per-layer ranks and alphas, as in test_loras; formats without alpha mean alpha = rank
    layers = random_layers(tiny_unet, attention_linears(tiny_unet), rank=lambda i: 4 if i % 5 else 8,
                           alpha=lambda i: [2.0, 4.0, 16.0][i % 3], seed=1)
    layers = {k: (A.to(dtype), B.to(dtype), alpha if has_alpha else float(A.shape[0]))
              for k, (A, B, alpha) in layers.items()}
    writer(tmp_path / "c.safetensors", layers, tiny_unet.config)
    lora = loras.read(tmp_path / "c.safetensors", role="content LoRA")
    assert check(lora) == ([] if has_alpha else [f"{lora.label}: {NO_ALPHA}"])


def _flux_layouts():
    from flux_lora_files import ATTENTION, block_linears, diffusers_units, fused_units, write_diffusers, write_kohya, \
        write_xlabs

    not_linear1 = lambda name: name != "linear1"  # noqa: E731 (diffusers hard-codes FLUX.1 sizes for it)
    return {  # name: (writer, units maker, stores an alpha)
        "diffusers_metadata": (write_diffusers, lambda t, dtype: diffusers_units(
            t, block_linears(t), rank=lambda i: 2 + i % 3, alpha=lambda i: 1.0 + i % 4, dtype=dtype), True),
        "diffusers_metadata_and_alpha_keys": (lambda p, u: write_diffusers(p, u, alpha_keys=True),
                                              lambda t, dtype: diffusers_units(t, block_linears(t, ATTENTION), rank=4,
                                                                               alpha=2.0, dtype=dtype), True),
        "ai_toolkit": (lambda p, u: write_diffusers(p, u, metadata=False, alpha_keys=True),
                       lambda t, dtype: diffusers_units(t, block_linears(t, ATTENTION), rank=lambda i: 2 + i % 2,
                                                        alpha=lambda i: 0.5 * (1 + i % 5), dtype=dtype), True),
        "peft_no_alpha": (lambda p, u: write_diffusers(p, u, metadata=False),
                          lambda t, dtype: diffusers_units(t, block_linears(t, ATTENTION), rank=4, dtype=dtype), False),
        "kohya": (write_kohya, lambda t, dtype: fused_units(t, "kohya", rank=4, alpha=2.0, keep=not_linear1,
                                                            dtype=dtype), True),
        "kohya_no_alpha": (write_kohya, lambda t, dtype: fused_units(t, "kohya", rank=4, keep=not_linear1,
                                                                     dtype=dtype), False),
        "xlabs": (write_xlabs, lambda t, dtype: fused_units(t, "xlabs", rank=6, dtype=dtype), False),
    }


@pytest.mark.parametrize("layout", ["diffusers_metadata", "diffusers_metadata_and_alpha_keys", "ai_toolkit",
                                    "peft_no_alpha", "kohya", "kohya_no_alpha", "xlabs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_flux_layout_written_today_passes(layout, dtype, tiny_flux_transformer, tmp_path):
    writer, make, has_alpha = _flux_layouts()[layout]
    writer(tmp_path / "s.safetensors", make(tiny_flux_transformer, dtype))
    lora = loras.read(tmp_path / "s.safetensors", role="style LoRA")
    assert check(lora) == ([] if has_alpha else [f"{lora.label}: {NO_ALPHA}"])


def test_kohya_text_encoder_keys_pass(tiny_unet, tmp_path):
    from lora_files import attention_linears, random_layers, write_kohya

    write_kohya(tmp_path / "c.safetensors", random_layers(tiny_unet, attention_linears(tiny_unet), rank=4, seed=8))
    tensors = load_file(str(tmp_path / "c.safetensors"))
    for encoder, width in (("lora_te1", 32), ("lora_te2", 32)):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            key = f"{encoder}_text_model_encoder_layers_0_self_attn_{proj}"
            tensors[f"{key}.lora_down.weight"] = randn(4, width)
            tensors[f"{key}.lora_up.weight"] = randn(width, 4)
            tensors[f"{key}.alpha"] = torch.tensor(4.0)
    assert check(lora_file(tmp_path, tensors, {"ss_network_module": "networks.lora"}, name="te.safetensors")) == []


def test_demo_loras_pass(tiny_unet, tmp_path):
    from klora.tiny import write_demo_loras

    for path in write_demo_loras(tiny_unet, tmp_path):
        assert check(loras.read(path)) == []


def test_the_trainers_own_files_pass(tiny_unet, tmp_path):
    """klora.training.save_lora: PEFT's full LoraConfig in the metadata, rank_pattern included."""
    import copy

    from peft import LoraConfig

    from klora.training import save_lora

    unet = copy.deepcopy(tiny_unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                rank_pattern={"attn2.to_q": 2}, alpha_pattern={"to_v": 3}))
    untrained = loras.read(save_lora(tmp_path / "untrained", unet))
    # PEFT starts every lora_B at zero: a file saved before training changes nothing
    layers = sum(key.endswith("lora.down.weight") for key in untrained.tensors)
    assert check(untrained) == [f"{untrained.label}: every weight delta in this LoRA is zero ({layers} layers): "
                                "it changes nothing"]
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    trained = loras.read(save_lora(tmp_path / "trained", unet))
    ranks = {re.sub(r"\.lora\.down\.weight$", "", k): v.shape[0] for k, v in trained.tensors.items()
             if k.endswith("lora.down.weight")}
    assert sorted(set(ranks.values())) == [2, 4]  # the rank pattern is really in the file
    assert check(trained) == []
    # the same file with one layer's rank changed in the metadata only is refused
    config = json.loads(trained.metadata["lora_adapter_metadata"])
    config["unet.rank_pattern"] = {"attn2.to_q": 4}
    save_file(dict(trained.tensors), str(tmp_path / "edited.safetensors"),
              metadata={**trained.metadata, "lora_adapter_metadata": json.dumps(config)})
    edited = unchecked(tmp_path / "edited.safetensors", role="LoRA")
    message = refused(edited)
    assert re.fullmatch(re.escape(edited.label) + r": layer 'unet\.[\w.]+\.attn2\.to_q' has rank 2 \(lora\.down 2x\d+\) "
                        r"but metadata 'lora_adapter_metadata' 'unet\.rank_pattern'\['attn2\.to_q'\] says 4"
                        r"( \(\d+ more layers disagree likewise\))?", message), message


def test_read_runs_the_checks(tmp_path):
    """``loras.read`` (what every command line and the library call) refuses and warns like ``check_file``."""
    no_down = tmp_path / "no_down.safetensors"
    save_file({f"unet.{Q}.lora_B.weight": randn(64, 8)}, str(no_down))
    with pytest.raises(loras.LoRAError, match=re.escape(f"layer 'unet.{Q}' has lora_B (64x8) but no lora_A")):
        loras.read(no_down, role="content LoRA")
    plain = tmp_path / "plain.safetensors"
    save_file(peft(Q, randn(8, 32), randn(64, 8, seed=1)), str(plain))
    with pytest.warns(UserWarning, match=re.escape(NO_ALPHA)):
        loras.read(plain, role="content LoRA")
