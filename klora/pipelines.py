"""Load any LoRA-capable diffusers pipeline, and the one table of what differs between families.

What K-LoRA needs to know about a model family is data, one row per family in
``FAMILIES``: which components are denoisers, which diffusers LoRA loader reads
its files, whether it makes images or videos, its usual GPU dtype, the timestep
convention its denoiser sees, and whether K-LoRA can follow its denoising loop at
all. Adding a family is adding a row (and a tiny test model), not an ``if``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import KLoRAError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Family:
    name: str  # what users call it: "Qwen-Image"
    loader: str | None  # diffusers' LoRA loader mixin: converts the family's file formats
    pipelines: tuple[str, ...] = ()  # pipeline class-name prefixes this row is for; () = any of the loader's
    denoisers: tuple[str, ...] = ("transformer",)  # pipeline components K-LoRA acts on, in the order they run
    denoiser_classes: tuple[str, ...] = ()  # bare denoisers this row is for
    output: str = "image"  # "image" or "video"
    cuda_dtype: torch.dtype = torch.bfloat16
    # What the denoiser is handed: t / timestep_unit, or (T - t) / timestep_unit when reversed (Z-Image).
    timestep_unit: float = 1.0
    timestep_reversed: bool = False
    unsupported: str | None = None  # why K-LoRA cannot follow this pipeline's denoising loop

    @property
    def prefix(self) -> str:
        """The key prefix of this family's LoRA files ("unet." or "transformer.")."""
        return "unet" if self.denoisers[0] == "unet" else "transformer"


_SD = "StableDiffusionLoraLoaderMixin"
_SDXL = "StableDiffusionXLLoraLoaderMixin"
_FLUX = "FluxLoraLoaderMixin"
_HALF = torch.float16

# More specific rows (with pipeline prefixes) come before the catch-all row of their loader.
FAMILIES: tuple[Family, ...] = (
    # Loops K-LoRA cannot follow: refused with the reason, never run with a wrong schedule.
    Family("SkyReels-V2 diffusion forcing", "SkyReelsV2LoraLoaderMixin", ("SkyReelsV2DiffusionForcing",),
           output="video", unsupported="diffusion forcing steps one copy of the scheduler per latent frame, each "
           "at its own timestep, so there is no single step / steps to follow"),
    Family("HunyuanVideo FramePack", "HunyuanVideoLoraLoaderMixin", ("HunyuanVideoFramepack",), output="video",
           unsupported="FramePack runs one full denoising loop per section of the video"),
    Family("Helios-Pyramid", "HeliosLoraLoaderMixin", ("HeliosPyramid",), output="video",
           unsupported="Helios-Pyramid runs one denoising loop per pyramid stage"),
    # Stable Diffusion UNets.
    Family("AnimateDiff SDXL", _SDXL, ("AnimateDiffSDXL",), ("unet",), ("UNetMotionModel",), "video", _HALF),
    Family("Stable Diffusion XL", _SDXL, (), ("unet",), ("UNet2DConditionModel",), "image", _HALF),
    Family("AnimateDiff", _SD, ("AnimateDiff",), ("unet",), ("UNetMotionModel",), "video", _HALF),
    Family("Stable Diffusion", _SD, (), ("unet",), (), "image", _HALF),
    # Image transformers.
    Family("Stable Diffusion 3", "SD3LoraLoaderMixin", (), denoiser_classes=("SD3Transformer2DModel",)),
    Family("Chroma", _FLUX, ("Chroma",), denoiser_classes=("ChromaTransformer2DModel",), timestep_unit=1000.0),
    Family("FLUX.1", _FLUX, ("Flux",), denoiser_classes=("FluxTransformer2DModel",), timestep_unit=1000.0),
    Family("FLUX.1-style", _FLUX, timestep_unit=1000.0),
    Family("FLUX.2", "Flux2LoraLoaderMixin", denoiser_classes=("Flux2Transformer2DModel",), timestep_unit=1000.0),
    Family("Qwen-Image", "QwenImageLoraLoaderMixin", denoiser_classes=("QwenImageTransformer2DModel",),
           timestep_unit=1000.0),
    Family("Z-Image", "ZImageLoraLoaderMixin", denoiser_classes=("ZImageTransformer2DModel",),
           timestep_unit=1000.0, timestep_reversed=True),
    Family("Sana Video", "SanaLoraLoaderMixin", ("SanaVideo", "SanaImageToVideo"), output="video"),
    Family("Sana", "SanaLoraLoaderMixin", denoiser_classes=("SanaTransformer2DModel",)),
    Family("Lumina 2", "Lumina2LoraLoaderMixin", denoiser_classes=("Lumina2Transformer2DModel",),
           timestep_unit=1000.0, timestep_reversed=True),
    Family("HiDream-I1", "HiDreamImageLoraLoaderMixin", denoiser_classes=("HiDreamImageTransformer2DModel",)),
    Family("CogView4", "CogView4LoraLoaderMixin", denoiser_classes=("CogView4Transformer2DModel",)),
    Family("AuraFlow", "AuraFlowLoraLoaderMixin", denoiser_classes=("AuraFlowTransformer2DModel",)),
    # Video transformers.
    Family("Wan", "WanLoraLoaderMixin", (), ("transformer", "transformer_2"),
           ("WanTransformer3DModel", "WanVACETransformer3DModel", "WanAnimateTransformer3DModel"), "video"),
    Family("SkyReels-V2", "SkyReelsV2LoraLoaderMixin", (), ("transformer",), ("SkyReelsV2Transformer3DModel",),
           "video"),
    Family("HunyuanVideo", "HunyuanVideoLoraLoaderMixin", denoiser_classes=("HunyuanVideoTransformer3DModel",),
           output="video"),
    Family("LTX-Video", "LTXVideoLoraLoaderMixin", denoiser_classes=("LTXVideoTransformer3DModel",), output="video"),
    Family("LTX-2", "LTX2LoraLoaderMixin", denoiser_classes=("LTX2VideoTransformer3DModel",), output="video"),
    Family("CogVideoX", "CogVideoXLoraLoaderMixin", denoiser_classes=("CogVideoXTransformer3DModel",),
           output="video"),
    Family("Mochi", "Mochi1LoraLoaderMixin", denoiser_classes=("MochiTransformer3DModel",), output="video"),
    Family("Kandinsky 5 video", "KandinskyLoraLoaderMixin", ("Kandinsky5T2V", "Kandinsky5I2V"), output="video"),
    Family("Kandinsky 5", "KandinskyLoraLoaderMixin"),
    Family("Cosmos", "CosmosLoraLoaderMixin", output="video"),
    Family("Helios", "HeliosLoraLoaderMixin", output="video"),
)

