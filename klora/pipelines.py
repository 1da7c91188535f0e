"""Load a Stable Diffusion or FLUX pipeline from a hub id or a local folder."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import KLoRAError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | None) -> str:
    """'auto' (or None) picks CUDA when there is one, else CPU."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KLoRAError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise KLoRAError(f"--device {device!r}: not a torch device (try auto, cpu, cuda, cuda:1, mps)") from None
    return device


def resolve_dtype(dtype: str | None, device: str, family: str = "unet") -> torch.dtype:
    """'auto': half precision on GPUs (fp16 for SD, bf16 for FLUX), fp32 on CPU."""
    if dtype in (None, "", "auto"):
        if device == "cpu":
            return torch.float32
        return torch.bfloat16 if family == "transformer" else torch.float16
    if dtype not in DTYPES:
        raise KLoRAError(f"--dtype {dtype!r}: choose auto, fp32, fp16 or bf16")
    return DTYPES[dtype]


def load_pipeline(name_or_path: str, family: str, device: str | None = None, dtype: str | None = None,
                  place: bool = True):
    """A diffusers pipeline whose denoiser is a UNet (``family='unet'``) or a FLUX transformer.

    ``name_or_path`` is a local folder with ``model_index.json`` or a hub id.
    ``place=False`` leaves the pipeline on the CPU (for CPU offload).
    """
    from diffusers import DiffusionPipeline

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device, family)
    text = str(name_or_path)
    path = Path(text).expanduser()
    looks_local = path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_local:
        if not path.exists():
            raise KLoRAError(f"--pretrained_model_name_or_path '{text}': no such folder")
        if not (path / "model_index.json").is_file():
            raise KLoRAError(f"--pretrained_model_name_or_path '{text}': not a diffusers pipeline folder "
                             "(no model_index.json)")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if looks_local else text, dtype=torch_dtype)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        where = "local folder" if looks_local else "hub id (offline, misspelt, or gated?)"
        raise KLoRAError(f"--pretrained_model_name_or_path '{text}': could not load a pipeline from this "
                         f"{where}: {type(exc).__name__}: {first}") from None
    denoiser = getattr(pipe, family, None)
    if not isinstance(denoiser, torch.nn.Module):
        other = "FLUX (use inference_flux.py)" if family == "unet" else "Stable Diffusion (use inference_sd.py)"
        raise KLoRAError(f"--pretrained_model_name_or_path '{text}': {type(pipe).__name__} has no {family}; "
                         f"is it a {other} model?")
    if place:
        pipe.to(device)
    return pipe
