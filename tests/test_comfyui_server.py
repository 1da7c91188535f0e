"""K-LoRA in a real ComfyUI server, end to end over HTTP.

ComfyUI's own ``main.py --cpu`` is started once for this module, on 127.0.0.1, with this repository
linked into ``custom_nodes/`` as users install it, tiny Wan files in ``models/diffusion_models/``
(loaded by the real ``UNETLoader``), LoRA files in ``models/loras/`` and the test-only conditioning
node of ``tests/comfy_test_nodes`` (text encoders have fixed, large configs). Workflows go in with
``POST /prompt`` and come back through ``/history/<id>``; latents are read from what ``SaveLatent``
wrote into the server's output folder, pictures through ``GET /view``.

Run with ``COMFYUI_PATH`` set to a ComfyUI checkout (0.3.64 tested) and a Python that has ComfyUI's
requirements; without it every test here is skipped with a reason that says so.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from comfy_models import why_not_available

_REASON = why_not_available()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

import comfy_lora_files as files  # noqa: E402
import comfy_models as cm  # noqa: E402
import comfy_server as cs  # noqa: E402

comfy = cm.comfyui()
import comfy_test_nodes  # noqa: E402
import nodes as comfy_nodes  # noqa: E402  (ComfyUI's nodes.py: the in-process reference runs its samplers)
from comfy_extras.nodes_model_advanced import ModelSamplingSD3  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from klora import comfyui as kc  # noqa: E402

pytestmark = pytest.mark.slow
ATTENTION = r"_attn\.[qkvo]\.weight$"  # Wan's self- and cross-attention q, k, v, o
POSITIVE, NEGATIVE = "a sbu dog in szn style", "blurry"
LATENT = {"width": 64, "height": 64, "length": 5, "batch_size": 1}  # 2 latent frames of 8 x 8
NOT_LOADED = "lora key not loaded"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server, its tiny Wan files ({name: (tiny, path)}) and LoRA pairs ({name: (content, style layers)})."""
    before = cs.checkout_state(cm.checkout())
    server = cs.Server(tmp_path_factory.mktemp("comfyui"))
    models = {}
    for name, seed in (("wan_tiny.safetensors", 0), ("wan22_high.safetensors", 0), ("wan22_low.safetensors", 1)):
        path = server.diffusion_models / name
        models[name] = (cs.write_wan_file(path, seed), path)
    pairs = {}
    tiny = models["wan_tiny.safetensors"][0]
    for prefix, seed in (("", 1), ("high_", 11), ("low_", 21)):
        pairs[prefix] = lora_pair(tiny, server.loras, prefix, seed)
    server.start()
    try:
        yield server, models, pairs
    finally:
        server.stop()
        assert cs.checkout_state(cm.checkout()) == before, "the server wrote into the ComfyUI checkout"


def lora_pair(tiny, folder, prefix, seed):
    """Content and style LoRAs on Wan's attention (ComfyUI's names, .alpha keys), and the content LoRA again
    in diffusers' PEFT layout with its alpha in the metadata (names ComfyUI's own loader does not map)."""
    chosen = files.targets(tiny.model, ATTENTION)
    content = files.random_layers(tiny.model, chosen, rank=4, alpha=lambda i: 2.0 + i % 3, seed=seed)
    style = files.random_layers(tiny.model, chosen, rank=8, alpha=lambda i: 4.0 + i % 5, seed=seed + 1, scale=0.07)
    files.write(folder / f"{prefix}content.safetensors", content, files.names_comfy(content))
    files.write(folder / f"{prefix}style.safetensors", style, files.names_comfy(style))
    files.write(folder / f"{prefix}content_peft.safetensors", content, files.names_wan_diffusers(content),
                style="lora_A", alpha_in="metadata")
    return content, style


# --- workflows, as API-format dicts ------------------------------------------------------------

