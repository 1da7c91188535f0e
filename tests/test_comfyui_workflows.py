"""The example workflows of ``workflows/`` run in a real ComfyUI server, and their two forms agree.

Each example is there twice: ``<name>_api.json`` (API format, what ``POST /prompt`` takes) and
``<name>.json`` (UI format, what the page loads by drag and drop; made from the API form by the page
itself, see ``tests/comfy_page.py``). Here:

- every API workflow is submitted to ComfyUI's server (``main.py --cpu``, this repository in
  ``custom_nodes/``) with its loaders and text encoders swapped for the test-only nodes' tiny models
  and conditioning (``tests/comfy_test_nodes``), Wan's two experts as tiny files under the workflow's
  own names for the real ``UNETLoader``, LoRA files under the workflow's names, and image and video
  sizes made tiny; it must run and write every output it saves;
- every UI workflow holds the same nodes, widget values and links as its API twin (widget values
  are read in the order of the server's ``/object_info``), so the two cannot drift apart;
- every K-LoRA node sets every public input of the node (issue 16's table), in both forms.

Run with ``COMFYUI_PATH`` set to a ComfyUI checkout (0.3.64 tested); skipped without it.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from comfy_models import why_not_available

_REASON = why_not_available()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

import comfy_lora_files as files  # noqa: E402
import comfy_page  # noqa: E402
import comfy_models as cm  # noqa: E402
import comfy_server as cs  # noqa: E402

comfy = cm.comfyui()
import comfy_test_nodes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
NAMES = ["sdxl_klora", "flux_klora", "qwen_image_klora", "wan22_klora"]
FAMILY = {"sdxl_klora": "sdxl", "flux_klora": "flux", "qwen_image_klora": "qwen_image", "wan22_klora": "wan"}
# The K-LoRA node's public inputs (issue 16's table): saved workflows refer to them.
PUBLIC = ["model", "content_lora", "style_lora", "pattern", "alpha", "beta", "method", "progress", "selection_log"]
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
ATTENTION = {  # the attention weights each family's test LoRAs adapt
    "sdxl": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$",
    "flux": r"(_attn\.(qkv|proj)|linear[12])\.weight$",
    "qwen_image": r"\.attn\.(to_q|to_k|to_v|add_[qkv]_proj|to_out\.0|to_add_out)\.weight$",
    "wan": r"_attn\.[qkvo]\.weight$",
}
NOT_LOADED = "lora key not loaded"


def api(name) -> dict:
    return json.loads((WORKFLOWS / f"{name}_api.json").read_text())


def ui(name) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    before = cs.checkout_state(cm.checkout())
    server = cs.Server(tmp_path_factory.mktemp("comfyui"))
    settings = server.base / "user" / "default" / "comfy.settings.json"  # the page checks workflows it loads
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(comfy_page.SETTINGS))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        assert cs.checkout_state(cm.checkout()) == before, "the server wrote into the ComfyUI checkout"


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


# --- the two forms agree -------------------------------------------------------------------------

def widget_names(info: dict) -> list[str]:
    """The names of a node's widgets in the order the page stores their values (``widgets_values``):
    its widget inputs in ``input_order``, each seed followed by its "control after generate" widget."""
    names = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            spec = info["input"][section][name]
            kind, options = spec[0], spec[1] if len(spec) > 1 else {}
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                names.append(name)
                if options.get("control_after_generate"):
                    names.append(f"{name}/control_after_generate")
    return names


def ui_as_api(workflow: dict, object_info: dict) -> dict:
    """A UI-format workflow read as an API prompt: {id: {class_type, inputs}} (titles aside)."""
    nodes = {str(node["id"]): node for node in workflow["nodes"]}
    prompt = {}
    for node_id, node in nodes.items():
        names = widget_names(object_info[node["type"]])
        values = node.get("widgets_values") or []
        assert len(values) == len(names), (node["type"], names, values)
        inputs = {n: v for n, v in zip(names, values) if not n.endswith("/control_after_generate")}
        prompt[node_id] = {"class_type": node["type"], "inputs": inputs}
    for _, origin, slot, target, target_slot, _ in workflow["links"]:
        name = nodes[str(target)]["inputs"][target_slot]["name"]
        prompt[str(target)]["inputs"][name] = [str(origin), slot]
    return prompt


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_holds_the_same_nodes_widgets_and_links_as_its_api_twin(name, object_info):
    sent = {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in api(name).items()}
    assert ui_as_api(ui(name), object_info) == sent
    titles = {str(node["id"]): node.get("title") for node in ui(name)["nodes"]}
    for node_id, node in api(name).items():
        display = object_info[node["class_type"]]["display_name"] or node["class_type"]  # the page's default title
        assert (titles[node_id] or display) == node.get("_meta", {}).get("title", display), node_id


@pytest.mark.parametrize("name", NAMES)
def test_every_klora_node_sets_every_public_input(name, object_info):
    assert object_info["KLoRALoader"]["input_order"]["required"] == PUBLIC
    kloras = [node for node in api(name).values() if node["class_type"] == "KLoRALoader"]
    assert kloras and len(kloras) == (2 if name.startswith("wan22") else 1)
    for node in kloras:
        assert set(PUBLIC) <= set(node["inputs"]), set(PUBLIC) - set(node["inputs"])
        assert node["inputs"]["selection_log"], "every example writes its selection log"
    expected_progress = "percent" if name.startswith("wan22") else "steps"  # split samplers need percent
    assert {node["inputs"]["progress"] for node in kloras} == {expected_progress}
    widgets = widget_names(object_info["KLoRALoader"])
    for node in ui(name)["nodes"]:
        if node["type"] == "KLoRALoader":
            assert len(node["widgets_values"]) == len(widgets) and set(PUBLIC) - {"model"} <= set(widgets)
            assert [i["name"] for i in node["inputs"] if i.get("link") is not None] == ["model"]


@pytest.mark.slow
def test_the_page_loads_each_ui_workflow_to_its_api_twin(server):
    """ComfyUI's own page (headless Chromium) loads each UI file, schema-checked, and turns it into the API file."""
    if not (comfy_page.chromium() and comfy_page.has_playwright()):
        pytest.skip("needs Chromium and the playwright package (requirements-dev.txt), as tests/test_browser.py")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser, page = comfy_page.open_page(playwright, server)
        try:
            for name in NAMES:
                prompt = json.loads(page.evaluate("""async ([workflow, name]) => {
                    await app.loadGraphData(workflow, true, true, name);
                    return JSON.stringify((await app.graphToPrompt()).output);
                }""", [ui(name), name]))
                page.wait_for_timeout(300)
                assert "Invalid workflow" not in page.content(), name
                assert comfy_page.strip(prompt) == comfy_page.strip(api(name)), name
        finally:
            browser.close()