SCRIPTS = {"image": "inference.py", "video": "inference_video.py"}


def family_of(target) -> Family:
    """The row of ``FAMILIES`` for a pipeline (instance or class) or a bare denoiser."""
    cls = target if isinstance(target, type) else type(target)
    mro = [c.__name__ for c in cls.__mro__]
    loader = next((name for name in mro if name.endswith("LoraLoaderMixin")), None)
    if loader is not None:
        for family in FAMILIES:
            if family.loader == loader and (not family.pipelines or cls.__name__.startswith(family.pipelines)):
                return family
        denoisers = tuple(m for m in getattr(cls, "_lora_loadable_modules", ("transformer",))
                          if m in ("unet", "transformer", "transformer_2"))
        return Family(cls.__name__.removesuffix("Pipeline"), loader, denoisers=denoisers or ("transformer",))
    for family in FAMILIES:
        if cls.__name__ in family.denoiser_classes:
            return family
    if "PeftAdapterMixin" in mro:  # a LoRA-capable denoiser we have no row for: files must be PEFT-named
        return Family(cls.__name__, None, denoisers=("unet",) if "UNet" in cls.__name__ else ("transformer",))
    if isinstance(target, torch.nn.Module) or "ModelMixin" in mro:
        raise KLoRAError(f"{cls.__name__} cannot take LoRA adapters (it has no diffusers PeftAdapterMixin)")
    raise KLoRAError(f"{cls.__name__} has no diffusers LoRA loader: K-LoRA needs a pipeline that loads LoRAs "
                     "(load_lora_weights) or its denoiser")


def check_supported(family: Family, where: str) -> None:
    if family.unsupported:
        raise KLoRAError(f"{where}: K-LoRA cannot follow this pipeline's denoising loop ({family.unsupported})")


def denoisers_of(pipeline, family: Family) -> dict[str, torch.nn.Module]:
    """{component name: module} of the denoisers a pipeline has (Wan 2.1 has no transformer_2)."""
    found = {name: getattr(pipeline, name, None) for name in family.denoisers}
    found = {name: module for name, module in found.items() if isinstance(module, torch.nn.Module)}
    if not found:
        raise KLoRAError(f"{type(pipeline).__name__} has no denoiser ({' or '.join(family.denoisers)}) loaded")
    return found


# --- devices and dtypes ----------------------------------------------------------

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


def resolve_dtype(dtype: str | None, device: str, family: Family) -> torch.dtype:
    """'auto': the family's usual half precision on GPUs (fp16 for SD UNets, bf16 for transformers), fp32 on CPU."""
    if dtype in (None, "", "auto"):
        return torch.float32 if device == "cpu" else family.cuda_dtype
    if dtype not in DTYPES:
        raise KLoRAError(f"--dtype {dtype!r}: choose auto, fp32, fp16 or bf16")
    return DTYPES[dtype]


# --- loading ---------------------------------------------------------------------

def pipeline_class_name(name_or_path: str) -> str:
    """The pipeline class a model folder or hub id declares in its ``model_index.json``."""
    config = model_index(name_or_path)
    name = config.get("_class_name") if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise KLoRAError(f"--pretrained_model_name_or_path '{name_or_path}': model_index.json names no pipeline class")
    return name