def klora(model, content="content.safetensors", style="style.safetensors", *, pattern="s", method="klora",
          progress="steps", log=""):
    return {"class_type": "KLoRALoader", "inputs": {
        "model": model, "content_lora": content, "style_lora": style, "pattern": pattern, "alpha": 1.5,
        "beta": -1.0, "method": method, "progress": progress, "selection_log": log}}


def ksampler(model, seed=3, steps=4):
    return {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": steps, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}


def base(unet="wan_tiny.safetensors") -> dict:
    """The nodes every workflow here starts from: a tiny Wan, its prompts and an empty video latent."""
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "pos": {"class_type": "KLoRATestConditioning", "inputs": {"family": "wan", "text": POSITIVE}},
        "neg": {"class_type": "KLoRATestConditioning", "inputs": {"family": "wan", "text": NEGATIVE}},
        "latent": {"class_type": "EmptyHunyuanLatentVideo", "inputs": dict(LATENT)},
    }


def save_latent(samples, prefix):
    return {"class_type": "SaveLatent", "inputs": {"samples": samples, "filename_prefix": prefix}}


def saved_latent(server, entry, node) -> torch.Tensor:
    (saved,) = entry["outputs"][node]["latents"]
    return load_file(str(server.output / saved["subfolder"] / saved["filename"]))["latent_tensor"]


def selection_log(server, prefix) -> dict:
    (path,) = sorted(server.output.glob(f"{prefix}_*_.json"))
    return json.loads(path.read_text())


def no_unloaded_keys(server):
    text = server.log_text()
    assert NOT_LOADED not in text, [line for line in text.splitlines() if NOT_LOADED in line][:3]


# --- the in-process reference --------------------------------------------------------------------

def reference_model(path):
    return comfy.sd.load_diffusion_model(str(path))


def reference_sample(model, latent, steps=4, seed=3, **advanced):
    """The latent ComfyUI's own KSampler (or KSamplerAdvanced with ``advanced``) gives in this process."""
    positive = comfy_test_nodes.conditioning("wan", POSITIVE)
    negative = comfy_test_nodes.conditioning("wan", NEGATIVE)
    with torch.inference_mode():
        if advanced:
            (out,) = comfy_nodes.KSamplerAdvanced().sample(model, noise_seed=seed, steps=steps, cfg=3.0,
                                                            sampler_name="euler", scheduler="simple",
                                                            positive=positive, negative=negative,
                                                            latent_image=latent, **advanced)
        else:
            (out,) = comfy_nodes.KSampler().sample(model, seed, steps, 3.0, "euler", "simple", positive, negative,
                                                   latent)
    return out


