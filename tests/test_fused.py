"""Fused switching (``KLoRA(..., switching="fused")``, the default) on the tiny SDXL and FLUX, CPU.

In fused mode a layer's weight holds ``W0 + delta`` of the LoRA chosen for the step,
rewritten in place from an exact copy of ``W0``. The checks compare against things
K-LoRA does not compute itself: the adapter path (PEFT ``set_adapter``), a freshly
attached K-LoRA on a second copy of the pipeline, ``W0 + B @ A`` from the LoRA files,
the weights before attaching, and the layer choices read back from the selection log.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from klora import fusion
from klora.fusion import METHODS, KLoRA
from klora.methods import PER_STEP
from klora.tiny import write_demo_loras

# Content on q/k/v, style on k/v/out: k and v are shared (K-LoRA chooses there every step),
# q has only the content LoRA and out only the style LoRA (merged once).
CONTENT_PROJECTIONS = ("to_q", "to_k", "to_v")
STYLE_PROJECTIONS = ("to_k", "to_v", "to_out.0")
CALL_KWARGS = {"sdxl": {"guidance_scale": 5.0},  # CFG: one UNet call of batch 2 per step
               "flux": {"max_sequence_length": 16}}
SCALE_ARGUMENT = {"sdxl": "cross_attention_kwargs", "flux": "joint_attention_kwargs"}


def _load(family, folder):
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    pipe = (StableDiffusionXLPipeline if family == "sdxl" else FluxPipeline).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def _write_pair(denoiser, folder):
    """(content, style) files: content on q/k/v, style on k/v/out, magnitudes tilted in opposite
    directions through the network so each LoRA wins somewhere."""
    content, _ = write_demo_loras(denoiser, folder / "c", projections=CONTENT_PROJECTIONS, seed=1)
    _, style = write_demo_loras(denoiser, folder / "s", projections=STYLE_PROJECTIONS, seed=2)
    return content, style


@pytest.fixture(scope="module")
def model_and_loras(tiny_sdxl_dir, tiny_flux_dir, tmp_path_factory):
    """{family: (model folder, content file, style file)}."""
    out = {}
    for family, folder in (("sdxl", tiny_sdxl_dir), ("flux", tiny_flux_dir)):
        files = tmp_path_factory.mktemp(f"fused-loras-{family}")
        for sub in ("c", "s"):
            (files / sub).mkdir()
        out[family] = (folder, *_write_pair(_denoiser(_load(family, folder)), files))
    return out


def _file_layers(path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A, B)} straight from a file written by write_demo_loras (alpha = rank: scale 1)."""
    tensors = load_file(str(path))
    layers = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            module = key.split(".", 1)[1].removesuffix(".lora_A.weight")
            layers[module] = (tensors[key], tensors[key.replace("lora_A", "lora_B")])
    return layers


def _generate(pipe, family, steps=6, size=32, seed=0, output_type="np", **kwargs):
    kwargs = {**CALL_KWARGS[family], **kwargs}
    return pipe("a sbu dog", num_inference_steps=steps, height=size, width=size,
                output_type=output_type, generator=torch.Generator().manual_seed(seed), **kwargs).images