def test_the_docs_table_of_the_node_matches_what_the_server_reports(object_info):
    """docs/comfyui.md's table of inputs: the node's inputs in order, optional ones marked, and their defaults."""
    section = (ROOT / "docs" / "comfyui.md").read_text().split("\n## The node\n", 1)[1].split("\n## ", 1)[0]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in section.splitlines() if line.startswith("| `")]
    rows = [(*re.fullmatch(r"`(\w+)`( \(optional\))?", row[0]).groups(), row[2]) for row in cells]
    info = object_info["KLoRALoader"]
    order = info["input_order"]
    assert [name for name, _, _ in rows] == order["required"] + order["optional"]
    for name, optional, default in rows:
        part = "optional" if optional else "required"
        assert name in order[part], name
        kind, options = info["input"][part][name][0], info["input"][part][name][1]
        if isinstance(kind, list) and default:  # a combo: its default is the first value unless it names one
            assert default == f"`{options.get('default', kind[0])}`", name
        elif isinstance(kind, list):  # the LoRA files: no default
            assert name.endswith("_lora") and "default" not in options, name
        elif kind == "FLOAT":
            assert float(default) == options["default"], name
        elif kind == "STRING":
            assert options["default"] == "" and default == "empty", name


def test_every_example_has_both_forms():
    assert sorted(p.name for p in WORKFLOWS.glob("*.json")) == sorted(
        [f"{n}.json" for n in NAMES] + [f"{n}_api.json" for n in NAMES])


# --- each API workflow runs, with tiny models swapped in ---------------------------------------------