def empty_latent():
    frames = (LATENT["length"] - 1) // 4 + 1
    return {"samples": torch.zeros(1, 16, frames, LATENT["height"] // 8, LATENT["width"] // 8)}


# --- the tests -------------------------------------------------------------------------------------

def test_one_ksampler_equals_the_in_process_run_and_logs_the_rules_choices(server):
    server, models, pairs = server
    workflow = base()
    workflow.update({
        "klora": klora(["unet", 0], log="e2e/one"),
        "sample": ksampler(["klora", 0]),
        "save": save_latent(["sample", 0], "e2e/klora"),
        # method=content on the PEFT/diffusers file, next to ComfyUI's own loader on ComfyUI's names
        "content": klora(["unet", 0], "content_peft.safetensors", method="content"),
        "sample_content": ksampler(["content", 0]),
        "save_content": save_latent(["sample_content", 0], "e2e/content"),
        "loader": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["unet", 0], "lora_name": "content.safetensors", "strength_model": 1.0}},
        "sample_loader": ksampler(["loader", 0]),
        "save_loader": save_latent(["sample_loader", 0], "e2e/loader"),
    })
    entry = server.run(workflow)
    ours = saved_latent(server, entry, "save")

    model = reference_model(models["wan_tiny.safetensors"][1])
    expected = reference_sample(kc.apply(model, server.loras / "content.safetensors",
                                         server.loras / "style.safetensors", pattern="s"), empty_latent())
    assert ours.shape == expected["samples"].shape == (1, 16, 2, 8, 8)
    assert float((ours - expected["samples"]).abs().max()) <= 1e-5
    content_run, loader_run = saved_latent(server, entry, "save_content"), saved_latent(server, entry, "save_loader")
    assert float((content_run - loader_run).abs().max()) <= 1e-5
    assert float((content_run - ours).abs().max()) > 1e-3, "K-LoRA should differ from the content LoRA alone"

    log = selection_log(server, "e2e/one")
    content, style = pairs[""]
    stats = files.pair_stats(content, style, lambda layer: False)
    gamma = files.expected_gamma([s["ratio"] for s in stats.values()])
    assert log["pattern"] == "s" and log["beta"] == 0.5 and log["progress"] == "steps"
    assert log["content"] == "content LoRA 'content.safetensors'" and log["style"] == "style LoRA 'style.safetensors'"
    assert set(log["layers"]) == set(stats) and math.isclose(log["gamma"], gamma, rel_tol=1e-5)
    (generation,) = log["generations"]
    assert [s["step"] for s in generation["steps"]] == [0, 1, 2, 3]
    used = set()
    for step in generation["steps"]:
        scale = files.expected_scale(step["progress"], "s", 1.5, 0.5)
        assert step["choices"] == {key: files.expected_choice(s, gamma, scale) for key, s in stats.items()}
        used |= set(step["choices"].values())
    assert used == {"content", "style"}, "the pair should use both LoRAs during the run"
    no_unloaded_keys(server)


def test_wan22_experts_with_percent_progress_continue_across_two_ksampler_advanced(server):
    server, models, pairs = server
    steps, switch = 4, 2
    workflow = base()
    del workflow["unet"]
    for expert, first, last in (("high", 0, switch), ("low", switch, 10000)):
        workflow[f"unet_{expert}"] = {"class_type": "UNETLoader", "inputs": {
            "unet_name": f"wan22_{expert}.safetensors", "weight_dtype": "default"}}
        workflow[f"shift_{expert}"] = {"class_type": "ModelSamplingSD3", "inputs": {
            "model": [f"unet_{expert}", 0], "shift": 8.0}}
        workflow[f"klora_{expert}"] = klora([f"shift_{expert}", 0], f"{expert}_content.safetensors",
                                            f"{expert}_style.safetensors", progress="percent", log=f"e2e/{expert}")
        workflow[f"sample_{expert}"] = {"class_type": "KSamplerAdvanced", "inputs": {
            "model": [f"klora_{expert}", 0], "add_noise": "enable" if expert == "high" else "disable",
            "noise_seed": 7, "steps": steps, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0] if expert == "high" else ["sample_high", 0],
            "start_at_step": first, "end_at_step": last,
            "return_with_leftover_noise": "enable" if expert == "high" else "disable"}}
    workflow["save"] = save_latent(["sample_low", 0], "e2e/wan22")
    entry = server.run(workflow)

    high, low = selection_log(server, "e2e/high"), selection_log(server, "e2e/low")
    high_steps, low_steps = high["generations"][-1]["steps"], low["generations"][-1]["steps"]
    # Numbered as the run does: the low expert's KSamplerAdvanced starts at step `switch` of `steps`.
    assert [s["step"] for s in high_steps] == [0, 1] and [s["step"] for s in low_steps] == [switch, switch + 1]
    assert high["generations"][-1]["num_inference_steps"] == low["generations"][-1]["num_inference_steps"] == steps
    assert high["progress"] == low["progress"] == "percent"

    # Where the high expert stopped, on ComfyUI's sampling-percent scale: the sigma at step `switch` of the
    # full schedule, worked out in this process from the same model file with the same shift.
    (shifted,) = ModelSamplingSD3().patch(reference_model(models["wan22_high.safetensors"][1]), 8.0)
    sampling = shifted.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", steps)
    stop = kc.sampling_percent(sampling, float(sigmas[switch]))
    assert high_steps[0]["progress"] == pytest.approx(0.0, abs=1e-6)
    assert low_steps[0]["progress"] == pytest.approx(stop, abs=1e-6), "the low expert must start where the high stopped"
    assert high_steps[-1]["progress"] < stop < low_steps[-1]["progress"] < 1
    for log, prefix in ((high, "high_"), (low, "low_")):
        content, style = pairs[prefix]
        stats = files.pair_stats(content, style, lambda layer: False)
        gamma = files.expected_gamma([s["ratio"] for s in stats.values()])
        for step in log["generations"][-1]["steps"]:
            scale = files.expected_scale(step["progress"], "s", 1.5, 0.5)
            assert step["choices"] == {key: files.expected_choice(s, gamma, scale) for key, s in stats.items()}
    assert saved_latent(server, entry, "save").shape == (1, 16, 2, 8, 8)
    no_unloaded_keys(server)