def _state(module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _differing(a: dict, b: dict) -> list[str]:
    """Names whose tensors are not bit-identical (or present on one side only)."""
    names = sorted(set(a) | set(b))
    return [n for n in names if n not in a or n not in b or not torch.equal(a[n], b[n])]


def _weight(denoiser, path):
    module = dict(denoiser.named_modules())[path]
    return getattr(module, "base_layer", module).weight


def _without_switching(log: dict) -> dict:
    return {key: value for key, value in log.items() if key != "switching"}


class WriteRecorder:
    """Counts fused writes, per denoising step, from outside K-LoRA's bookkeeping:
    ``fusion._Tensor.write`` calls (one per parameter rewritten: here a layer's weight) and the layers
    handed to the weight writer.
    ``callback`` (pass as callback_on_step_end) moves the step counter after each step."""

    def __init__(self, klora, monkeypatch):
        self.step = 0
        self.keys: list[tuple[int, str]] = []  # (step, layer key) per layer the switch is asked to show
        self.writes: list[int] = []  # the step of every fusion._Tensor.write call
        show, write = klora._weights.show, fusion._Tensor.write

        def recording_show(changes):
            changes = list(changes)
            self.keys += [(self.step, layer.key) for layer, _ in changes]
            return show(changes)

        def counting_write(*args, **kwargs):
            self.writes.append(self.step)
            return write(*args, **kwargs)

        monkeypatch.setattr(klora._weights, "show", recording_show)
        monkeypatch.setattr(fusion._Tensor, "write", counting_write)

    def callback(self, pipe, step, timestep, callback_kwargs):
        self.step = step + 1
        return {}

    def reset(self):
        self.step = 0
        self.keys, self.writes = [], []


def _changes_per_step(log_steps, before: dict) -> list[set]:
    """The layers whose choice differs from the step before (``before``: the choices in force
    when the generation starts), recomputed from the selection log."""
    changes = []
    for entry in log_steps:
        changes.append({key for key, role in entry["choices"].items() if before[key] != role})
        before = entry["choices"]
    return changes


# ----------------------------------------------------------------- exactness


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_fused_selection_log_equals_adapters_and_images_within_fp32_noise(model_and_loras, family):
    folder, content, style = model_and_loras[family]
    pipe = _load(family, folder)
    logs, images = {}, {}
    for switching in ("fused", "adapters"):
        klora = KLoRA(pipe, content, style, pattern="s*", switching=switching)
        assert klora.switching == switching
        first = _generate(pipe, family, steps=6)
        klora.set_schedule("s", alpha=2.0)
        second = _generate(pipe, family, steps=5, seed=3)
        logs[switching], images[switching] = klora.selection_log(), np.concatenate([first, second])
        klora.detach()

    assert _without_switching(logs["fused"]) == _without_switching(logs["adapters"])
    # The test means something only if layers switch during a generation.
    steps = logs["fused"]["generations"][0]["steps"]
    assert any(a["choices"] != b["choices"] for a, b in zip(steps, steps[1:]))
    # Measured: 7.2e-7 (SDXL and FLUX) on pixels in [0, 1] with a spread of 0.15.
    assert np.abs(images["fused"] - images["adapters"]).max() < 1e-5


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_hundred_generations_leave_weights_bit_identical_to_a_fresh_attach(model_and_loras, family):
    folder, content, style = model_and_loras[family]
    pipe, copy = _load(family, folder), _load(family, folder)
    denoiser, fresh_denoiser = _denoiser(pipe), _denoiser(copy)
    original = _state(denoiser)
    assert not _differing(original, _state(fresh_denoiser))

    klora = KLoRA(pipe, content, style)
    rng = random.Random(0)
    chosen = []
    for _ in range(100):
        method = rng.choice(METHODS + ("klora", "klora"))
        chosen.append(method)
        klora.set_schedule(rng.choice(["s", "s*"]), alpha=rng.choice([0.8, 1.5, 2.5]),
                           beta=rng.choice([None, 0.3, 1.0]))
        klora.set_method(method)
        scale = rng.choice([None, 0.5, 1.3])
        extra = {} if scale is None else {SCALE_ARGUMENT[family]: {"scale": scale}}
        _generate(pipe, family, steps=rng.choice([1, 2]), seed=rng.randrange(99), output_type="latent", **extra)
    assert set(chosen) == set(METHODS)
    assert len(klora.generations) == min(sum(m in PER_STEP for m in chosen), 64)  # the runs that chose per step

    _generate(pipe, family, steps=1, output_type="latent")  # back to LoRA scale 1, as a fresh attach has
    for method, schedule in (("klora", ("s*", 1.5, None)), ("klora", ("s", 2.5, 0.3)), ("merge", ("s*", 1.5, None)),
                             ("content", ("s*", 1.5, None)), ("style", ("s*", 1.5, None)), ("np", ("s*", 1.5, None)),
                             ("est", ("s", 1.5, 0.3)), ("switch", ("s*", 1.5, None))):
        klora.set_schedule(*schedule)
        klora.set_method(method)
        fresh = KLoRA(copy, content, style, method=method, pattern=schedule[0], alpha=schedule[1], beta=schedule[2])
        assert not _differing(_state(denoiser), _state(fresh_denoiser)), (method, schedule)
        if method == "klora" and schedule[0] == "s":  # and after one more generation on both
            extra = {SCALE_ARGUMENT[family]: {"scale": 0.7}}
            _generate(pipe, family, steps=3, output_type="latent", **extra)
            _generate(copy, family, steps=3, output_type="latent", **extra)
            assert not _differing(_state(denoiser), _state(fresh_denoiser))
            _generate(pipe, family, steps=1, output_type="latent")
            _generate(copy, family, steps=1, output_type="latent")
        fresh.detach()
        assert not _differing(original, _state(fresh_denoiser))

    klora.detach()
    assert not _differing(original, _state(denoiser))


def test_bf16_switches_never_drift_while_peft_merge_unmerge_does(model_and_loras):
    folder, content, style = model_and_loras["sdxl"]
    pipe = _load("sdxl", folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers: "modules that should be kept in float32: []"
        pipe.to(torch.bfloat16)
    unet = pipe.unet
    original = _state(unet)

    klora = KLoRA(pipe, content, style, method="content")
    snapshots = {}
    for method in ("content", "style", "merge", "klora"):
        klora.set_method(method)
        snapshots[method] = _state(unet)
    assert _differing(snapshots["content"], snapshots["style"])
    rng = random.Random(1)
    for _ in range(40):
        klora.set_schedule(rng.choice(["s", "s*"]), alpha=rng.choice([0.8, 1.5, 2.5]))
        klora.set_method(rng.choice(METHODS))
        if rng.random() < 0.5:
            scale = rng.choice([0.5, 1.0, 1.3])
            _generate(pipe, "sdxl", steps=2, output_type="latent", cross_attention_kwargs={"scale": scale})
    _generate(pipe, "sdxl", steps=1, output_type="latent")  # LoRA scale back to 1
    klora.set_schedule("s*", alpha=1.5)
    for method in ("content", "style", "merge", "klora", "content"):
        klora.set_method(method)
        assert not _differing(snapshots[method], _state(unet)), method
    klora.detach()
    assert not _differing(original, _state(unet))

    # The contrast: PEFT's merge then unmerge (delta added, then subtracted, in bf16) does not
    # come back to the base weights. Measured: all 64 adapted layers off, by up to 1e-2, after 20 cycles.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Already found a peft_config", "Already unmerged"
        unet.load_lora_adapter(str(content), adapter_name="c", prefix="unet")
        unet.load_lora_adapter(str(style), adapter_name="s", prefix="unet")
        for cycle in range(20):
            name = ["c", "s"][cycle % 2]
            unet.set_adapters([name])
            unet.fuse_lora(adapter_names=[name])
            unet.unfuse_lora()
    base = {n.replace(".base_layer", ""): t for n, t in unet.state_dict().items() if "lora_" not in n}
    assert len(_differing(original, base)) >= 10
    unet.unload_lora()


def test_weight_copy_size_and_single_lora_layers_merged_once(model_and_loras, monkeypatch):
    folder, content, style = model_and_loras["sdxl"]
    pipe = _load("sdxl", folder)
    unet = pipe.unet
    before = _state(unet)
    content_layers, style_layers = _file_layers(content), _file_layers(style)
    shared = sorted(set(content_layers) & set(style_layers))
    single = sorted(set(content_layers) ^ set(style_layers))
    nbytes = {path: _weight(unet, path).numel() * _weight(unet, path).element_size() for path in content_layers}
    nbytes.update({path: _weight(unet, path).numel() * _weight(unet, path).element_size() for path in style_layers})

    klora = KLoRA(pipe, content, style, pattern="s*")
    assert sorted(klora.paths) == shared and sorted(klora.only) == single
    # On the CPU every copy is in host memory: those of the switching layers, and those of the
    # single-LoRA layers (kept for detach() and method changes). On a GPU the first kind stays on
    # the GPU, the second on the host (test_weight_copy_splits_between_gpu_and_host_on_cuda).
    assert klora.memory() == {"cpu": sum(nbytes[p] for p in shared) + sum(nbytes[p] for p in single)}

    def expected(path, roles):
        weight = before[f"{path}.weight"].double()
        for role in roles:
            A, B = (content_layers if role == "content" else style_layers)[path]
            weight = weight + B.double() @ A.double()
        return weight

    for path in single:  # W0 + the one LoRA's delta, from the moment of attaching
        role = "content" if path in content_layers else "style"
        torch.testing.assert_close(_weight(unet, path).double(), expected(path, [role]), rtol=0, atol=1e-6)
        assert not torch.equal(_weight(unet, path), before[f"{path}.weight"])
    merged_once = {path: _weight(unet, path).clone() for path in single}

    recorder = WriteRecorder(klora, monkeypatch)
    _generate(pipe, "sdxl", steps=8, callback_on_step_end=recorder.callback)
    written = {key for _, key in recorder.keys}
    assert written and written <= set(shared)  # layers switched, single-LoRA ones never
    assert all(torch.equal(_weight(unet, p), merged_once[p]) for p in single)
    last = klora.selection_log()["generations"][-1]["steps"][-1]["choices"]
    for path in shared:  # W0 + the delta of the LoRA the log names for the last step
        torch.testing.assert_close(_weight(unet, path).double(), expected(path, [last[path]]), rtol=0, atol=1e-6)
    klora.detach()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_weight_copy_splits_between_gpu_and_host_on_cuda(model_and_loras):
    folder, content, style = model_and_loras["sdxl"]
    pipe = _load("sdxl", folder).to("cuda")
    unet = pipe.unet
    before = _state(unet)
    content_layers, style_layers = _file_layers(content), _file_layers(style)

    def size(paths):
        return sum(_weight(unet, p).numel() * _weight(unet, p).element_size() for p in paths)

    klora = KLoRA(pipe, content, style)
    device = str(_weight(unet, klora.paths[0]).device)
    assert klora.memory() == {device: size(set(content_layers) & set(style_layers)),
                              "cpu": size(set(content_layers) ^ set(style_layers))}
    _generate(pipe, "sdxl", steps=4)
    klora.detach()
    assert not _differing(before, _state(unet))


# ------------------------------------------------------------------ fallback


class Linear8bitLt(torch.nn.Linear):
    """Stands in for a quantized layer class (bitsandbytes' name): PEFT adapters work on it,
    K-LoRA must not write into its weight."""


@pytest.mark.parametrize("kind", ["quantized class", "int8 weight"])
def test_quantized_like_layer_falls_back_to_adapters_with_one_warning(model_and_loras, kind):
    folder, content, style = model_and_loras["sdxl"]
    pipe = _load("sdxl", folder)
    modules = dict(pipe.unet.named_modules())
    path = next(p for p in modules if p.endswith("attn1.to_k"))  # a layer both LoRAs adapt
    linear = modules[path]
    if kind == "quantized class":
        replacement = Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None)
        replacement.load_state_dict(linear.state_dict())
        parent, _, child = path.rpartition(".")
        setattr(modules[parent], child, replacement)
    else:
        linear.weight = torch.nn.Parameter(linear.weight.detach().round().to(torch.int8), requires_grad=False)
    before = _state(pipe.unet)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        klora = KLoRA(pipe, content, style)
    assert klora.switching == "adapters"
    fallback = [str(w.message) for w in caught if "fused" in str(w.message)]
    assert len(fallback) == 1 and "\n" not in fallback[0], fallback
    assert path in fallback[0] and "adapters" in fallback[0]
    if kind == "quantized class":  # the same images as adapter switching on the unmodified model
        image = _generate(pipe, "sdxl", steps=4)
        plain = _load("sdxl", folder)
        reference = KLoRA(plain, content, style, switching="adapters")
        assert np.abs(image - _generate(plain, "sdxl", steps=4)).max() < 1e-6
        assert klora.selection_log()["generations"] == reference.selection_log()["generations"]
        reference.detach()
    klora.detach()
    assert type(dict(pipe.unet.named_modules())[path]) is type(replacement if kind == "quantized class" else linear)
    assert not _differing(before, _state(pipe.unet))


@pytest.mark.parametrize("order", ["attach, then offload", "offload, then attach"])
def test_sequential_cpu_offload_writes_into_the_offloaded_copy(model_and_loras, order):
    from accelerate import cpu_offload

    folder, content, style = model_and_loras["sdxl"]
    plain = _load("sdxl", folder)
    reference = KLoRA(plain, content, style)
    expected = _generate(plain, "sdxl", steps=6)
    reference.detach()

    pipe = _load("sdxl", folder)
    original = _state(pipe.unet)
    if order == "attach, then offload":
        klora = KLoRA(pipe, content, style)
        cpu_offload(pipe.unet, torch.device("cpu"), offload_buffers=True)
    else:
        cpu_offload(pipe.unet, torch.device("cpu"), offload_buffers=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            klora = KLoRA(pipe, content, style)
    assert klora.switching == "fused"
    path = klora.paths[0]
    module = dict(pipe.unet.named_modules())[path]
    assert module.weight.device.type == "meta"
    offloaded = module._hf_hook.weights_map["weight"]  # what the offload hook loads for each call
    assert not torch.equal(offloaded, original[f"{path}.weight"])  # holds W0 + delta

    assert np.abs(_generate(pipe, "sdxl", steps=6) - expected).max() < 1e-6
    assert klora.selection_log()["generations"] == reference.selection_log()["generations"]
    klora.detach()
    restored = {name: module._hf_hook.weights_map["weight"] for name, module in pipe.unet.named_modules()
                if getattr(module, "_hf_hook", None) is not None and f"{name}.weight" in original
                and name in set(_file_layers(content)) | set(_file_layers(style))}
    assert len(restored) == len(set(_file_layers(content)) | set(_file_layers(style)))
    assert all(torch.equal(tensor, original[f"{name}.weight"]) for name, tensor in restored.items())


# -------------------------------------------------------- what a switch costs


def test_method_and_schedule_changes_reload_nothing_and_write_only_changed_layers(model_and_loras, monkeypatch):
    import safetensors
    import safetensors.torch
    from diffusers.loaders.peft import PeftAdapterMixin

    from klora import loras

    folder, content, style = model_and_loras["sdxl"]
    pipe = _load("sdxl", folder)
    klora = KLoRA(pipe, content, style)  # method klora: the choice at p = 0 is applied
    loads = []
    for owner, name in ((loras, "read"), (loras, "load_file"), (loras, "to_denoiser_adapter"),
                        (loras, "load_adapter"), (safetensors.torch, "load_file"), (safetensors, "safe_open"),
                        (PeftAdapterMixin, "load_lora_adapter")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _f=original, _n=name, **k: loads.append(_n) or _f(*a, **k))
    recorder = WriteRecorder(klora, monkeypatch)

    content_layers, style_layers = set(_file_layers(content)), set(_file_layers(style))
    everything = sorted(content_layers | style_layers)

    def roles_for(method):
        """{layer: LoRAs it applies} for a method, from the files (klora: the choice at p = 0)."""
        if method == "klora":
            chosen = klora.choices_at(0.0)
            return {p: {chosen[p]} if p in chosen else {"content" if p in content_layers else "style"}
                    for p in everything}
        return {p: {r for r, layers in (("content", content_layers), ("style", style_layers))
                    if p in layers and method in ("merge", r)} for p in everything}

    now = roles_for("klora")
    for method in ("content", "style", "merge", "klora", "klora", "style", "content"):
        recorder.reset()
        klora.set_method(method)
        wanted = roles_for(method)
        changed = [p for p in everything if wanted[p] != now[p]]
        assert sorted(key for _, key in recorder.keys) == changed, method
        assert len(recorder.writes) == len(changed)
        now = wanted
    for method in ("style", "content"):  # a method that chooses nothing per step runs without a single write
        klora.set_method(method)
        recorder.reset()
        _generate(pipe, "sdxl", steps=4)
        assert recorder.writes == []

    klora.set_method("klora")
    recorder.reset()
    for pattern, alpha, beta in (("s", 1.5, None), ("s*", 2.5, 0.2), ("s", 0.9, 1.0)):
        klora.set_schedule(pattern, alpha, beta)
    assert recorder.writes == []  # a schedule change writes nothing until the next step needs it
    _generate(pipe, "sdxl", steps=4)
    assert loads == []


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_writes_per_step_equal_the_choice_changes_in_the_log(model_and_loras, family, monkeypatch):
    """The per-step cost without timing anything: a step rewrites exactly the layers whose
    choice changed since the step before, and a step where nothing changes writes nothing."""
    folder, content, style = model_and_loras[family]
    pipe = _load(family, folder)
    klora = KLoRA(pipe, content, style, pattern="s*")
    recorder = WriteRecorder(klora, monkeypatch)
    before = klora.choices_at(0.0)  # in force since attaching
    quiet_steps = 0
    for steps, seed, schedule in ((8, 0, ("s*", 1.5, None)), (7, 1, ("s", 2.0, None)), (8, 2, ("s*", 1.0, 0.2))):
        klora.set_schedule(*schedule)
        recorder.reset()
        _generate(pipe, family, steps=steps, seed=seed, callback_on_step_end=recorder.callback)
        log = klora.selection_log()["generations"][-1]["steps"]
        assert [entry["step"] for entry in log] == list(range(steps))
        changes = _changes_per_step(log, before)
        for step in range(steps):
            keys = sorted(key for s, key in recorder.keys if s == step)
            assert keys == sorted(changes[step]), (steps, step)
            assert recorder.writes.count(step) == len(changes[step])
        quiet_steps += sum(1 for c in changes if not c)
        before = log[-1]["choices"]
        assert len(recorder.writes) == sum(len(c) for c in changes) > 0
    assert quiet_steps > 0  # steps without any change were seen, and cost no write
    klora.detach()
