"""Every LoRA format lands on the right layers with its exact alpha / rank (klora/loras.py).

Ground truth comes from the tensors the test wrote, never from klora's loader.
"""

import copy
import warnings

import pytest
import torch
from safetensors.torch import save_file

from klora import loras
from klora.errors import LoRAError
from klora.fusion import ADAPTER_NAMES, KLoRA
from applied import applied_delta, base_weights
from lora_files import (attention_linears, delta, random_layers, sgm_name, write_kohya, write_old_diffusers,
                        write_peft)


FORMATS = {
    "peft_with_alpha_metadata": lambda p, layers, cfg: write_peft(p, layers),
    "peft_without_metadata": lambda p, layers, cfg: write_peft(p, layers, with_alpha_metadata=False),
    "old_diffusers": lambda p, layers, cfg: write_old_diffusers(p, layers),
    "old_diffusers_with_alpha_keys": lambda p, layers, cfg: write_old_diffusers(p, layers, with_alpha_keys=True),
    "paper_unet_unet_prefix": lambda p, layers, cfg: write_old_diffusers(p, layers, prefix="unet.unet"),
    "kohya_diffusers_names": lambda p, layers, cfg: write_kohya(p, layers),
    "kohya_sgm_names": lambda p, layers, cfg: write_kohya(p, layers, sgm_name(cfg)),
}
# Formats that carry no alpha mean alpha = rank (scale 1), the diffusers convention.
NO_ALPHA = {"peft_without_metadata", "old_diffusers", "paper_unet_unet_prefix"}


