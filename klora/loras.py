"""Any LoRA file -> a named adapter on the denoiser of any diffusers family.

Format conversion is diffusers' (``lora_state_dict`` of the family's LoRA loader);
the adapter layers are PEFT's (``load_lora_adapter``). What this module adds:
safe file resolution, clear errors before anything touches the model, and an
exact per-layer ``alpha / rank`` (diffusers alone collapses differing kohya
alphas to the most common one).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checks, formats
from .errors import KLoRAError, LoRAError  # noqa: F401  (LoRAError: klora.loras.LoRAError stays valid)

_UNET_BLOCK = re.compile(r"(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)")
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_LORA_MARKERS = ("lora_A", "lora_B", "lora.down", "lora.up", "lora_down", "lora_up",
                 "lora_linear_layer", "_lora.down", "_lora.up", "lora_te", "lora_unet")


@dataclass
class LoRAFile:
    """A LoRA read from disk: its tensors, safetensors metadata and where it came from."""

    label: str  # "content LoRA 'lora-dog/pytorch_lora_weights.safetensors'"
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class DenoiserAdapter:
    """A LoRA in PEFT naming for one denoiser, with its exact per-layer config."""

    state_dict: dict[str, torch.Tensor]  # "<module path>.lora_A.weight" -> tensor
    config: dict  # LoraConfig keyword arguments
    text_encoder_state_dicts: dict[str, dict[str, torch.Tensor]]  # "text_encoder" -> PEFT-named dict
    text_encoder_alphas: dict | None = None
    scales: dict[str, float] = field(default_factory=dict)  # module -> strength * alpha / rank (what PEFT applies)
    # Full-weight parts (klora.formats.split_full_parts): parameter path -> delta, as converted (``full_parts``),
    # then as checked against the denoiser by ``check_fits`` (``full``: only parameters it has, shapes equal).
    full_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    strength: float = 1.0  # multiplies every delta of this LoRA: its factors' scales and its full-weight parts

    @property
    def modules(self) -> list[str]:
        return self.config["target_modules"]


def scaled(adapter: DenoiserAdapter, strength: float) -> DenoiserAdapter:
    """A copy of ``adapter`` whose every delta is ``strength`` times as large (the LoRA's strength).

    The alphas in its PEFT config are multiplied too, so an adapter loaded from it applies exactly
    ``scales``; the tensors are shared, not copied.
    """
    if strength == 1.0:
        return adapter
    config = json.loads(json.dumps(adapter.config))
    config["lora_alpha"] = config["lora_alpha"] * strength
    config["alpha_pattern"] = {pattern: value * strength for pattern, value in config["alpha_pattern"].items()}
    return DenoiserAdapter(state_dict=dict(adapter.state_dict), config=config,
                           text_encoder_state_dicts=adapter.text_encoder_state_dicts,
                           text_encoder_alphas=adapter.text_encoder_alphas,
                           scales={m: v * strength for m, v in adapter.scales.items()},
                           full_parts=dict(adapter.full_parts), full=dict(adapter.full),
                           strength=adapter.strength * strength)


def resolve(name_or_path: str | os.PathLike, weight_name: str | None = None, role: str = "LoRA") -> Path:
    """A local .safetensors file for a file path, a folder, or a hub repo id."""
    if name_or_path is None or str(name_or_path).strip() == "":
        raise LoRAError(f"{role}: no path or hub id given")
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        _refuse_pickle(path, role)
        return path
    if path.is_dir():
        return _file_in_folder(path, weight_name, role)
    if path.exists():  # a device, a pipe, a socket: reading one could block or never end
        raise LoRAError(f"{role} '{text}': not a regular file (a device or pipe?); give a .safetensors file")
    if _looks_like_repo_id(text):
        return _download(text, weight_name, role)
    raise LoRAError(f"{role} '{text}': no such file or folder (and not a hub repo id)")


def _refuse_pickle(path: Path, role: str) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoRAError(f"{role} '{path}': pickle files ({path.suffix}) can run code when loaded and are refused; "
                        "use a .safetensors file")


def _file_in_folder(folder: Path, weight_name: str | None, role: str) -> Path:
    if weight_name:
        candidate = folder / weight_name
        if not candidate.is_file():
            raise LoRAError(f"{role} '{folder}': has no file '{weight_name}'")
        _refuse_pickle(candidate, role)
        return candidate
    default = folder / DEFAULT_WEIGHT_NAME
    if default.is_file():
        return default
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if not found:
        pickles = [p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        hint = f" (only pickle files: {', '.join(pickles)}; they are refused)" if pickles else ""
        raise LoRAError(f"{role} '{folder}': folder has no .safetensors file{hint}")
    names = ", ".join(p.name for p in found)
    raise LoRAError(f"{role} '{folder}': several .safetensors files ({names}); choose one with the weight name option")


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and " " not in text


def _download(repo_id: str, weight_name: str | None, role: str) -> Path:
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
        if weight_name is None:
            files = [f for f in list_repo_files(repo_id) if f.endswith(".safetensors")]
            weight_name = DEFAULT_WEIGHT_NAME if DEFAULT_WEIGHT_NAME in files or len(files) != 1 else files[0]
        if weight_name.lower().endswith(PICKLE_SUFFIXES):
            _refuse_pickle(Path(weight_name), role)
        return Path(hf_hub_download(repo_id, weight_name))
    except LoRAError:
        raise
    except Exception as exc:  # offline, missing repo, missing file, auth: all say the same to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoRAError(f"{role} '{repo_id}': not a local path, and the hub could not provide "
                        f"'{weight_name or DEFAULT_WEIGHT_NAME}' ({type(exc).__name__}: {reason[:160]})") from None


def read(path: Path, role: str = "LoRA") -> LoRAFile:
    """Read a .safetensors LoRA, refusing anything that is not a finite LoRA."""
    from safetensors import safe_open

    label = f"{role} '{path}'"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise LoRAError(f"{label}: not a readable safetensors file (truncated or corrupted? {_short(exc)})") from None
    return checked(tensors, metadata, label, path)


def checked(tensors: dict, metadata: dict, label: str, path: Path) -> LoRAFile:
    """The tensors of a LoRA file, refused unless they are a finite LoRA (``read``; ComfyUI's .pt files)."""
    if not tensors:
        raise LoRAError(f"{label}: the file holds no tensors")
    if not any(marker in key for key in tensors for marker in _LORA_MARKERS):
        example = next(iter(tensors))
        raise LoRAError(f"{label}: not a LoRA (no lora_A/lora_B or lora_down/lora_up weights; first key "
                        f"'{example}': a full model checkpoint?)")
    if any(key.endswith(("dora_scale", "lora_magnitude_vector")) or ".lora_magnitude_vector." in key
           for key in tensors):
        raise LoRAError(f"{label}: a DoRA file (dora_scale / lora_magnitude_vector keys); K-LoRA chooses between "
                        "plain low-rank updates and would drop the magnitude vectors, so DoRA files are refused")
    for line in checks.check_file(tensors, metadata, label):  # pairs, shapes, ranks, alphas, NaN/Inf, zeros
        warnings.warn(line, stacklevel=4)
    return LoRAFile(label=label, path=path, tensors=tensors, metadata=metadata)


def same_file(first, second) -> bool:
    """Whether two paths name one file (the same LoRA given as content and style)."""
    try:
        return os.path.samefile(first, second)
    except (OSError, TypeError, ValueError):
        return False


SAME_FILE = ("K-LoRA: the content and style LoRAs are the same file ({label}): both sides hold the same update, so "
             "there is nothing to fuse; give the style LoRA as the style")


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def load_file(name_or_path, weight_name=None, role="LoRA") -> LoRAFile:
    return read(resolve(name_or_path, weight_name, role), role)


# --- conversion to PEFT naming -------------------------------------------------

# Key patterns that give away which model family a LoRA was trained for; only used to
# say so when a LoRA does not fit ("this LoRA is for FLUX.1; the model is Qwen-Image").
# Each row: the name to show, the families (FAMILIES names) such a file is right for, the
# pattern. First match wins, so the more specific patterns come first.
_SD = ("Stable Diffusion", "Stable Diffusion XL", "AnimateDiff", "AnimateDiff SDXL")
_WAN = ("Wan", "SkyReels-V2", "SkyReels-V2 diffusion forcing", "Helios", "Helios-Pyramid")
_FLUX_LIKE = ("FLUX.1", "Chroma", "FLUX.1-style", "HunyuanVideo", "HunyuanVideo FramePack")
_FAMILY_SIGNATURES = (
    ("Stable Diffusion", _SD, re.compile(r"(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)")),
    ("HunyuanVideo", ("HunyuanVideo", "HunyuanVideo FramePack"),
     re.compile(r"(token_refiner|double_blocks\.\d+\.img_attn_qkv|txt_in[._]individual)")),
    ("Wan", _WAN,
     re.compile(r"(^|diffusion_model\.|transformer\.|lora_unet_)blocks[._]\d+[._](self_attn|cross_attn|attn1|attn2|ffn)")),
    ("Z-Image", ("Z-Image",), re.compile(r"(noise_refiner|context_refiner|(^|\.)layers\.\d+\.attention\.)")),
    ("FLUX.2", ("FLUX.2",), re.compile(r"(to_qkv_mlp_proj|ff\.linear_in|ff_context\.linear_in)")),
    ("Qwen-Image", ("Qwen-Image",), re.compile(r"(img_mlp[._]net|txt_mlp[._]net|img_mod[._]1|txt_mod[._]1)")),
    ("FLUX.1", _FLUX_LIKE, re.compile(r"(single_transformer_blocks|double_blocks|single_blocks)")),
    ("LTX-Video or CogVideoX", ("LTX-Video", "CogVideoX"), re.compile(r"transformer_blocks\.\d+\.attn1\.")),
    ("Stable Diffusion 3", ("Stable Diffusion 3", "AuraFlow"),
     re.compile(r"transformer_blocks\.\d+\.(attn\.add_q_proj|ff_context)")),
)
# FLUX.1 and HunyuanVideo share their diffusers layer names and (as kohya/musubi files) their block names;
# HunyuanVideo alone has a 20th double / 39th single block and fc1/fc2, "linear" modulation layers.
_HUNYUAN_ONLY = re.compile(r"(double_blocks|(?<!single_)transformer_blocks)[._](19|[2-9]\d)[._]"
                           r"|single_(transformer_)?blocks[._](3[89]|[4-9]\d)[._]"
                           r"|(img_mlp|txt_mlp)[._]fc[12]|(img_mod|txt_mod|modulation)[._]linear")
_FLUX_ONLY = re.compile(r"(img_mod|txt_mod|modulation)[._]lin([._]|$)|(img_mlp|txt_mlp)[._][02]([._]|$)"
                        r"|img_attn\.qkv|(^|\.)(transformer_blocks|single_transformer_blocks)\.")


def guess_family(keys) -> tuple[str, tuple[str, ...]] | None:
    """(name, families it fits) of the model family a LoRA's key names point to, or None."""
    keys = list(keys)
    for name, fits, pattern in _FAMILY_SIGNATURES:
        if any(pattern.search(key) for key in keys):
            if name == "FLUX.1":
                if any(_HUNYUAN_ONLY.search(key) for key in keys):
                    return "HunyuanVideo", ("HunyuanVideo", "HunyuanVideo FramePack")
                if not any(_FLUX_ONLY.search(key) for key in keys):
                    return "FLUX.1 or HunyuanVideo", fits
            return name, fits
    return None


def _other_family_hint(lora: LoRAFile, family) -> str:
    guess = guess_family(lora.tensors)
    if guess is None or family.name in guess[1]:
        return "is it a LoRA for another base model?"
    return f"this LoRA is for {guess[0]}; the model is {family.name}"


def to_denoiser_adapter(lora: LoRAFile, denoiser, family=None) -> DenoiserAdapter:
    """Convert any format the family's diffusers loader reads to PEFT names, with exact alphas.

    ``family`` is the ``klora.pipelines.Family`` row (found from ``denoiser`` when None).
    """
    from .pipelines import family_of

    family = family or family_of(denoiser)
    try:
        return _to_denoiser_adapter(lora, denoiser, family)
    except LoRAError as exc:
        hint = _other_family_hint(lora, family)
        if hint.startswith("this LoRA is for") and hint not in str(exc):
            raise LoRAError(f"{exc}; {hint}") from None
        raise


def _to_denoiser_adapter(lora: LoRAFile, denoiser, family) -> DenoiserAdapter:
    from diffusers.utils import convert_unet_state_dict_to_peft

    prefix = family.prefix
    # Half-precision files go to float32 first: converters fold alpha / rank into a factor in the
    # file's own dtype (kohya FLUX), which would round the update away from what the file says.
    tensors = {k: (v.float() if v.dtype in (torch.float16, torch.bfloat16) else v) for k, v in lora.tensors.items()}
    # The paper's training script saved "unet.unet.<module>" keys; one "unet." is one too many.
    tensors = {(k[len("unet."):] if k.startswith("unet.unet.") else k): v for k, v in tensors.items()}
    if prefix == "transformer" and any(_UNET_BLOCK.search(k) for k in tensors):
        raise LoRAError(f"{lora.label}: a Stable Diffusion UNet LoRA (layers like 'down_blocks'); "
                        f"{_other_family_hint(lora, family)}")
    # Deltas of whole parameters (.diff, .diff_b, norms): K-LoRA applies them itself, as ComfyUI does.
    tensors, parts = formats.split_full_parts(tensors, family.loader or "")
    # Files diffusers' converters choke on or read lossily (musubi Wan, HunyuanVideo with alphas).
    tensors, notes = formats.prepare(tensors, family.loader or "", lora.label)
    for line in notes:
        warnings.warn(line, stacklevel=3)
    converted, network_alphas = _convert(lora, tensors, denoiser, family)

    ours = {k[len(prefix) + 1:]: v for k, v in converted.items() if k.startswith(prefix + ".")}
    if not ours and not any(k.startswith(("text_encoder", "te_", "lora_te")) for k in converted):
        # Community files sometimes arrive without any prefix.
        ours = {k: v for k, v in converted.items() if not k.startswith("text_encoder")}
    if not ours:
        raise LoRAError(f"{lora.label}: has no {prefix} layers (only text-encoder weights?)")

    # Alphas can sit in three places: tensors named "<module>.alpha", the network_alphas
    # returned by kohya conversion, or a PEFT LoraConfig in the safetensors metadata.
    alpha_tensors = {k[: -len(".alpha")]: float(v) for k, v in ours.items() if k.endswith(".alpha")}
    ours = {k: v for k, v in ours.items() if not k.endswith(".alpha")}
    if not any(".lora_A." in k or ".lora_B." in k for k in ours):
        ours = convert_unet_state_dict_to_peft(ours)
    module_alphas = {}
    for name, value in alpha_tensors.items():
        module_alphas[_module_of(_peft_name(name))] = value
    if network_alphas:
        for key, value in network_alphas.items():
            if not key.startswith(prefix + "."):
                continue
            down_key = key[len(prefix) + 1:]
            if down_key.endswith(".alpha"):
                down_key = down_key[: -len(".alpha")]
            module_alphas[_module_of(_peft_name(down_key))] = float(value)

    _complete_bias_only_layers(ours, denoiser)
    ranks = {}
    for key, tensor in ours.items():
        if key.endswith(".lora_A.weight"):
            ranks[key[: -len(".lora_A.weight")]] = int(tensor.shape[0])
    if not ranks:
        if any(k.startswith("lora_unet_") for k in tensors):
            raise LoRAError(f"{lora.label}: kohya-style keys (lora_unet_...) that diffusers does not convert for "
                            f"{family.name}; convert the file to the diffusers/PEFT format first")
        raise LoRAError(f"{lora.label}: no lora_A / lora_down weights for the {prefix}")
    config = _exact_config(ranks, module_alphas, _metadata_config(lora, prefix))
    config["lora_bias"] = any(k.endswith(".lora_B.bias") for k in ours)
    scales = {m: _scale(config, m, r) for m, r in ranks.items()}

    text_encoders = {}
    for te in ("text_encoder", "text_encoder_2"):
        part = {k[len(te) + 1:]: v for k, v in converted.items() if k.startswith(te + ".")}
        if part:
            text_encoders[te] = part
    te_alphas = {k: v for k, v in (network_alphas or {}).items() if k.startswith("text_encoder")}
    return DenoiserAdapter(state_dict=ours, config=config, scales=scales, text_encoder_state_dicts=text_encoders,
                           text_encoder_alphas=te_alphas or None, full_parts=_full_parameters(parts, denoiser, family))


def _full_parameters(parts: formats.FullParts, denoiser, family) -> dict[str, torch.Tensor]:
    """{parameter path in the denoiser's names: delta} for a file's full-weight parts.

    Original Wan and HunyuanVideo names go through diffusers' own checkpoint converters (a delta is
    renamed, cut and swapped exactly like the weight it changes); other parts are named as the file names
    them, minus a component prefix. ``check_fits`` then checks each against the denoiser.
    """
    found = {}
    if parts.original:
        found.update(_renamed_original(dict(parts.original), denoiser, family))
    for (name, kind), tensor in parts.named.items():
        for prefix in (f"{family.prefix}.", "model.diffusion_model.", "diffusion_model."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        found[f"{name}.{kind}"] = tensor
    return found


def _renamed_original(original: dict[str, torch.Tensor], denoiser, family) -> dict[str, torch.Tensor]:
    from diffusers.loaders import single_file_utils

    if family.loader in formats.HUNYUAN_VIDEO_LOADERS:
        # diffusers' converter cuts a single block's linear1 for a 3072-wide model; cut it for this one.
        config = denoiser.config
        inner = int(config.num_attention_heads) * int(config.attention_head_dim)
        split = {}
        for name in [n for n in original if re.fullmatch(r"single_blocks\.\d+\.linear1\.(weight|bias)", n)]:
            tensor = original.pop(name)
            block, kind = re.fullmatch(r"single_blocks\.(\d+)\.linear1\.(weight|bias)", name).groups()
            pieces = tensor.split([inner, inner, inner, tensor.shape[0] - 3 * inner])
            for target, piece in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), pieces):
                split[f"single_transformer_blocks.{block}.{target}.{kind}"] = piece
        converted = single_file_utils.convert_hunyuan_video_transformer_to_diffusers(original) if original else {}
        return {**converted, **split}
    return single_file_utils.convert_wan_transformer_to_diffusers(original)


def _complete_bias_only_layers(state_dict: dict, denoiser) -> None:
    """A layer with only a bias update (Wan ``diff_b`` without factors) gets zero factors of rank 1,
    so its bias is applied and its weight left as it is (PEFT would draw a random A)."""
    modules = dict(denoiser.named_modules())
    for key in [k for k in state_dict if k.endswith(".lora_B.bias")]:
        path = key[: -len(".lora_B.bias")]
        module = modules.get(path)
        module = getattr(module, "base_layer", module)
        if f"{path}.lora_A.weight" in state_dict or not isinstance(module, torch.nn.Linear):
            continue
        dtype = state_dict[key].dtype
        state_dict[f"{path}.lora_A.weight"] = torch.zeros(1, module.in_features, dtype=dtype)
        state_dict[f"{path}.lora_B.weight"] = torch.zeros(module.out_features, 1, dtype=dtype)


def _convert(lora: LoRAFile, tensors: dict, denoiser, family) -> tuple[dict, dict | None]:
    """(state dict in diffusers naming, network alphas or None) from the family's own loader."""
    if family.loader is None:  # a bare PEFT denoiser without a loader: the file must be PEFT-named
        return tensors, None
    from diffusers.loaders import lora_pipeline

    loader = getattr(lora_pipeline, family.loader)
    # A file already in diffusers' PEFT naming needs no converting, but some converters still act on its
    # ".alpha" keys (Qwen-Image and Z-Image add a second "transformer." prefix): K-LoRA reads those itself.
    alphas = {}
    factors = [k for k in tensors if not k.endswith(".alpha")]
    if factors and all(k.startswith(family.prefix + ".") and (".lora_A." in k or ".lora_B." in k) for k in factors):
        alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    kwargs = {}
    if family.prefix == "unet":
        kwargs["unet_config"] = denoiser.config  # maps original SD block names (input_blocks_4_1_...)
    if family.loader == "FluxLoraLoaderMixin":
        kwargs["return_alphas"] = True
    try:
        with quiet_libraries():
            result = loader.lora_state_dict(tensors, **kwargs)
    except LoRAError:
        raise
    except Exception as exc:
        raise LoRAError(f"{lora.label}: diffusers' {family.name} loader cannot read this LoRA "
                        f"({type(exc).__name__}: {_short(exc)}); {_other_family_hint(lora, family)}") from None
    converted, network_alphas = (result[0], result[1] if len(result) > 1 and isinstance(result[1], dict) else None) \
        if isinstance(result, tuple) else (result, None)
    return {**converted, **alphas}, network_alphas


def _peft_name(key: str) -> str:
    """Map an old-style name ('...to_q_lora.down.weight', '...lora.down') to PEFT naming."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    probe = key if key.endswith(".weight") else key + ".lora.down.weight"
    return next(iter(convert_unet_state_dict_to_peft({probe: torch.zeros(1)})))


def _module_of(peft_key: str) -> str:
    return peft_key.split(".lora_A")[0].split(".lora_B")[0]


def _metadata_config(lora: LoRAFile, family: str) -> dict | None:
    raw = lora.metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        packed = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(packed, dict):
        return None
    prefix = family + "."
    config = {k[len(prefix):]: v for k, v in packed.items() if k.startswith(prefix)}
    if not config and "r" in packed:  # a bare model's save_lora_adapter writes no component prefix
        config = dict(packed)
    return config or None


def _scale(config: dict, module: str, rank: int) -> float:
    """alpha / rank for ``module`` under a config built by ``_exact_config``."""
    alpha = config["alpha_pattern"].get(_exact(module), config["lora_alpha"])
    return float(alpha) / (math.sqrt(rank) if config["use_rslora"] else rank)


def _exact_config(ranks: dict[str, int], alphas: dict[str, float], metadata: dict | None) -> dict:
    """LoraConfig kwargs that give every module exactly its own alpha / rank."""
    from peft import LoraConfig

    meta_config = None
    if metadata is not None:
        allowed = LoraConfig.__dataclass_fields__
        meta_config = LoraConfig(**{k: v for k, v in metadata.items() if k in allowed})

    per_module_alpha = {}
    patterns = _alpha_patterns(meta_config) if meta_config is not None else []
    for module, rank in ranks.items():
        if module in alphas:
            per_module_alpha[module] = alphas[module]
        elif meta_config is not None:
            per_module_alpha[module] = _config_alpha(meta_config, patterns, module)
        else:
            per_module_alpha[module] = float(rank)  # diffusers convention: no alpha means scale 1

    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(per_module_alpha.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": {_exact(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {_exact(m): v for m, v in per_module_alpha.items() if v != lora_alpha},
        "target_modules": sorted(ranks),
        "use_rslora": bool(meta_config.use_rslora) if meta_config is not None else False,
    }


def _exact(module: str) -> str:
    """A PEFT rank/alpha pattern that matches this one module path and nothing else."""
    return "^" + re.escape(module) + "$"


def _alpha_patterns(config) -> list:
    """PEFT's alpha_pattern as compiled regexes, once per file (not once per layer and pattern)."""
    return [(re.compile(rf"(.*\.)?({pattern})$"), re.compile(pattern.strip("^$")), float(value))
            for pattern, value in (config.alpha_pattern or {}).items()]


def _config_alpha(config, patterns: list, module: str) -> float:
    """The alpha a PEFT LoraConfig gives ``module``, in units where scale = alpha / rank."""
    for suffix, whole, value in patterns:  # the first match wins, as in PEFT
        if suffix.match(module) or whole.fullmatch(module):
            return value
    return float(config.lora_alpha)  # with use_rslora PEFT divides by sqrt(rank) itself


# --- checks and loading -------------------------------------------------------

_ADAPTABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def check_fits(adapter: DenoiserAdapter, denoiser, label: str, family=None, lora: LoRAFile | None = None) -> list[str]:
    """Every layer the LoRA names must exist in ``denoiser`` with matching shapes.

    Layers the family marks as optional (``klora.formats.OPTIONAL_LAYERS``, e.g. the
    image-conditioning layers of a Wan 2.1 I2V LoRA on a text-to-video Wan 2.2) are
    dropped from ``adapter`` when the model lacks them; the returned warnings say so.
    """
    from .pipelines import family_of

    family = family or family_of(denoiser)
    modules = dict(denoiser.named_modules())
    kind = type(denoiser).__name__
    hint = _other_family_hint(lora, family) if lora is not None else "is it a LoRA for another base model?"
    missing = [m for m in adapter.modules if m not in modules]
    warnings_out = []
    optional = formats.OPTIONAL_LAYERS.get(family.loader or "")
    if missing and optional is not None:
        pattern, description = optional
        skippable = [m for m in missing if re.search(pattern, m)]
        if skippable and len(skippable) < len(adapter.modules):
            _drop_modules(adapter, skippable)
            warnings_out.append(f"{label}: skipped {len(skippable)} layers this {kind} does not have "
                                f"(e.g. '{skippable[0]}'): {description}")
            missing = [m for m in missing if m not in skippable]
    if missing and len(missing) == len(adapter.modules):
        raise LoRAError(f"{label}: none of its {len(missing)} layers exist in this {kind} (e.g. '{missing[0]}'); "
                        f"{hint}")
    if missing:
        raise LoRAError(f"{label}: {len(missing)} of its {len(adapter.modules)} layers do not exist in this {kind} "
                        f"(e.g. '{missing[0]}'); {hint}")
    for module in adapter.modules:
        target = modules[module]
        base = getattr(target, "base_layer", target)
        A = adapter.state_dict.get(f"{module}.lora_A.weight")
        B = adapter.state_dict.get(f"{module}.lora_B.weight")
        if A is None or B is None:
            raise LoRAError(f"{label}: layer '{module}' has only one of its two LoRA matrices")
        if not isinstance(base, _ADAPTABLE):
            raise LoRAError(f"{label}: layer '{module}' is a {type(base).__name__} in this {kind}; LoRAs adapt "
                            "linear and convolution layers")
        if isinstance(base, torch.nn.Linear):
            fan_in, fan_out, factor_dims = base.in_features, base.out_features, 2
        else:
            fan_in, fan_out, factor_dims = base.in_channels, base.out_channels, base.weight.dim()
        if A.dim() not in (2, factor_dims) or B.dim() not in (2, factor_dims):
            raise LoRAError(f"{label}: layer '{module}' has LoRA factors of {A.dim()} and {B.dim()} dimensions; "
                            f"a {type(base).__name__} takes {factor_dims}")
        if A.shape[1] != fan_in or B.shape[0] != fan_out:
            raise LoRAError(f"{label}: layer '{module}' is {fan_in}->{fan_out} in this {kind} "
                            f"but {A.shape[1]}->{B.shape[0]} in the LoRA; {hint}")
    warnings_out += _check_full_parts(adapter, denoiser, label, kind, hint, optional)
    return warnings_out


def _check_full_parts(adapter: DenoiserAdapter, denoiser, label: str, kind: str, hint: str, optional) -> list[str]:
    """Fill ``adapter.full`` with the full-weight parts that name a parameter of ``denoiser`` (a part named
    after a layer's weight may change a parameter of that name: Wan's modulation tables are parameters)."""
    parameters = denoiser_parameters(denoiser)
    adapter.full, unknown, skipped = {}, [], []
    for path, delta in adapter.full_parts.items():
        target = path if path in parameters else path.removesuffix(".weight")
        if target not in parameters:
            module = path.rsplit(".", 1)[0]
            (skipped if optional is not None and re.search(optional[0], module) else unknown).append(path)
            continue
        shape = tuple(parameters[target].shape)
        if tuple(delta.shape) != shape:
            raise LoRAError(f"{label}: its full-weight delta for '{target}' is {_dims(delta.shape)} but that parameter "
                            f"is {_dims(shape)} in this {kind}; {hint}")
        adapter.full[target] = delta
    notes = []
    if skipped:
        notes.append(f"{label}: skipped {len(skipped)} full-weight deltas of layers this {kind} does not have "
                     f"({formats._summary(skipped)}): {optional[1]}")
    if unknown:
        notes.append(f"{label}: {len(unknown)} full-weight delta(s) (.diff, .diff_b, norms) name no parameter of this "
                     f"{kind} and are not applied: {formats._summary(unknown)}")
    return notes


def denoiser_parameters(denoiser) -> dict[str, torch.Tensor]:
    """{parameter path: tensor} of a denoiser as its own names give them, PEFT's wrappers seen through."""
    found = {}
    for name, parameter in denoiser.named_parameters():
        if ".lora_" in name:  # PEFT's adapter factors, not the model's
            continue
        found[name.replace(".base_layer.", ".")] = parameter
    return found


def _dims(shape) -> str:
    return "x".join(str(s) for s in shape) or "a scalar"


def _drop_modules(adapter: DenoiserAdapter, modules: list[str]) -> None:
    gone = set(modules)
    adapter.state_dict = {k: v for k, v in adapter.state_dict.items() if _module_of(k) not in gone}
    adapter.config["target_modules"] = [m for m in adapter.config["target_modules"] if m not in gone]
    patterns = {_exact(m) for m in gone}
    for name in ("rank_pattern", "alpha_pattern"):
        adapter.config[name] = {p: v for p, v in adapter.config[name].items() if p not in patterns}
    adapter.scales = {m: s for m, s in adapter.scales.items() if m not in gone}


@contextmanager
def quiet_libraries():
    """Keep diffusers/PEFT/transformers chatter out of the user's terminal while they convert or load.

    Everything they would report (dropped keys, format notes) K-LoRA checks and reports
    itself, in one line naming the file; their own output would only repeat it in raw form.
    """
    import io
    import logging
    from contextlib import redirect_stdout

    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore", module=r"(peft|diffusers|transformers)(\.|$)")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def load_adapter(denoiser, adapter: DenoiserAdapter, adapter_name: str, label: str, pipeline=None) -> None:
    """Attach ``adapter`` to ``denoiser`` under ``adapter_name`` via diffusers/PEFT.

    Call ``check_fits`` first (``KLoRA`` checks both LoRAs before loading either, so a
    bad style LoRA never leaves the content LoRA half-attached).
    """
    config = dict(adapter.config)
    # One regex that matches exactly these paths: PEFT matches a plain list by suffix, so
    # "proj_out" would also wrap every "single_transformer_blocks.N.proj_out".
    config["target_modules"] = "(" + "|".join(re.escape(m) for m in adapter.modules) + ")"
    try:
        with quiet_libraries():
            denoiser.load_lora_adapter(dict(adapter.state_dict), prefix=None, adapter_name=adapter_name,
                                       metadata=config, _pipeline=pipeline)
    except Exception as exc:
        if adapter_name in getattr(denoiser, "peft_config", {}):
            denoiser.delete_adapters(adapter_name)
        raise LoRAError(f"{label}: could not be loaded ({_short(exc)})") from None
