"""A static fusion (NP-LoRA or the plain merge) written as one ordinary LoRA file.

Per layer both LoRAs adapt the merged LoRA has rank r_s + r_c (``klora.np_lora.merged_factors``; the
merge is NP-LoRA at mu = 0); a layer one LoRA adapts keeps that LoRA. Strengths and alpha / rank
scales are folded into the up matrices, so the file needs no alpha beyond "alpha = rank".

Layouts, chosen so that diffusers' ``load_lora_weights`` and ComfyUI's ``LoraLoaderModelOnly`` both
read the file exactly:
- UNet models (SD 1.5, SDXL): kohya names (``lora_unet_down_blocks_1_..._to_q.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha`` = rank per layer);
- transformer models: diffusers' PEFT names (``transformer.<path>.lora_A.weight``), every layer padded
  with zero rows to one rank, since diffusers guesses one alpha for the file and PEFT names carry none.
ComfyUI's ``LoraLoaderModelOnly`` reads both for SD 1.x, SDXL, SD3, FLUX.1 and Qwen-Image (tested); it
maps no diffusers names for Wan, HunyuanVideo or LTX-Video (the K-LoRA node reads those).
Only low-rank layers of the denoiser are written: text-encoder weights and extra LoRAs are not part of
the fusion; files with full-weight parts (``.diff``, norms) and two-expert models are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .atomic import replacing
from . import methods, np_lora
from .errors import KLoRAError

UNET_COMPONENTS = ("unet",)


def merged_layers(adapters: dict, method: str, mu: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (up, down)} in float32 for one denoiser; ``adapters``: {"content": ..., "style": ...}
    (``klora.loras.DenoiserAdapter``, strengths applied)."""
    if method not in methods.EXPORTABLE:
        raise KLoRAError(f"--export_lora writes a static merge: use it with --method np or merge, not {method}")
    mu = 0.0 if method == "merge" else mu
    content, style = adapters["content"], adapters["style"]
    for role, adapter in adapters.items():
        if adapter.full:
            example = next(iter(adapter.full))
            raise KLoRAError(f"--export_lora: the {role} LoRA has full-weight parts (e.g. '{example}'), which an "
                             "ordinary LoRA file cannot hold; only low-rank layers can be exported")
    layers = {}
    for path in list(dict.fromkeys(list(content.modules) + list(style.modules))):
        factors = {}
        for role, adapter in adapters.items():
            if path in adapter.modules:
                A = adapter.state_dict[f"{path}.lora_A.weight"]
                B = adapter.state_dict[f"{path}.lora_B.weight"]
                factors[role] = (A, B, adapter.scales[path])
        if len(factors) == 2:
            (Ac, Bc, sc), (As, Bs, ss) = factors["content"], factors["style"]
            up, down = np_lora.merged_factors(Ac.flatten(1), Bc.flatten(1), sc, As.flatten(1), Bs.flatten(1), ss, mu)
            down = down.reshape(down.shape[0], *Ac.shape[1:])
            up = up.reshape(up.shape[0], up.shape[1], *Bc.shape[2:])
        else:
            ((A, B, scale),) = factors.values()
            up, down = B.double() * scale, A.double()
        layers[path] = (up.float().contiguous(), down.float().contiguous())
    return layers


def state_dict(layers: dict, component: str) -> dict[str, torch.Tensor]:
    """The file's tensors in the layout for ``component`` (see the module docstring)."""
    tensors = {}
    if component in UNET_COMPONENTS:
        for path, (up, down) in layers.items():
            name = "lora_unet_" + path.replace(".", "_")
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        return tensors
    rank = max(down.shape[0] for _, down in layers.values())
    for path, (up, down) in layers.items():
        pad = rank - down.shape[0]
        if pad:
            down = torch.cat([down, down.new_zeros(pad, *down.shape[1:])])
            up = torch.cat([up, up.new_zeros(up.shape[0], pad, *up.shape[2:])], dim=1)
        tensors[f"{component}.{path}.lora_A.weight"] = down.contiguous()
        tensors[f"{component}.{path}.lora_B.weight"] = up.contiguous()
    return tensors


def check_path(path) -> Path:
    """The export's path, refused unless it names a .safetensors file (checked before anything is loaded)."""
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise KLoRAError(f"--export_lora '{path}': the file name must end in .safetensors")
    return path


def write(path, tensors: dict, metadata: dict, overwrite: bool = False) -> Path:
    """Write atomically; refuse an existing file unless ``overwrite``."""
    from safetensors.torch import save_file

    path = check_path(path)
    if path.exists() and not overwrite:
        raise KLoRAError(f"--export_lora '{path}' already exists (pass --overwrite to replace)")
    with replacing(path) as tmp:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in metadata.items()})
    return path


def export_lora(target, content, style, path, *, method: str = "np", np_mu: float = methods.DEFAULT_NP_MU,
                content_scale: float = 1.0, style_scale: float = 1.0, content_weight_name=None,
                style_weight_name=None, overwrite: bool = False) -> Path:
    """Write the static fusion of two LoRAs for ``target`` (a pipeline or its denoiser) as one file.

    The metadata names the two source files, the method, mu and the strengths. Returns the path.
    """
    from .fusion import converted_pair

    methods.check_method(method)
    mu = methods.check_np_mu(np_mu)
    pair, labels = converted_pair(target, content, style, content_scale=content_scale, style_scale=style_scale,
                                  content_weight_name=content_weight_name, style_weight_name=style_weight_name)
    if len(pair) > 1:
        raise KLoRAError("--export_lora: this model has two denoisers (Wan 2.2's experts); exporting one file "
                         "per expert is not supported")
    ((component, adapters),) = pair.items()
    layers = merged_layers(adapters, method, mu)
    metadata = {"klora_method": method, "klora_content": labels["content"], "klora_style": labels["style"],
                "klora_np_mu": json.dumps(mu if method == "np" else 0.0),
                "klora_strengths": json.dumps({"content": content_scale, "style": style_scale}), "format": "pt"}
    return write(path, state_dict(layers, component), metadata, overwrite)
