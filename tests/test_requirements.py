"""requirements.txt can be installed into a ComfyUI environment (ComfyUI-Manager runs ``pip install`` on a
node pack's requirements.txt) without replacing or downgrading torch or anything ComfyUI pins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchsde"}
# What ComfyUI 0.3.64's requirements.txt pins with "==" (read from the checkout where COMFYUI_PATH names one).
COMFYUI_PINS = {"comfyui-frontend-package", "comfyui-workflow-templates", "comfyui-embedded-docs"}


def _requirements(path: Path) -> list[Requirement]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def _comfyui_pins() -> set[str]:
    folder = os.environ.get("COMFYUI_PATH")
    if not folder or not (Path(folder) / "requirements.txt").is_file():
        return COMFYUI_PINS
    return {r.name.lower() for r in _requirements(Path(folder) / "requirements.txt")
            if any(spec.operator == "==" for spec in r.specifier)}


def test_torch_is_never_capped_or_pinned_and_2_13_satisfies_it():
    (torch,) = [r for r in _requirements(ROOT / "requirements.txt") if r.name == "torch"]
    assert Version("2.13.0") in torch.specifier  # the CPU build CI installs first
    for later in ("2.14.1", "2.15.0", "3.0.0"):
        assert Version(later) in torch.specifier, f"a user's torch {later} would be replaced"
    assert all(spec.operator in (">=", ">") for spec in torch.specifier)


def test_nothing_comfyui_pins_or_installs_with_torch_is_asked_for():
    names = {r.name.lower() for r in _requirements(ROOT / "requirements.txt")}
    assert not names & (TORCH_FAMILY - {"torch"}), "torchvision/torchaudio/torchsde come with the user's torch"
    assert not names & _comfyui_pins()
    for requirement in _requirements(ROOT / "requirements.txt"):
        assert not any(spec.operator in ("==", "===", "~=") for spec in requirement.specifier), requirement


@pytest.mark.parametrize("package", ["numpy", "pillow", "safetensors", "transformers", "huggingface_hub"])
def test_packages_comfyui_shares_have_no_upper_bound_it_could_hit(package):
    """A newer numpy, pillow, safetensors (ComfyUI's own) or transformers than ours is never downgraded;
    transformers stays below the next major, the one we have not tested."""
    found = [r for r in _requirements(ROOT / "requirements.txt") if r.name.lower() == package.lower()]
    for requirement in found:
        uppers = [spec for spec in requirement.specifier if spec.operator in ("<", "<=")]
        if package == "transformers":
            assert all(Version(spec.version).major >= 6 for spec in uppers)
        else:
            assert not uppers, requirement
