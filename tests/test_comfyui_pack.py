"""The repository root as a ComfyUI node pack: what loading it imports.

ComfyUI loads a pack from ``custom_nodes/<pack>/__init__.py`` with ``importlib.util.spec_from_file_location``.
Loading this one must import only the node classes and what ComfyUI's own Python has (torch,
safetensors, numpy, pillow): no diffusers, PEFT, transformers, gradio, accelerate or huggingface_hub
from this project. The first test needs no ComfyUI (the node module imports none at load time); the
others load the pack with ComfyUI's own loader and run where ``COMFYUI_PATH`` is set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("diffusers", "peft", "transformers", "gradio", "accelerate", "huggingface_hub")
PACK = "custom_nodes_klora_pack"  # the module name a loader gives the pack (ComfyUI uses the folder path)
# What loading the pack imports of ours: the node classes and the lists, defaults and checks of the methods
# (klora.methods, which reads two constants from the method modules; torch and math only).
NODE_MODULES = {"", ".comfyui_nodes", ".errors", ".rule", ".methods", ".np_lora", ".lora_switch"}
# What running the node adds: the adapter, what it reads files with and writes its log with.
ADAPTER_MODULES = {".comfyui", ".loras", ".checks", ".formats", ".est_lora", ".atomic"}


def _run(code: str, env=None) -> dict:
    done = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_LOAD_LIKE_COMFYUI = f"""
import importlib.util, json, sys
before = set(sys.modules)
spec = importlib.util.spec_from_file_location({PACK!r}, {str(ROOT / '__init__.py')!r})
module = importlib.util.module_from_spec(spec)
sys.modules[{PACK!r}] = module
spec.loader.exec_module(module)
new = sorted(set(sys.modules) - before)
print(json.dumps({{"new": new, "nodes": sorted(module.NODE_CLASS_MAPPINGS),
                  "names": module.NODE_DISPLAY_NAME_MAPPINGS}}))
"""


def test_loading_the_pack_imports_only_the_node_classes():
    result = _run(_LOAD_LIKE_COMFYUI)
    assert result["nodes"] == ["KLoRALoader", "KLoRASelectionMap"]
    assert result["names"]["KLoRALoader"] == "K-LoRA (content + style)"
    ours = sorted(m for m in result["new"] if m.startswith(PACK))
    assert ours == [PACK] + [f"{PACK}.klora{m}" for m in sorted(NODE_MODULES)]
    assert "klora" not in result["new"], "the pack must import its own modules relatively, not a top-level klora"
    heavy = [m for m in result["new"] if m.split(".")[0] in HEAVY]
    assert not heavy, heavy


def _comfyui_or_skip():
    from comfy_models import why_not_available

    reason = why_not_available()
    if reason:
        pytest.skip(reason)
    return str(Path(os.environ["COMFYUI_PATH"]).resolve())


def test_comfyui_loads_the_pack_and_its_adapter_adds_no_heavy_imports():
    comfyui = _comfyui_or_skip()
    code = f"""
import asyncio, json, sys
sys.path.insert(0, {comfyui!r})
import comfy.options
comfy.options.enable_args_parsing(False)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes  # ComfyUI imports its own nodes before any pack
before = set(sys.modules)
ok = asyncio.run(nodes.load_custom_node({str(ROOT)!r}))
after_load = set(sys.modules)
pack = {str(ROOT).replace('.', '_x_')!r}
import importlib
importlib.import_module(pack + ".klora.comfyui")  # what the node imports when it first runs
after_run = set(sys.modules)
print(json.dumps({{"ok": ok, "load": sorted(after_load - before), "run": sorted(after_run - after_load),
                  "pack": pack, "display": nodes.NODE_DISPLAY_NAME_MAPPINGS.get("KLoRALoader"),
                  "registered": "KLoRALoader" in nodes.NODE_CLASS_MAPPINGS and
                                "KLoRASelectionMap" in nodes.NODE_CLASS_MAPPINGS}}))
"""
    result = _run(code, env={"OMP_NUM_THREADS": "1"})
    assert result["ok"] and result["registered"] and result["display"] == "K-LoRA (content + style)"
    pack = result["pack"]
    for stage, modules in (("load", {""} | {f".klora{m}" for m in NODE_MODULES}),
                           ("run", {f".klora{m}" for m in ADAPTER_MODULES})):
        ours = {m[len(pack):] for m in result[stage] if m.startswith(pack)}
        assert ours == modules, (stage, ours)
        heavy = [m for m in result[stage] if m.split(".")[0] in HEAVY]
        assert not heavy, (stage, heavy)