@pytest.mark.parametrize("switching", ["fused", "adapters"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_gives_exact_per_layer_deltas(fmt, switching, pipe, tmp_path):
    paths = attention_linears(pipe.unet)
    # Differing alphas and ranks per layer: diffusers alone gets kohya alphas wrong here.
    content = random_layers(pipe.unet, paths, rank=lambda i: 4 if i % 5 else 8,
                            alpha=lambda i: [2.0, 4.0, 16.0][i % 3], seed=1)
    style = random_layers(pipe.unet, paths, rank=8, alpha=lambda i: [8.0, 3.0][i % 2], seed=2)
    if fmt in NO_ALPHA:
        content = {k: (A, B, float(A.shape[0])) for k, (A, B, _) in content.items()}
        style = {k: (A, B, float(A.shape[0])) for k, (A, B, _) in style.items()}
    FORMATS[fmt](tmp_path / "c.safetensors", content, pipe.unet.config)
    FORMATS[fmt](tmp_path / "s.safetensors", style, pipe.unet.config)
    before = base_weights(pipe.unet)
    klora = KLoRA(pipe, tmp_path / "c.safetensors", tmp_path / "s.safetensors", switching=switching)
    assert klora.switching == switching
    assert sorted(klora.paths) == sorted(paths)
    # Fused weights round W0 + dW once in float32: differences of an ulp of W0 (~1e-8) are that rounding.
    atol = 1e-9 if switching == "adapters" else 3e-8
    for role, truth in (("content", content), ("style", style)):
        klora.set_method(role)
        for path in paths:
            got = applied_delta(pipe.unet, path, before, ADAPTER_NAMES[role])
            assert torch.allclose(got, delta(truth[path]), rtol=1e-5, atol=atol), (fmt, path, role)
    klora.detach()


@pytest.mark.parametrize("switching", ["fused", "adapters"])
def test_layer_output_is_base_plus_delta(switching, pipe, tmp_path):
    """One forward through an adapted layer equals x W^T + x dW^T computed by hand."""
    paths = attention_linears(pipe.unet)
    content = random_layers(pipe.unet, paths, rank=4, alpha=2.0, seed=3)
    write_kohya(tmp_path / "c.safetensors", content)
    write_kohya(tmp_path / "s.safetensors", random_layers(pipe.unet, paths, rank=4, seed=4))
    base = copy.deepcopy(dict(pipe.unet.named_modules())[paths[0]])
    klora = KLoRA(pipe, tmp_path / "c.safetensors", tmp_path / "s.safetensors", method="content",
                  switching=switching)
    module = dict(pipe.unet.named_modules())[paths[0]]
    x = torch.randn(3, base.in_features)
    expected = base(x).double() + x.double() @ delta(content[paths[0]]).T
    assert torch.allclose(module(x).double(), expected, atol=1e-5)
    klora.detach()


def _write(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_missing_path_and_pickle_are_refused(tmp_path):
    with pytest.raises(loras.LoRAError, match="no such file"):
        loras.resolve(tmp_path / "nope.safetensors", role="content LoRA")
    pickle = tmp_path / "lora.bin"
    torch.save({"a": torch.zeros(1)}, pickle)
    with pytest.raises(loras.LoRAError, match="pickle"):
        loras.resolve(pickle, role="content LoRA")
    folder = tmp_path / "only_pickle"
    folder.mkdir()
    torch.save({"a": torch.zeros(1)}, folder / "pytorch_lora_weights.bin")
    with pytest.raises(loras.LoRAError, match="pickle"):
        loras.resolve(folder, role="style LoRA")


def test_folder_default_and_weight_name(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    t = {"unet.x.lora_A.weight": torch.zeros(1, 2)}
    _write(folder, "pytorch_lora_weights.safetensors", t)
    _write(folder, "other.safetensors", t)
    assert loras.resolve(folder).name == "pytorch_lora_weights.safetensors"
    assert loras.resolve(folder, "other.safetensors").name == "other.safetensors"
    with pytest.raises(loras.LoRAError, match="has no file 'missing.safetensors'"):
        loras.resolve(folder, "missing.safetensors")


def test_unknown_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(loras.LoRAError, match="hub could not provide"):
        loras.resolve("nobody-here/no-such-lora-xyz", role="content LoRA")


def test_truncated_file_not_a_lora_and_nan_are_refused(pipe, tmp_path):
    good = _write(tmp_path, "good.safetensors", {"unet.a.lora_A.weight": torch.ones(4, 8),
                                                 "unet.a.lora_B.weight": torch.ones(8, 4)})
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(loras.LoRAError, match="truncated or corrupted"):
        loras.load_file(truncated, role="style LoRA")
    checkpoint = _write(tmp_path, "unet.safetensors", {k: v.contiguous() for k, v in
                                                       list(pipe.unet.state_dict().items())[:20]})
    with pytest.raises(loras.LoRAError, match="not a LoRA"):
        loras.load_file(checkpoint, role="content LoRA")
    nan = _write(tmp_path, "nan.safetensors", {"unet.a.lora_A.weight": torch.tensor([[float("nan")]]),
                                               "unet.a.lora_B.weight": torch.ones(1, 1)})
    with pytest.raises(loras.LoRAError, match="NaN or Inf"):
        loras.load_file(nan, role="content LoRA")


def test_lora_for_another_architecture_is_refused_and_model_untouched(pipe, tiny_sd_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    sd_unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    sd15 = random_layers(sd_unet, attention_linears(sd_unet), rank=4, seed=5)
    write_peft(tmp_path / "sd15.safetensors", sd15)
    sdxl = random_layers(pipe.unet, attention_linears(pipe.unet), rank=4, seed=6)
    write_peft(tmp_path / "sdxl.safetensors", sdxl)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(loras.LoRAError, match="another base model"):
        KLoRA(pipe, tmp_path / "sdxl.safetensors", tmp_path / "sd15.safetensors")
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lora_whose_layers_do_not_exist(pipe, tmp_path):
    path = _write(tmp_path, "bogus.safetensors", {"unet.no.such.layer.lora_A.weight": torch.ones(4, 8),
                                                  "unet.no.such.layer.lora_B.weight": torch.ones(8, 4)})
    good = random_layers(pipe.unet, attention_linears(pipe.unet), rank=4, seed=7)
    write_peft(tmp_path / "good.safetensors", good)
    with pytest.raises(loras.LoRAError, match="none of its 1 layers exist"):
        KLoRA(pipe, path, tmp_path / "good.safetensors")


def test_text_encoder_weights_are_reported_not_applied(pipe, tmp_path):
    paths = attention_linears(pipe.unet)
    write_kohya(tmp_path / "c.safetensors", random_layers(pipe.unet, paths, rank=4, seed=8))
    tensors = {}
    from safetensors.torch import load_file

    tensors.update(load_file(tmp_path / "c.safetensors"))
    attention = pipe.text_encoder.encoder.layers[0].self_attn
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        linear = getattr(attention, proj)
        key = f"lora_te1_text_model_encoder_layers_0_self_attn_{proj}"
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, linear.in_features)
        tensors[f"{key}.lora_up.weight"] = torch.randn(linear.out_features, 4)
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(tmp_path / "c_te.safetensors"))
    write_kohya(tmp_path / "s.safetensors", random_layers(pipe.unet, paths, rank=4, seed=9))

    ids = pipe.tokenizer("a dog", return_tensors="pt").input_ids
    base = pipe.text_encoder(ids)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        klora = KLoRA(pipe, tmp_path / "c_te.safetensors", tmp_path / "s.safetensors")
    assert any("text-encoder weights; they are not applied" in str(w.message) for w in caught)
    assert torch.equal(pipe.text_encoder(ids)[0], base)
    klora.detach()

    klora = KLoRA(pipe, tmp_path / "c_te.safetensors", tmp_path / "s.safetensors", text_encoder_lora=True)
    assert not torch.allclose(pipe.text_encoder(ids)[0], base)
    klora.detach()
    assert torch.equal(pipe.text_encoder(ids)[0], base)


def test_a_device_is_refused_as_not_a_regular_file(tmp_path):
    """/dev/zero exists and is no file or folder: reading it would never end. One line, no read."""
    import os

    from conftest import run_script

    with pytest.raises(LoRAError, match=r"^content LoRA '/dev/zero': not a regular file"):
        loras.resolve("/dev/zero", role="content LoRA")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(LoRAError, match="not a regular file"):
        loras.resolve(fifo, role="style LoRA")
    result = run_script("inference_sd.py", "--pretrained_model_name_or_path", "world/sdxl",
                        "--lora_name_or_path_content", "world/loras/sbu.safetensors", "--lora_name_or_path_style",
                        "/dev/zero", "--prompt", "a sbu toy", "--output_folder", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: style LoRA '/dev/zero': not a regular file (a device or pipe?); "
                                     "give a .safetensors file")