def swap_in_tiny_models(prompt: dict, family: str) -> dict:
    """The workflow with test-only nodes for its checkpoint, UNET (not Wan's: tiny files load), CLIP and VAE
    loaders and text encoders, and 64 x 64 pixels (5 frames) instead of its image size."""
    prompt = json.loads(json.dumps(prompt))
    vae_node = {"class_type": "KLoRATestVAE", "inputs": {"family": family}}
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            prompt[node_id] = {"class_type": "KLoRATestModel", "inputs": {"family": family, "seed": 0}}
            prompt[f"{node_id}_vae"] = dict(vae_node)
            for other in prompt.values():  # its VAE output (slot 2) now comes from the test VAE
                for name, value in other["inputs"].items():
                    if value == [node_id, 2]:
                        other["inputs"][name] = [f"{node_id}_vae", 0]
        elif kind == "UNETLoader" and family != "wan":
            prompt[node_id] = {"class_type": "KLoRATestModel", "inputs": {"family": family, "seed": 0}}
        elif kind == "VAELoader":
            prompt[node_id] = dict(vae_node)
        elif kind in ("CLIPLoader", "DualCLIPLoader"):
            del prompt[node_id]
        elif kind == "CLIPTextEncode":
            prompt[node_id] = {"class_type": "KLoRATestConditioning", "inputs": {"family": family,
                                                                                  "text": inputs["text"]}}
        elif kind in ("EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo"):
            inputs.update(width=64, height=64)
            if "length" in inputs:
                inputs["length"] = 5
    links = {value[0] for node in prompt.values() for value in node["inputs"].values() if isinstance(value, list)}
    assert links <= set(prompt), f"left dangling: {links - set(prompt)}"
    return prompt


def tiny_model(family: str, server, prompt: dict):
    """The tiny model the swapped workflow runs (and, for Wan, its files under the workflow's UNET names)."""
    if family != "wan":
        return comfy_test_nodes.model(family, 0)
    tiny = None
    for seed, node in enumerate(n for n in prompt.values() if n["class_type"] == "UNETLoader"):
        tiny = cs.write_wan_file(server.diffusion_models / node["inputs"]["unet_name"], seed)
    return tiny.patcher


def write_loras(family: str, patcher, server, prompt: dict) -> None:
    """Each K-LoRA node's two files, for the tiny model, in a layout people publish for that family."""
    chosen = files.targets(patcher.model, ATTENTION[family])
    kloras = [n["inputs"] for n in prompt.values() if n["class_type"] == "KLoRALoader"]
    for index, inputs in enumerate(kloras):
        for role, seed, scale in (("content", 10 * index + 1, 0.1), ("style", 10 * index + 2, 0.07)):
            layers = files.random_layers(patcher.model, chosen, rank=4 if role == "content" else 8,
                                         alpha=lambda i: 2.0 + i % 5, seed=seed, scale=scale)
            path = server.loras / inputs[f"{role}_lora"]
            if family == "sdxl":  # kohya
                files.write(path, layers, files.names_comfy(layers, prefix="lora_unet_"))
            elif family == "qwen_image" or (family == "wan" and index == 0):  # diffusers PEFT, alpha in metadata
                names = files.names_wan_diffusers(layers) if family == "wan" else \
                    files.names_comfy(layers, prefix="transformer.")
                files.write(path, layers, names, style="lora_A", alpha_in="metadata")
            else:  # ComfyUI's own names (FLUX: whole fused weights, as BFL and kohya files have them)
                files.write(path, layers, files.names_comfy(layers))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_example_workflow_runs_with_tiny_models_and_writes_its_outputs(name, server):
    from PIL import Image

    family = FAMILY[name]
    prompt = swap_in_tiny_models(api(name), family)
    write_loras(family, tiny_model(family, server, prompt), server, prompt)
    entry = server.run(prompt, timeout=600)

    savers = {node_id: node for node_id, node in prompt.items()
              if node["class_type"] in ("SaveImage", "SaveAnimatedWEBP")}
    assert savers and set(savers) <= set(entry["outputs"])
    for node_id, node in savers.items():
        (image,) = entry["outputs"][node_id]["images"]
        assert image["filename"].startswith(Path(node["inputs"]["filename_prefix"]).name)
        picture = Image.open(io.BytesIO(server.view(image)))
        if node["class_type"] == "SaveAnimatedWEBP":
            assert picture.format == "WEBP" and picture.n_frames == 5 and picture.size == (64, 64)
        elif node["inputs"]["images"][0] in [k for k, n in prompt.items() if n["class_type"] == "VAEDecode"]:
            assert picture.format == "PNG" and picture.size == (64, 64)
        else:  # a selection map
            assert picture.format == "PNG" and min(picture.size) >= 150
    for node in prompt.values():
        if node["class_type"] == "KLoRALoader":
            (log_file,) = server.output.glob(f"{node['inputs']['selection_log']}_*_.json")
            log = json.loads(log_file.read_text())
            assert len(log["generations"]) == 1 and log["layers"] and log["progress"] == node["inputs"]["progress"]
    assert NOT_LOADED not in server.log_text()
