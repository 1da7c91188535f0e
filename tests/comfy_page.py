"""Docs tool: the example workflows' UI form and the README's screenshot, made by ComfyUI's own page.

    COMFYUI_PATH=/path/to/ComfyUI python tests/comfy_page.py            # both
    COMFYUI_PATH=/path/to/ComfyUI python tests/comfy_page.py --workflows  # workflows/*.json only
    COMFYUI_PATH=/path/to/ComfyUI python tests/comfy_page.py --screenshot # pictures/comfyui_node.png only

It starts ComfyUI's server with this repository in ``custom_nodes/`` (``comfy_server.Server``) and
empty placeholder files under every model, text-encoder, VAE and LoRA name the workflows use (so
that their combo boxes list them), opens the page in headless Chromium (Debian's, driven by
playwright), and for each ``workflows/<name>_api.json``:

- loads it as a user drops an API-format file on the page (``app.loadApiJson``);
- checks that the page turns the graph back into the same API prompt (``app.graphToPrompt``);
- writes what the page saves (``graphToPrompt().workflow``) to ``workflows/<name>.json``, with the
  nodes laid out in columns by their depth in the graph.

``--screenshot`` loads ``workflows/sdxl_klora.json`` and saves the K-LoRA node with its neighbours
to ``pictures/comfyui_node.png``. Nothing is run on a model; nothing is written into the checkout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
SCREENSHOT = ROOT / "pictures" / "comfyui_node.png"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]
# Inputs that name files, and the models/ folder each lists.
FILE_INPUTS = {"ckpt_name": "checkpoints", "unet_name": "diffusion_models", "clip_name": "text_encoders",
               "clip_name1": "text_encoders", "clip_name2": "text_encoders", "vae_name": "vae",
               "content_lora": "loras", "style_lora": "loras", "lora_name": "loras"}
PAGE_URL: list[str] = []  # the server's address, once started
WIDE = {"KLoRALoader": 420, "KLoRASelectionMap": 300}  # node widths in the saved workflows
# The user settings of a first start that would cover the canvas (the template browser, the release notes).
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Release.Version": "9.9.9",
            "Comfy.Release.Status": "skipped", "Comfy.Validation.Workflows": True, "Comfy.Graph.CanvasInfo": False}


def chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


def api_workflows() -> dict[str, dict]:
    return {path.name.removesuffix("_api.json"): json.loads(path.read_text())
            for path in sorted(WORKFLOWS.glob("*_api.json"))}


def placeholder_files(server, workflows) -> None:
    for workflow in workflows.values():
        for node in workflow.values():
            for name, value in node["inputs"].items():
                if name in FILE_INPUTS and isinstance(value, str):
                    folder = server.base / "models" / FILE_INPUTS[name]
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / value).touch()


def layout(workflow: dict) -> dict:
    """Nodes in columns by their depth in the graph (loaders left, savers right), in id order within a column."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    sources = {node_id: set() for node_id in nodes}
    for _, origin, _, target, _, _ in workflow["links"]:
        sources[target].add(origin)
    depth = {}

    def depth_of(node_id):
        if node_id not in depth:
            depth[node_id] = 1 + max((depth_of(s) for s in sources[node_id]), default=-1)
        return depth[node_id]

    for node in nodes.values():  # room for the K-LoRA node's input names next to their values
        if node["type"] in WIDE:
            node["size"][0] = max(node["size"][0], WIDE[node["type"]])
    columns: dict[int, list] = {}
    for node_id in sorted(nodes):
        columns.setdefault(depth_of(node_id), []).append(node_id)
    x = 40
    for column in sorted(columns):
        width = max(nodes[n]["size"][0] for n in columns[column])
        y = 40
        for node_id in columns[column]:
            nodes[node_id]["pos"] = [x, y]
            y += nodes[node_id]["size"][1] + 70
        x += width + 60
    return workflow


def strip(prompt: dict) -> dict:
    """An API prompt without the titles (``_meta``)."""
    return {node_id: {k: v for k, v in node.items() if k != "_meta"} for node_id, node in prompt.items()}


def open_page(playwright, server):
    browser = playwright.chromium.launch(executable_path=chromium(),
                                         headless=True, args=CHROMIUM_FLAGS)
    page = browser.new_page(viewport={"width": 1500, "height": 820}, device_scale_factor=1)
    PAGE_URL[:] = [server.url]
    page.goto(server.url)
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph "
                           "&& LiteGraph.registered_node_types['KLoRALoader']", timeout=120_000)
    page.wait_for_timeout(1500)
    return browser, page