def model_index(name_or_path: str) -> dict:
    """The ``model_index.json`` of a model folder or hub id (a small download for a hub id)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if _looks_local(text, path):
        index = path / "model_index.json"
        if not path.exists():
            raise KLoRAError(f"--pretrained_model_name_or_path '{text}': no such folder")
        if not index.is_file():
            raise KLoRAError(f"--pretrained_model_name_or_path '{text}': not a diffusers pipeline folder "
                             "(no model_index.json)")
        try:
            config = json.loads(index.read_text())
        except (OSError, ValueError) as exc:
            raise KLoRAError(f"--pretrained_model_name_or_path '{text}': model_index.json is not readable "
                             f"JSON ({exc})") from None
    else:
        import warnings

        from diffusers import DiffusionPipeline

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # hub deprecation notes are not the user's business
                config = DiffusionPipeline.load_config(text)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise KLoRAError(f"--pretrained_model_name_or_path '{text}': could not load a pipeline from this hub id "
                             f"(offline, misspelt, or gated?): no model_index.json: {type(exc).__name__}: "
                             f"{first}") from None
    return config


def empty_denoisers(name_or_path: str, family: Family) -> dict[str, torch.nn.Module]:
    """The denoisers of a model folder or hub id, built on the meta device from their configs alone.

    Lets a LoRA be checked against the model's layers before gigabytes of weights are read.
    Returns {} when a config cannot be read: the real load then reports the problem.
    """
    import warnings

    import diffusers
    from accelerate import init_empty_weights

    text = str(name_or_path)
    path = Path(text).expanduser()
    source = str(path) if _looks_local(text, path) else text
    found = {}
    try:
        index = model_index(text)
        for component in family.denoisers:
            entry = index.get(component)
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]):
                continue
            cls = getattr(diffusers, entry[1], None)
            if not isinstance(cls, type):
                return {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = cls.load_config(source, subfolder=component)
                with init_empty_weights():
                    found[component] = cls.from_config(config)
    except Exception:
        return {}
    return found


def family_for_model(name_or_path: str) -> tuple[Family, type]:
    """(family row, pipeline class) of a model folder or hub id, read before loading any weight."""
    import diffusers

    class_name = pipeline_class_name(name_or_path)
    cls = getattr(diffusers, class_name, None)
    if not isinstance(cls, type):
        raise KLoRAError(f"--pretrained_model_name_or_path '{name_or_path}': pipeline {class_name} is not in "
                         f"diffusers {diffusers.__version__}")
    try:
        family = family_of(cls)
    except KLoRAError as exc:
        raise KLoRAError(f"--pretrained_model_name_or_path '{name_or_path}': {exc}") from None
    return family, cls


def load_pipeline(name_or_path: str, expect: str | None = None, device: str | None = None,
                  dtype: str | None = None, place: bool = True):
    """Load a diffusers pipeline K-LoRA can act on, from a local folder or a hub id.

    ``expect``: None (any family), "image" or "video" (the kind of output), or
    "unet" / "transformer" (the denoiser it must have; what ``inference_sd.py`` and
    ``inference_flux.py`` ask for). ``place=False`` leaves it on the CPU (for offload).
    """
    from diffusers import DiffusionPipeline

    text = str(name_or_path)
    family, cls = family_for_model(text)
    check_expected(text, family, cls, expect)
    check_supported(family, f"--pretrained_model_name_or_path '{text}' ({cls.__name__})")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device, family)
    path = Path(text).expanduser()
    local = _looks_local(text, path)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if local else text, dtype=torch_dtype)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        where = "local folder" if local else "hub id (offline, misspelt, or gated?)"
        raise KLoRAError(f"--pretrained_model_name_or_path '{text}': could not load a pipeline from this "
                         f"{where}: {type(exc).__name__}: {first}") from None
    denoisers_of(pipe, family)
    if place:
        pipe.to(device)
    return pipe


def _looks_local(text: str, path: Path) -> bool:
    return path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1


def check_expected(text: str, family: Family, cls: type, expect: str | None) -> None:
    if expect is None:
        return
    what = f"--pretrained_model_name_or_path '{text}' is {family.name} ({cls.__name__})"
    if expect in SCRIPTS:
        if family.output != expect:
            raise KLoRAError(f"{what}, a {family.output} model: use {SCRIPTS[family.output]}")
        return
    if expect == "unet" and family.denoisers != ("unet",):
        raise KLoRAError(f"{what}, not a Stable Diffusion UNet model: use {SCRIPTS[family.output]}")
    if expect == "transformer" and (family.denoisers[0] != "transformer" or family.loader != _FLUX):
        hint = "inference_sd.py" if family.denoisers == ("unet",) and family.output == "image" \
            else SCRIPTS[family.output]
        raise KLoRAError(f"{what}, not a FLUX.1 model: use {hint}")
