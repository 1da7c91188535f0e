"""The notebook API of the original K-LoRA code, with its function names and arguments.

    from diffusers import FluxPipeline
    from utils import insert_community_flux_lora_to_unet

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")
    insert_community_flux_lora_to_unet(
        unet=pipe,                                   # the pipeline (a bare transformer works too)
        lora_weights_content_path="ginipick/flux-lora-eric-cat",
        lora_weights_style_path="glif-loradex-trainer/maxxd4240_BlueDraw",
        alpha=1.5, beta=1.275, diffuse_step=28,
        content_lora_weight_name="flux-lora-eric-cat.safetensors",
        style_lora_weight_name="BlueDraw.safetensors",
        patten="s*")
    image = pipe("eric cat in BluD!! style.", num_inference_steps=28).images[0]

Any family (SD3, Qwen-Image, Z-Image, FLUX.2, Wan, HunyuanVideo, ...):

    from utils import insert_klora
    klora = insert_klora(pipe, "my-dog.safetensors", "watercolor.safetensors", alpha=1.5, pattern="s*")
    image = pipe("a sbu dog, szn watercolor").images[0]
    klora.selection_log(); klora.set_method("merge"); remove_klora(pipe)

The other training-free rules run on the same object: ``insert_klora(..., method="np", np_mu=0.5)``
(NP-LoRA), ``method="est"`` (EST-LoRA; ``klora.dino.auto_beta`` sets its beta from two pictures),
``method="switch", switch_every=5`` (LoRA Switch). ``klora.export.export_lora(pipe, content, style,
"fused.safetensors", method="np")`` writes NP-LoRA's merge as one LoRA file.

``insert_klora`` returns the ``KLoRA`` object; its keyword arguments go to ``KLoRA``
(``method``, ``progress``, ``switching``, ``compile``, ``content_2``/``style_2`` for
Wan 2.2's second expert, weight names, ...). The original's functions below attach
the same object and return the
denoiser (UNet or transformer) with that object as its ``klora`` attribute:
``pipe.transformer.klora.selection_log()``, ``.set_schedule(...)``,
``.set_method("merge")``, ``.detach()``. Calling an ``insert_*`` function again
replaces the previous pair; ``remove_klora(pipe)`` takes K-LoRA off.

Progress through the denoising schedule: given the *pipeline*, K-LoRA reads the
step from the pipeline's scheduler, so any ``num_inference_steps`` is exact and
``diffuse_step`` / ``sum_timesteps`` are ignored. Given a *bare* denoiser there
is no scheduler to ask: the step is counted from the timesteps the denoiser is
called with and divided by ``diffuse_step`` (FLUX) or by
``sum_timesteps / layers`` (SD; the original's ``sum_timesteps`` counted layer
calls, e.g. 28000 = 560 layers x 50 steps), so those must match the run.

Pipelines with CPU offload enabled are fine: the offload is lifted while the
LoRAs are attached and restored as it was.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from klora import loras, rule
from klora.fusion import KLoRA, resolve_target, split_target
from klora.loras import LoRAError

FLUX_DEFAULT_STEPS = 28
SD_DEFAULT_STEPS = 50


# --- attaching K-LoRA --------------------------------------------------------

def insert_klora(pipe, content, style, alpha=rule.DEFAULT_ALPHA, beta=None, pattern: str = "s*", **kwargs) -> KLoRA:
    """K-LoRA on any LoRA-capable pipeline (or bare denoiser); returns the ``KLoRA`` object.

    ``content`` / ``style``: a .safetensors file, a folder, a hub id or a state dict.
    ``alpha`` / ``beta`` / ``pattern``: the scale schedule (``beta=None``: the
    pattern's default). ``kwargs`` go to ``KLoRA``: ``method`` (klora, est, switch,
    np, merge, content, style: ``klora.methods``), ``np_mu``, ``switch_every``, ``progress``
    ("steps" or "noise"), ``switching`` ("fused" or "adapters"), ``compile``,
    ``content_2`` / ``style_2`` (second expert), ``content_weight_name``, ... A
    previous K-LoRA on the same model is replaced; ``remove_klora(pipe)`` takes it off.
    Every denoiser it acts on gets the object as its ``klora`` attribute.
    """
    pipeline, denoisers = _pipeline_and_denoisers(pipe)
    for denoiser in denoisers:
        remove_klora(denoiser)
    with _offload_paused(pipeline):
        klora = KLoRA(pipe, content, style, pattern=pattern, alpha=alpha, beta=beta, **kwargs)
    for denoiser in klora.denoisers.values():
        denoiser.klora = klora
    return klora


def insert_community_flux_lora_to_unet(unet, lora_weights_content_path, lora_weights_style_path,
                                       alpha=rule.DEFAULT_ALPHA, beta=None, diffuse_step=None,
                                       content_lora_weight_name: str | None = None,
                                       style_lora_weight_name: str | None = None, patten: str = "s*",
                                       switching: str = "fused"):
    """K-LoRA on FLUX with any two FLUX LoRAs (hub ids, folders or files); returns the transformer.

    ``unet``: the FLUX pipeline (as in the paper's README) or its transformer.
    ``alpha`` / ``beta`` / ``patten`` ("s" or "s*"): the scale schedule; ``beta=None``
    takes the pattern's default (1.275 for "s*"). ``diffuse_step``: steps per image,
    used only with a bare transformer (default 28). ``*_lora_weight_name``: the file
    inside a hub repo or folder. ``switching``: "fused" (weights rewritten in place,
    base-model speed) or "adapters" (PEFT adapters).
    """
    return _insert(unet, lora_weights_content_path, lora_weights_style_path,
                   content_weight_name=content_lora_weight_name, style_weight_name=style_lora_weight_name,
                   alpha=alpha, beta=beta, pattern=patten,
                   num_inference_steps=diffuse_step or FLUX_DEFAULT_STEPS, switching=switching)


def insert_community_sd_lora_to_unet(unet, lora_weights_content_path, lora_weights_style_path,
                                     alpha=rule.DEFAULT_ALPHA, beta=None, sum_timesteps=None, pattern: str = "s*",
                                     switching: str = "fused"):
    """K-LoRA on Stable Diffusion with community (kohya/A1111) LoRAs; returns the UNet.

    Any format ``insert_sd_klora_to_unet`` reads works here too; the two names are
    kept because the original had both.
    """
    return insert_sd_klora_to_unet(unet, lora_weights_content_path, lora_weights_style_path,
                                   alpha=alpha, beta=beta, sum_timesteps=sum_timesteps, pattern=pattern,
                                   switching=switching)


def insert_sd_klora_to_unet(unet, lora_weights_content_path, lora_weights_style_path,
                            alpha=rule.DEFAULT_ALPHA, beta=None, sum_timesteps=None, pattern: str = "s*",
                            switching: str = "fused"):
    """K-LoRA on Stable Diffusion (XL, 1.x, 2.x) with two LoRAs; returns the UNet.

    ``unet``: the pipeline or its UNet. ``sum_timesteps``: the original's layer-call
    count (layers x steps); only used with a bare UNet, where it gives the step
    count (default: 50 steps). ``switching``: "fused" or "adapters".
    """
    steps = None
    if sum_timesteps is not None and _pipeline_and_denoiser(unet)[0] is None:
        content = loras.load_file(lora_weights_content_path, role="content LoRA")
        style = loras.load_file(lora_weights_style_path, role="style LoRA")
        shared = _shared_layer_count(content, style, _pipeline_and_denoiser(unet)[1])
        steps = max(1, round(int(sum_timesteps) / max(1, shared)))
        lora_weights_content_path, lora_weights_style_path = content, style
    return _insert(unet, lora_weights_content_path, lora_weights_style_path, content_weight_name=None,
                   style_weight_name=None, alpha=alpha, beta=beta, pattern=pattern,
                   num_inference_steps=steps or SD_DEFAULT_STEPS, switching=switching)


def remove_klora(unet) -> None:
    """Take K-LoRA off a pipeline or denoiser: the model is bit-identical to before."""
    for denoiser in _pipeline_and_denoisers(unet)[1]:
        attached = getattr(denoiser, "klora", None)
        if isinstance(attached, KLoRA):
            attached.detach()
            for module in attached.denoisers.values():
                if getattr(module, "klora", None) is attached:
                    del module.klora


def _insert(target, content, style, *, content_weight_name, style_weight_name, alpha, beta, pattern,
            num_inference_steps, switching):
    klora = insert_klora(target, content, style, alpha=alpha, beta=beta, pattern=pattern,
                         content_weight_name=content_weight_name, style_weight_name=style_weight_name,
                         num_inference_steps=num_inference_steps, switching=switching)
    return klora.denoiser


def _pipeline_and_denoiser(target):
    return split_target(target)


def _pipeline_and_denoisers(target):
    """(pipeline or None, [every denoiser K-LoRA would act on])."""
    pipeline, _, denoisers = resolve_target(target)
    return pipeline, list(denoisers.values())


def _shared_layer_count(content: loras.LoRAFile, style: loras.LoRAFile, denoiser) -> int:
    layers = [set(loras.to_denoiser_adapter(f, denoiser).modules) for f in (content, style)]
    return len(layers[0] & layers[1])


@contextmanager
def _offload_paused(pipeline):
    """Lift accelerate's CPU offload hooks while K-LoRA attaches, then put them back.

    K-LoRA's statistics need the real LoRA weights, which sequential offload keeps
    on the meta device; and diffusers' own re-enabling after a LoRA load asks for
    an accelerator, whatever device the offload used.
    """
    if pipeline is None:
        yield
        return
    from accelerate import cpu_offload
    from accelerate.hooks import AlignDevicesHook, CpuOffload, remove_hook_from_module

    model_offload = False
    sequential = {}  # component -> (execution device, offload_buffers), as cpu_offload() was called
    for component in pipeline.components.values():
        if not isinstance(component, torch.nn.Module) or not hasattr(component, "_hf_hook"):
            continue
        if isinstance(component._hf_hook, CpuOffload):
            model_offload = True
            continue
        streaming = [m._hf_hook for m in component.modules()
                     if isinstance(getattr(m, "_hf_hook", None), AlignDevicesHook) and m._hf_hook.offload]
        if streaming:
            sequential[component] = (streaming[0].execution_device, streaming[0].offload_buffers)
    if not model_offload and not sequential:
        yield
        return
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module) and hasattr(component, "_hf_hook"):
            remove_hook_from_module(component, recurse=component in sequential)
    try:
        yield
    finally:
        for component, (device, offload_buffers) in sequential.items():
            cpu_offload(component, device, offload_buffers=offload_buffers)
        if model_offload:
            pipeline.enable_model_cpu_offload(device=getattr(pipeline, "_offload_device", None))


# --- reading LoRA files ------------------------------------------------------

def get_lora_weights(lora_name_or_path: str, subfolder: str | None = None,
                     sub_lora_weights_name: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
    """The tensors of one LoRA file, as stored (no conversion).

    ``lora_name_or_path``: a .safetensors file, a folder, or a hub repo id;
    ``subfolder``: a folder inside it; ``sub_lora_weights_name``: the file name
    (default ``pytorch_lora_weights.safetensors``, or a folder's only .safetensors);
    ``kwargs`` go to ``huggingface_hub.hf_hub_download`` (revision, token, ...).
    Pickle files are refused; NaN/Inf and non-LoRA files are errors.
    """
    text = str(lora_name_or_path)
    local = Path(text).expanduser()
    if local.exists():
        path = loras.resolve(local / subfolder if subfolder else local, sub_lora_weights_name)
    elif subfolder or kwargs:
        path = _download(text, subfolder, sub_lora_weights_name, kwargs)
    else:
        path = loras.resolve(text, sub_lora_weights_name)
    return loras.read(path).tensors


def _download(repo_id, subfolder, weight_name, kwargs) -> Path:
    from huggingface_hub import hf_hub_download

    weight_name = weight_name or loras.DEFAULT_WEIGHT_NAME
    if not weight_name.endswith(".safetensors"):
        raise LoRAError(f"LoRA '{repo_id}': '{weight_name}' is not a .safetensors file; only safetensors are read")
    try:
        return Path(hf_hub_download(repo_id, weight_name, subfolder=subfolder, **kwargs))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise LoRAError(f"LoRA '{repo_id}': not a local path, and the hub could not provide "
                        f"'{os.path.join(subfolder or '', weight_name)}' ({type(exc).__name__}: {first})") from None


# Down/up suffix pairs of the naming schemes in circulation (PEFT, kohya, old diffusers).
_DOWN_UP_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"),
                     (".lora.down.weight", ".lora.up.weight"), ("_lora.down.weight", "_lora.up.weight"))


def get_ratio_between_content_and_style(lora_weights_content: dict, lora_weights_style: dict) -> float:
    """gamma of the K-LoRA rule for two raw state dicts (as ``get_lora_weights`` returns).

    Per layer both adapt: ``sum|dW_c| / sum|dW_s|`` with ``dW = alpha / r * B @ A``
    (alpha from ``<layer>.alpha`` keys, else r); then the mean of these ratios after
    dropping those at or above 3x their mean. Layers are matched by name, so both
    dicts must use the same naming; ``KLoRA(...).gamma`` handles mixed formats.
    """
    content, style = _dense_updates(lora_weights_content), _dense_updates(lora_weights_style)
    shared = [layer for layer in content if layer in style]
    if not shared:
        raise LoRAError("the content and style LoRAs have no layer name in common (different formats, or LoRAs "
                        "for different models?); attach them with KLoRA(...) and read its .gamma instead")
    ratios = []
    for layer in shared:
        style_sum = float(style[layer].abs().sum())
        ratios.append(float(content[layer].abs().sum()) / style_sum if style_sum > 0 else float("inf"))
    return rule.gamma_from_ratios(ratios)


def _dense_updates(tensors: dict) -> dict[str, torch.Tensor]:
    """``{layer name: alpha / r * B @ A}`` for every down/up pair in a raw state dict."""
    updates = {}
    for key, down in tensors.items():
        for down_suffix, up_suffix in _DOWN_UP_SUFFIXES:
            if not key.endswith(down_suffix):
                continue
            layer = key[: -len(down_suffix)]
            up = tensors.get(layer + up_suffix)
            if up is None:
                break
            rank = down.shape[0]
            alpha = tensors.get(layer + ".alpha")
            scale = float(alpha) / rank if alpha is not None else 1.0
            updates[layer] = rule.dense_delta(down.flatten(1), up.flatten(1), scale)
            break
    if not updates:
        raise LoRAError("not a LoRA state dict: no lora_A/lora_B or lora_down/lora_up pairs")
    return updates