def save_workflows(page, workflows) -> None:
    for name, api in workflows.items():
        result = json.loads(page.evaluate("""async ([api, name]) => {
            await app.loadApiJson(structuredClone(api), name);
            const {output, workflow} = await app.graphToPrompt();
            return JSON.stringify({output, workflow});  // as the page saves it: no undefined fields
        }""", [api, name]))
        back, sent = strip(result["output"]), strip(api)
        if back != sent:
            raise SystemExit(f"{name}: the page's prompt differs from {name}_api.json:\n{json.dumps(back)[:3000]}")
        path = WORKFLOWS / f"{name}.json"
        path.write_text(json.dumps(layout(result["workflow"]), indent=1) + "\n")
        # ... and the page loads the file back (schema-checked: Comfy.Validation.Workflows) to the same prompt.
        again = json.loads(page.evaluate("""async ([workflow, name]) => {
            await app.loadGraphData(workflow, true, true, name);
            return JSON.stringify((await app.graphToPrompt()).output);
        }""", [json.loads(path.read_text()), name]))
        page.wait_for_timeout(500)
        if strip(again) != sent or "Invalid workflow" in page.content():
            raise SystemExit(f"{name}: the page does not load {path.name} back to the same prompt")
        print(f"wrote {path.relative_to(ROOT)}: {len(result['workflow']['nodes'])} nodes, "
              f"{len(result['workflow']['links'])} links")


def save_screenshot(browser) -> None:
    """The SDXL workflow in a fresh page, cropped to the loader, the K-LoRA node and the sampler."""
    page = browser.new_page(viewport={"width": 1800, "height": 900}, device_scale_factor=1)
    page.goto(PAGE_URL[0])
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph "
                           "&& LiteGraph.registered_node_types['KLoRALoader']", timeout=120_000)
    page.wait_for_timeout(1500)
    workflow = json.loads((WORKFLOWS / "sdxl_klora.json").read_text())
    box = page.evaluate("""async (workflow) => {
        await app.loadGraphData(workflow, true, true, "sdxl_klora");
        const find = (type) => app.graph.nodes.find((n) => n.type === type);
        const [loader, klora, sampler] = ["CheckpointLoaderSimple", "KLoRALoader", "KSampler"].map(find);
        const scale = 1.1, title = LiteGraph.NODE_TITLE_HEIGHT;
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [24 / scale - loader.pos[0], (title + 70) / scale - klora.pos[1]];
        app.canvas.setDirty(true, true);
        app.canvas.draw(true, true);
        const screen = (x, y) => [(x + app.canvas.ds.offset[0]) * scale, (y + app.canvas.ds.offset[1]) * scale];
        const [right] = screen(sampler.pos[0] + sampler.size[0], 0);
        const last = klora.widgets.at(-1);  // the node's last row (its stored size can be smaller than drawn)
        const [, bottom] = screen(0, klora.pos[1] + Math.max(klora.size[1], last.last_y + LiteGraph.NODE_WIDGET_HEIGHT));
        const rect = app.canvas.canvas.getBoundingClientRect();  // the canvas sits below the page's menu bar
        return {width: Math.ceil(rect.left + right + 16), height: Math.ceil(rect.top + bottom + 24)};
    }""", workflow)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(SCREENSHOT), clip={"x": 0, "y": 0, **box})
    page.close()
    print(f"wrote {SCREENSHOT.relative_to(ROOT)}: {box['width']}x{box['height']}")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflows", action="store_true", help="write workflows/<name>.json only")
    parser.add_argument("--screenshot", action="store_true", help="write pictures/comfyui_node.png only")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    both = not (args.workflows or args.screenshot)

    import comfy_models as cm
    import comfy_server as cs
    from playwright.sync_api import sync_playwright

    reason = cm.why_not_available()
    if reason:
        raise SystemExit(reason)
    workflows = api_workflows()
    with tempfile.TemporaryDirectory() as base:
        server = cs.Server(base, test_nodes=False)
        placeholder_files(server, workflows)
        settings = server.base / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps(SETTINGS))
        server.start()
        try:
            with sync_playwright() as playwright:
                browser, page = open_page(playwright, server)
                try:
                    if both or args.workflows:
                        save_workflows(page, workflows)
                    if both or args.screenshot:
                        save_screenshot(browser)
                finally:
                    browser.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
