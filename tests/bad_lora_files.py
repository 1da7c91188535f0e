"""LoRA files with one thing wrong, each made from a valid diffusers-format LoRA.

A *file* here is ``(tensors, metadata)`` as safetensors stores it; ``read`` and
``write`` move it to and from disk. Every maker returns a changed copy and leaves
its input alone, so one valid file can yield every broken one. The container
breakers (``truncated``, ``corrupted_header``, ...) work on the bytes instead.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})


def write(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    # metadata=None, never {}: safetensors 0.8 writes an unreadable header for no tensors and empty metadata
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata=metadata or None)
    return Path(path)


def factor_keys(layer: str, prefix: str = "unet") -> tuple[str, str]:
    """(lora_A key, lora_B key) of ``layer`` (a module path) in diffusers naming."""
    return f"{prefix}.{layer}.lora_A.weight", f"{prefix}.{layer}.lora_B.weight"


def layers(tensors: dict[str, torch.Tensor], prefix: str = "unet") -> list[str]:
    """Module paths of the A/B pairs in a diffusers-format file, in key order."""
    ending = ".lora_A.weight"
    return [key[len(prefix) + 1: -len(ending)] for key in tensors if key.endswith(ending)]


# --- factors ------------------------------------------------------------------

def replace(file, **changes):
    """``file`` with some tensors replaced (a value of None deletes the key)."""
    tensors, metadata = file
    tensors = dict(tensors)
    for key, value in changes.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    return tensors, dict(metadata)


def change_factors(file, layer: str, A=None, B=None, drop_A=False, drop_B=False):
    """``layer``'s factors replaced by functions of the old ones, or deleted."""
    tensors, metadata = file
    down, up = factor_keys(layer)
    tensors = dict(tensors)
    if A is not None:
        tensors[down] = A(tensors[down])
    if B is not None:
        tensors[up] = B(tensors[up])
    if drop_A:
        del tensors[down]
    if drop_B:
        del tensors[up]
    return tensors, dict(metadata)


def zero_layers(file, chosen: list[str], factor: str = "B"):
    """``chosen`` layers with their ``factor`` ("A" or "B") set to zero: their delta is zero."""
    for layer in chosen:
        file = change_factors(file, layer, **{factor: torch.zeros_like})
    return file


def with_value(file, layer: str, value: float):
    """One value of ``layer``'s lora_A set to ``value`` (NaN, inf)."""
    def put(A):
        A = A.clone()
        A[0, 0] = value
        return A
    return change_factors(file, layer, A=put)


# --- metadata -----------------------------------------------------------------

def adapter_config(metadata: dict[str, str]) -> dict:
    return json.loads(metadata["lora_adapter_metadata"])


def with_config(file, prefix: str = "unet", **fields):
    """``file`` whose ``lora_adapter_metadata`` has ``<prefix>.<field>`` set (None removes it)."""
    tensors, metadata = file
    config = adapter_config(metadata)
    for name, value in fields.items():
        if value is None:
            config.pop(f"{prefix}.{name}", None)
        else:
            config[f"{prefix}.{name}"] = value
    return dict(tensors), {**metadata, "lora_adapter_metadata": json.dumps(config)}


def with_metadata(file, **entries):
    """``file`` with raw metadata entries set (None removes one)."""
    tensors, metadata = file
    metadata = dict(metadata)
    for name, value in entries.items():
        if value is None:
            metadata.pop(name, None)
        else:
            metadata[name] = value
    return dict(tensors), metadata


def with_alpha_keys(file, alpha, chosen: list[str] | None = None, prefix: str = "unet"):
    """``<prefix>.<layer>.alpha`` scalars for ``chosen`` layers (default: all), value ``alpha``."""
    tensors, metadata = file
    tensors = dict(tensors)
    for layer in chosen if chosen is not None else layers(tensors, prefix):
        tensors[f"{prefix}.{layer}.alpha"] = torch.tensor(float(alpha))
    return tensors, dict(metadata)


# --- containers ----------------------------------------------------------------

def truncated(source, target, cut: int = 100) -> Path:
    data = Path(source).read_bytes()
    Path(target).write_bytes(data[: len(data) - cut])
    return Path(target)


def corrupted_header(source, target) -> Path:
    """The JSON header's first bytes overwritten: its length is right, its text is not JSON."""
    data = bytearray(Path(source).read_bytes())
    data[8:16] = b"#garbage"
    Path(target).write_bytes(bytes(data))
    return Path(target)


def absurd_header_length(source, target) -> Path:
    data = bytearray(Path(source).read_bytes())
    data[:8] = struct.pack("<Q", 2**62)
    Path(target).write_bytes(bytes(data))
    return Path(target)


def empty(target) -> Path:
    Path(target).write_bytes(b"")
    return Path(target)