def test_a_broken_or_misfit_lora_is_a_one_line_execution_error_naming_the_file(server):
    server, _, _ = server
    (server.loras / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    sdxl_like = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320),
                 "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4)}
    from safetensors.torch import save_file

    save_file(sdxl_like, str(server.loras / "sdxl_lora.safetensors"))
    for name in ("broken.safetensors", "sdxl_lora.safetensors"):
        workflow = base()
        workflow.update({"klora": klora(["unet", 0], style=name),
                         "sample": ksampler(["klora", 0]), "save": save_latent(["sample", 0], "e2e/never")})
        entry = server.wait(server.submit(workflow))
        assert entry["status"]["status_str"] == "error"
        error = cs.error_of(entry)
        assert error is not None and error["node_type"] == "KLoRALoader", entry["status"]
        message = error["exception_message"].strip()
        assert "\n" not in message and f"style LoRA '{name}'" in message, message
    assert not list(server.output.glob("e2e/never*"))
    no_unloaded_keys(server)


def test_the_selection_map_node_saves_a_real_picture(server):
    from PIL import Image

    server, _, _ = server
    workflow = base()
    workflow.update({
        "klora": klora(["unet", 0], log="e2e/map"),
        "sample": ksampler(["klora", 0], seed=11),
        "map": {"class_type": "KLoRASelectionMap", "inputs": {"model": ["klora", 0], "samples": ["sample", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["map", 0], "filename_prefix": "e2e/map"}},
        "preview": {"class_type": "PreviewImage", "inputs": {"images": ["map", 0]}},
    })
    entry = server.run(workflow)
    (saved,) = entry["outputs"]["save"]["images"]
    (preview,) = entry["outputs"]["preview"]["images"]
    assert saved["type"] == "output" and preview["type"] == "temp"
    for image in (saved, preview):
        picture = Image.open(io.BytesIO(server.view(image)))
        picture.load()
        assert picture.format == "PNG" and picture.mode == "RGB" and min(picture.size) >= 150, picture.size
        colours = set(picture.getdata())
        assert (230, 120, 40) in colours and (40, 110, 200) in colours  # content and style cells
        assert len(colours) > 20  # text and grid lines, not a flat block
    log = selection_log(server, "e2e/map")
    assert len(log["generations"]) == 1 and len(log["generations"][0]["steps"]) == 4
    no_unloaded_keys(server)


def test_the_server_log_never_says_lora_key_not_loaded(server):
    server, _, _ = server
    assert "ComfyUI-K-LoRA" in server.log_text()  # the pack was loaded (its import time is listed)
    assert "IMPORT FAILED" not in "\n".join(line for line in server.log_text().splitlines() if "K-LoRA" in line)
    no_unloaded_keys(server)
