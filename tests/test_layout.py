"""The package's layering: the rule, the checks and the format conversions stand on nothing above them.

The ComfyUI node imports ``klora.rule``, ``klora.checks`` and ``klora.formats`` inside ComfyUI's Python,
which has no diffusers, PEFT, transformers or gradio; and ``errors`` sits at the bottom so that the
lowest modules can raise the project's errors without importing the modules that use them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("diffusers", "peft", "transformers", "gradio", "accelerate", "huggingface_hub")


def _imported_after(module: str) -> list[str]:
    """Every module name in sys.modules after a fresh interpreter imports ``module``."""
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module,allowed", [
    ("klora.errors", set()),
    ("klora.rule", set()),
    ("klora.checks", {"klora.errors"}),
    ("klora.formats", {"klora.errors"}),
])
def test_low_modules_import_nothing_above_them(module, allowed):
    loaded = _imported_after(module)
    ours = {name for name in loaded if name.startswith("klora.")} - {module}
    assert ours == allowed, f"{module} pulls in {sorted(ours - allowed)}"
    heavy = [name for name in loaded if name.split(".")[0] in HEAVY]
    assert not heavy, f"{module} imports {heavy[:5]}"


def test_lora_error_is_one_class_everywhere():
    from klora import checks, errors, formats, loras

    assert loras.LoRAError is errors.LoRAError
    assert issubclass(errors.LoRAError, errors.KLoRAError)
    with pytest.raises(errors.LoRAError, match="'x.lora_A.weight' contains NaN"):
        checks.check_file({"x.lora_A.weight": __import__("torch").full((1, 2), float("nan"))}, {}, "f")
    with pytest.raises(errors.LoRAError, match="name no layer"):
        formats.prepare({"lora_unet_nonsense_layer.lora_down.weight": __import__("torch").zeros(1, 2)},
                        "WanLoraLoaderMixin", "f")
