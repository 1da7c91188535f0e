"""What the command lines share: arguments, checks, output files, the run itself, error handling.

The scripts stay thin: they build a parser from these pieces, check the arguments,
then call ``fuse_and_generate``, which reads the model's family, checks every
generation argument against its pipeline's ``__call__``, loads the LoRA files and
the pipeline, attaches K-LoRA and writes one image (or clip) per seed.

Generation defaults are the pipeline's own: a flag the user leaves out is not
passed, so each family runs with the steps, guidance and size its ``__call__``
declares. ``args.soft_defaults`` (the SD/FLUX scripts' sizes, the demos' settings)
are passed only to pipelines that take them.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import dino, methods, rule
from .atomic import replacing
from .export import check_path as export_path
from .errors import KLoRAError  # noqa: F401  (re-exported for the scripts)
from .fusion import MAX_STRENGTH, METHODS, PROGRESS, SWITCHING

MAX_SIDE = 8192
DEMO_PROMPT = "a sbu dog in szn style"

# Generation arguments that have their own flag; --call_arg may not set them (or what the script sets).
OWN_FLAGS = ("negative_prompt", "num_inference_steps", "guidance_scale", "guidance_scale_2", "true_cfg_scale",
             "height", "width", "num_frames", "max_sequence_length", "strength", "image", "mask_image",
             "control_image")
SET_BY_SCRIPT = {"prompt": "--prompt", "generator": "--seeds", "num_images_per_prompt": "--seeds / --num_images "
                 "(one output per seed)", "num_videos_per_prompt": "--seeds / --num_images (one clip per seed)",
                 "output_type": "the script", "return_dict": "the script", "callback_on_step_end": "the script"}
# What the settings line shows (given or the pipeline's default), in this order.
SHOWN_SETTINGS = ("num_inference_steps", "guidance_scale", "guidance_scale_2", "true_cfg_scale", "height", "width",
                  "num_frames", "strength", "max_sequence_length")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# --- arguments -------------------------------------------------------------------

def add_lora_arguments(parser, second_expert: bool = False) -> None:
    group = parser.add_argument_group("LoRAs")
    group.add_argument("--lora_name_or_path_content", help="content (subject) LoRA: .safetensors file, folder or hub id")
    group.add_argument("--lora_name_or_path_style", help="style LoRA: .safetensors file, folder or hub id")
    group.add_argument("--content_weight_name", help="file inside the content folder or hub repo "
                       "(default pytorch_lora_weights.safetensors, or the folder's only .safetensors)")
    group.add_argument("--style_weight_name", help="file inside the style folder or hub repo")
    if second_expert:
        group.add_argument("--lora_name_or_path_content_2", help="content LoRA for the second (low-noise) expert of "
                           "a two-expert model such as Wan 2.2 A14B: the LOW file of a HIGH/LOW pair "
                           "(default: the content LoRA goes into both experts)")
        group.add_argument("--lora_name_or_path_style_2", help="style LoRA for the second (low-noise) expert")
        group.add_argument("--content_2_weight_name", help="file inside the content_2 folder or hub repo")
        group.add_argument("--style_2_weight_name", help="file inside the style_2 folder or hub repo")
    group.add_argument("--text_encoder_lora", action="store_true",
                       help="also apply text-encoder weights found in the LoRA files (both, always on)")
    group.add_argument("--content_scale", type=float, default=1.0,
                       help="strength of the content LoRA: multiplies its delta (default 1.0; the choice does not "
                            "change with it)")
    group.add_argument("--style_scale", type=float, default=1.0, help="strength of the style LoRA (default 1.0)")
    stack = parser.add_argument_group("extra LoRAs (always on at their scale, outside K-LoRA's choice)")
    stack.add_argument("--extra_lora", action="append", default=[], metavar="PATH",
                       help="a LoRA applied at every step, e.g. a speed (Lightning, lightx2v) or detail LoRA: "
                            ".safetensors file, folder or hub id (repeatable)")
    stack.add_argument("--extra_lora_scale", action="append", type=float, default=[], metavar="S",
                       help="scale of each --extra_lora, matched by position (repeatable; default 1.0)")
    if second_expert:
        stack.add_argument("--extra_lora_2", action="append", default=[], metavar="PATH",
                           help="extra LoRAs for the second (low-noise) expert instead of --extra_lora there: the LOW "
                                "file of a HIGH/LOW pair such as lightx2v's (repeatable)")
        stack.add_argument("--extra_lora_2_scale", action="append", type=float, default=[], metavar="S",
                           help="scale of each --extra_lora_2, matched by position (default 1.0)")


def add_klora_arguments(parser) -> None:
    group = parser.add_argument_group("K-LoRA")
    group.add_argument("--method", default="klora", choices=METHODS,
                       help="klora: the K-LoRA rule; est: EST-LoRA (K-LoRA's choice on the energies ||dW||^2); "
                            "switch: LoRA Switch (content, then style, every --switch_every steps); np: NP-LoRA "
                            "(one static merge, the content projected off the style's directions); merge: both "
                            "LoRAs everywhere (direct merge); content / style: one LoRA only (default: klora)")
    group.add_argument("--pattern", default="s*", help="scale pattern of klora and est: 's' (alpha*p+beta) or "
                       "'s*' ((alpha*p+beta) mod alpha) (default: s*)")
    group.add_argument("--alpha", type=float, default=rule.DEFAULT_ALPHA, help="alpha of the scale (default 1.5)")
    group.add_argument("--beta", type=_beta_argument, default=None,
                       help="beta of the scale, a number >= 0 (default: 0.5 for 's', 0.85*alpha = 1.275 for 's*'); "
                            "with --method est also 'auto': 1 - DINO cosine of a content-only and a style-only "
                            "picture of the same prompt and first seed (EST-LoRA's style discrepancy)")
    group.add_argument("--dino_model", default=dino.DEFAULT_MODEL,
                       help=f"the ViT for --beta auto: hub id or folder (default: {dino.DEFAULT_MODEL})")
    group.add_argument("--np_mu", type=_mu_argument, default=methods.DEFAULT_NP_MU,
                       help="NP-LoRA's mu: 0 = the plain merge, inf = the hard projection (default 0.5)")
    group.add_argument("--switch_every", type=int, default=methods.DEFAULT_SWITCH_EVERY, metavar="N",
                       help="LoRA Switch: steps per block, content first (default 5)")
    group.add_argument("--export_lora", metavar="PATH",
                       help="with --method np or merge: also write the merged LoRA as one .safetensors file that "
                            "diffusers' load_lora_weights (and ComfyUI, for the families docs/method.md lists) "
                            "reads on its own")
    add_engine_arguments(group)
    group.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                       help="torch.compile the denoiser (its repeated blocks); optional backend, e.g. aot_eager "
                            "(default backend: inductor)")
    group.add_argument("--selection_log", help="write the per-layer, per-step choices as JSON to this file")


def add_engine_arguments(group) -> None:
    """--progress and --switching: how K-LoRA follows the schedule and applies its choice."""
    group.add_argument("--progress", default="steps", choices=PROGRESS,
                       help="steps: p = step / steps of this run (the paper's); noise: p = 1 - t / T from the "
                            "scheduler's timestep, so img2img at strength 0.5 starts half-way (default: steps)")
    group.add_argument("--switching", default="fused", choices=SWITCHING,
                       help="fused: each layer's weight holds the chosen LoRA, rewritten from an exact copy at a "
                            "switch (base-model speed); adapters: PEFT adapters (default: fused)")


def add_generation_arguments(parser, default_steps: int | None = None, default_guidance: float | None = None,
                             default_size: int | None = None) -> None:
    """Prompt, seeds, sizes, device and output flags. A default of None: the pipeline's own."""
    def default_text(value, unit=""):
        return f"default {value}{unit}" if value is not None else "default: the pipeline's"

    group = parser.add_argument_group("generation")
    group.add_argument("--prompt", help="text prompt (include both LoRAs' trigger words)")
    group.add_argument("--negative_prompt", default=None, help="negative prompt")
    group.add_argument("--num_inference_steps", type=int, default=default_steps,
                       help=f"denoising steps ({default_text(default_steps)})")
    group.add_argument("--guidance_scale", type=float, default=default_guidance,
                       help=f"classifier-free guidance scale ({default_text(default_guidance)})")
    group.add_argument("--seeds", type=int, nargs="+", default=None, help="one output per seed (default: 0)")
    group.add_argument("--num_images", type=int, default=None, help="seeds 0..N-1 (instead of --seeds)")
    group.add_argument("--height", type=int, default=None, help=f"height, multiple of 8 ({default_text(default_size)})")
    group.add_argument("--width", type=int, default=None, help=f"width, multiple of 8 ({default_text(default_size)})")
    group.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N, mps")
    group.add_argument("--dtype", default="auto", help="auto (the family's half precision on a GPU, fp32 on the "
                       "CPU), fp32, fp16 or bf16")
    group.add_argument("--output_folder", default="output", help="where outputs go (default: output)")
    group.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    group.add_argument("--demo", action="store_true",
                       help="no download: a tiny built-in model and two synthetic LoRAs (outputs are noise)")
    parser.set_defaults(soft_defaults={"height": default_size, "width": default_size} if default_size else {})


def add_pipeline_arguments(parser, img2img: bool = True) -> None:
    """Family-specific generation arguments, input images, and CPU offload."""
    group = parser.add_argument_group("family-specific arguments (checked against the pipeline's __call__)")
    group.add_argument("--true_cfg_scale", type=float, default=None,
                       help="true classifier-free guidance with --negative_prompt (Qwen-Image, FLUX.1, "
                            "HunyuanVideo; two denoiser calls per step)")
    group.add_argument("--max_sequence_length", type=int, default=None, help="text encoder prompt length in tokens")
    group.add_argument("--call_arg", action="append", default=[], metavar="KEY=VALUE",
                       help="any other argument of the pipeline's __call__ (repeatable); VALUE is read as JSON "
                            "when it parses (4, 0.5, true, [1, 2], null), else as a string")
    inputs = parser.add_argument_group("input images")
    what = " (an image model switches to its family's image-to-image pipeline)" if img2img else ""
    inputs.add_argument("--image", help=f"input image: img2img / image-to-video / editing{what}")
    inputs.add_argument("--mask_image", help="inpainting mask (white = repaint), with --image")
    inputs.add_argument("--control_image", help="ControlNet conditioning image")
    inputs.add_argument("--strength", type=float, default=None,
                        help="how much of --image to repaint, 0 to 1 (default: the pipeline's)")
    add_offload_arguments(parser, parser.add_argument_group("GPU memory"))


def add_offload_arguments(parser, group=None) -> None:
    memory = (group or parser).add_mutually_exclusive_group()
    memory.add_argument("--cpu_offload", action="store_true",
                        help="model CPU offload: each model moves to the GPU only while it runs")
    memory.add_argument("--sequential_cpu_offload", action="store_true",
                        help="sequential CPU offload: weights stream to the GPU layer by layer (least memory)")


def add_video_arguments(parser) -> None:
    group = parser.add_argument_group("video")
    group.add_argument("--num_frames", type=int, default=None,
                       help="frames per clip (default: the pipeline's; Wan and HunyuanVideo take 4k+1, "
                            "LTX-Video and CogVideoX 8k+1)")
    group.add_argument("--fps", type=float, default=None,
                       help="frames per second of the MP4 (default: the model's, e.g. Wan 16, HunyuanVideo 15, "
                            "LTX-Video 25, CogVideoX 8); also passed to pipelines that take a frame rate")
    group.add_argument("--guidance_scale_2", type=float, default=None,
                       help="guidance of the low-noise expert (Wan 2.2 A14B; default: the pipeline's)")
    group.add_argument("--save_frames", action="store_true",
                       help="also write every frame as PNG: <method>_seed<N>_frames/0000.png, ...")


# --- checks ------------------------------------------------------------------------

def check_arguments(args) -> None:
    """Reject bad values before anything is loaded."""
    args.soft_defaults = dict(getattr(args, "soft_defaults", None) or {})
    if args.pattern not in rule.PATTERNS:
        raise KLoRAError(f"--pattern {args.pattern!r}: choose 's' or 's*'")
    if not (args.alpha > 0 and args.alpha < float("inf")):
        raise KLoRAError(f"--alpha {args.alpha}: must be a positive number")
    if args.beta == methods.AUTO:
        if args.method != "est":
            raise KLoRAError(f"--beta auto is EST-LoRA's style discrepancy: use it with --method est "
                             f"(not {args.method}), or give a number")
    elif args.beta is not None:
        methods.check_beta(args.beta, "--beta")
    methods.check_np_mu(args.np_mu, "--np_mu")
    methods.check_switch_every(args.switch_every, "--switch_every")
    if args.export_lora and args.method not in methods.EXPORTABLE:
        raise KLoRAError(f"--export_lora writes a static merge: use it with --method np or merge, not {args.method}")
    for name, low in (("num_inference_steps", 1), ("max_sequence_length", 1), ("num_frames", 1)):
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise KLoRAError(f"--{name} {value}: must be at least {low}")
    for name in ("guidance_scale", "guidance_scale_2", "true_cfg_scale"):
        value = getattr(args, name, None)
        if value is not None and not (value >= 0 and value < float("inf")):
            raise KLoRAError(f"--{name} {value}: must be 0 or more")
    strength = getattr(args, "strength", None)
    if strength is not None and not 0 < strength <= 1:
        raise KLoRAError(f"--strength {strength}: must be more than 0 and at most 1")
    fps = getattr(args, "fps", None)
    if fps is not None and not (fps > 0 and fps <= 1000):
        raise KLoRAError(f"--fps {fps}: must be more than 0 (at most 1000)")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8 or value > MAX_SIDE):
            raise KLoRAError(f"--{name} {value}: must be a positive multiple of 8 (at most {MAX_SIDE})")
    if getattr(args, "mask_image", None) and not getattr(args, "image", None):
        raise KLoRAError("--mask_image needs --image (the image to inpaint)")
    if args.num_images is not None:
        if args.num_images < 1:
            raise KLoRAError(f"--num_images {args.num_images}: must be at least 1")
        if args.seeds is not None:
            raise KLoRAError("--seeds and --num_images: give one or the other")
        args.seeds = list(range(args.num_images))
    if args.seeds is None:
        args.seeds = [0]
    if len(set(args.seeds)) != len(args.seeds):
        raise KLoRAError("--seeds: each seed once, please")
    args.call_arguments = parse_call_arguments(getattr(args, "call_arg", None) or [])
    check_stack_arguments(args)
    if not args.demo:
        for flag in ("pretrained_model_name_or_path", "lora_name_or_path_content", "lora_name_or_path_style"):
            if not getattr(args, flag, None):
                raise KLoRAError(f"--{flag} is required (or run --demo to try the tiny built-in model)")
        if not args.prompt:
            raise KLoRAError("--prompt is required (include both LoRAs' trigger words)")


def _beta_argument(text: str):
    if text.strip().lower() == methods.AUTO:
        return methods.AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 or 'auto', got {text!r}") from None


def _mu_argument(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 or inf, got {text!r}") from None


def check_stack_arguments(args) -> None:
    """--content_scale / --style_scale and the extra LoRAs' scales; sets ``args.extra_loras``
    ({"": [(path, scale)], "_2": [...]})."""
    for name in ("content_scale", "style_scale"):
        value = getattr(args, name, 1.0)
        if not _strength_ok(value):
            raise KLoRAError(f"--{name} {value}: must be a finite number other than 0, from -{MAX_STRENGTH:g} to "
                             f"{MAX_STRENGTH:g} (0 would apply nothing; --method "
                             f"{'style' if name == 'content_scale' else 'content'} leaves it out)")
    args.extra_loras = {suffix: extra_loras(args, suffix) for suffix in ("", "_2")}


def _strength_ok(value: float) -> bool:
    return math.isfinite(value) and value != 0 and abs(value) <= MAX_STRENGTH


def extra_loras(args, suffix: str = "") -> list[tuple[str, float]]:
    """[(path, scale)] of --extra_lora{suffix}, each scale matched by position (default 1.0)."""
    paths = getattr(args, f"extra_lora{suffix}", None) or []
    scales = getattr(args, f"extra_lora{suffix}_scale", None) or []
    if len(scales) > len(paths):
        raise KLoRAError(f"--extra_lora{suffix}_scale given {len(scales)} times for {len(paths)} "
                         f"--extra_lora{suffix}: one scale per extra LoRA, in the same order")
    for scale in scales:
        if not _strength_ok(scale):
            raise KLoRAError(f"--extra_lora{suffix}_scale {scale}: must be a finite number other than 0, "
                             f"from -{MAX_STRENGTH:g} to {MAX_STRENGTH:g}")
    return [(path, scales[i] if i < len(scales) else 1.0) for i, path in enumerate(paths)]


def parse_call_arguments(items: list[str]) -> dict:
    """``["key=value", ...]`` -> {key: value}; values are JSON where they parse, else strings."""
    parsed = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise KLoRAError(f"--call_arg {item!r}: write KEY=VALUE, e.g. --call_arg num_frames=81")
        if key in parsed:
            raise KLoRAError(f"--call_arg {key}: given twice")
        if key in SET_BY_SCRIPT:
            raise KLoRAError(f"--call_arg {key}: set by {SET_BY_SCRIPT[key]}, not --call_arg")
        if key in OWN_FLAGS:
            raise KLoRAError(f"--call_arg {key}: use --{key}")
        try:
            parsed[key] = json.loads(text)
        except ValueError:
            parsed[key] = text
    return parsed


def _check_kind(name_or_path, family, cls, expect) -> None:
    from . import pipelines

    pipelines.check_expected(str(name_or_path), family, cls, expect)
    pipelines.check_supported(family, f"--pretrained_model_name_or_path '{name_or_path}' ({cls.__name__})")


def call_parameters(cls) -> dict:
    """The named parameters of a pipeline class's ``__call__`` (not self, *args or **kwargs)."""
    return {name: p for name, p in inspect.signature(cls.__call__).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _is_controlnet(cls) -> bool:
    return "controlnet" in inspect.signature(cls.__init__).parameters


def pipeline_class_for(model_class, args, kind: str):
    """The pipeline class to run: the model's own, or, with ``--image`` on an image model whose
    pipeline takes no init image, its family's image-to-image (``--mask_image``: inpainting) class
    from diffusers' AutoPipeline tables (SDXL -> StableDiffusionXLImg2ImgPipeline, ...)."""
    if kind != "image" or not getattr(args, "image", None):
        return model_class
    from diffusers.pipelines import auto_pipeline

    inpaint = bool(args.mask_image)
    table = (auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING if inpaint
             else auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING)
    if model_class in table.values():
        return model_class
    for key, text2image in auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING.items():
        if text2image is model_class and key in table:
            return table[key]
    if "image" in call_parameters(model_class) and not _is_controlnet(model_class) and not inpaint:
        return model_class  # editing pipelines: the image is a reference (FLUX.2, Kontext, Qwen-Image-Edit)
    task = "inpainting" if inpaint else "image-to-image"
    raise KLoRAError(f"--image: diffusers has no {task} pipeline for {model_class.__name__}")


def _read_image(path: str, flag: str, mode: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(Path(path).expanduser()) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise KLoRAError(f"{flag} '{path}': no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise KLoRAError(f"{flag} '{path}': not an image file ({type(exc).__name__})") from None


def call_arguments(args, cls) -> dict:
    """The keyword arguments of every generation call (all but prompt and generator), each one
    checked against ``cls.__call__``: flags the user gave, soft defaults the class takes, input
    images, and --call_arg values. An argument the pipeline does not take is a one-line error."""
    parameters = call_parameters(cls)
    given, where = {}, {}
    for name in OWN_FLAGS:
        value = getattr(args, name, None)
        if value is not None and name not in ("image", "mask_image", "control_image"):
            given[name], where[name] = value, f"--{name}"
    for name, value in args.soft_defaults.items():
        if name not in given and name in parameters and value is not None:
            given[name], where[name] = value, f"--{name}"
    images = {}  # argument -> (flag, path, PIL mode), read once every name is known to fit
    for name, mode in (("image", "RGB"), ("mask_image", "L")):
        if getattr(args, name, None):
            images[name] = (f"--{name}", getattr(args, name), mode)
    if getattr(args, "control_image", None):
        name = "control_image" if "control_image" in parameters or "image" in images else "image"
        if name == "image" and not _is_controlnet(cls):
            raise KLoRAError(f"--control_image: {cls.__name__} runs no ControlNet")
        images[name] = ("--control_image", args.control_image, "RGB")
    elif _is_controlnet(cls):
        how = "--control_image PATH" if hasattr(args, "control_image") else "inference.py with --control_image"
        raise KLoRAError(f"{cls.__name__} runs a ControlNet: it needs a control image ({how})")
    for name, (flag, _, _) in images.items():
        given[name], where[name] = None, flag
    fps = getattr(args, "fps", None)
    rate = next((n for n in ("frame_rate", "fps") if n in parameters), None)
    if fps is not None and rate is not None:
        given[rate], where[rate] = int(fps) if float(fps).is_integer() else fps, "--fps"
    for name, value in args.call_arguments.items():
        given[name], where[name] = value, f"--call_arg {name}"
    for name, value in getattr(args, "demo_call_arguments", {}).items():
        if name not in given:
            given[name], where[name] = value, "--demo"
    for name in given:
        if name not in parameters:
            raise KLoRAError(f"{where[name]}: {cls.__name__} does not take '{name}' (its __call__ takes: "
                             f"{', '.join(parameters)})")
        annotation = str(parameters[name].annotation)
        if isinstance(given[name], list) and "tuple" in annotation and "list" not in annotation:
            given[name] = tuple(given[name])  # JSON has no tuples; "original_size=[1024, 1024]"
    for name, (flag, path, mode) in images.items():
        given[name] = _read_image(path, flag, mode)
    return given


def describe_settings(pipe, kwargs: dict) -> str:
    """The generation settings in effect: what was given, else the pipeline's default."""
    parameters = call_parameters(type(pipe))
    parts = []
    for name in SHOWN_SETTINGS:
        if name in kwargs:
            parts.append(f"{name} {_short(kwargs[name])}")
        elif name in parameters:
            default = parameters[name].default
            if default is None and name in ("height", "width"):
                sample, scale = getattr(pipe, "default_sample_size", None), getattr(pipe, "vae_scale_factor", None)
                default = sample * scale if isinstance(sample, int) and isinstance(scale, int) else "auto"
            parts.append(f"{name} {'unset' if default is None else _short(default)} (default)")
    other = [f"{k}={_short(v)}" for k, v in kwargs.items()
             if k not in SHOWN_SETTINGS and k not in ("negative_prompt", "image", "mask_image", "control_image")]
    return f"settings ({type(pipe).__name__}): " + ", ".join(parts + other)


def _short(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# --- demos ------------------------------------------------------------------------------

def use_demo(args, family: str, scratch: str, prompt: str, output_folder: str) -> None:
    """Point ``args`` at a tiny built-in model and two demo LoRAs written to ``scratch``.

    ``family``: "unet" (tiny SDXL) or "transformer" (tiny FLUX). Flags the user gave
    (prompt, output folder, selection log, device) still apply; the demo only fills in
    what was left at its default.
    """
    from .tiny import build_demo

    model, content, style = build_demo(scratch, family)
    _point_at_demo(args, model, content, style, prompt, output_folder)
    args.soft_defaults = {"height": 64, "width": 64}


def check_world() -> None:
    from . import world_eval

    for path in (world_eval.MODEL / "model_index.json", world_eval.SUBJECT_LORA, world_eval.STYLE_LORA):
        if not path.is_file():
            raise KLoRAError(f"--demo needs the trained world, and '{path}' is missing "
                             "(a checkout without world/? python train_world.py makes it)")


def use_world_demo(args, output_folder: str) -> None:
    """Point ``args`` at the trained world (world/sdxl and its sbu and szn LoRAs, docs/world.md):
    its prompt, and its steps and guidance unless given; the size is the model's own (32 x 32)."""
    from . import world, world_eval

    check_world()
    _point_at_demo(args, str(world_eval.MODEL), str(world_eval.SUBJECT_LORA), str(world_eval.STYLE_LORA),
                   world.FUSED_PROMPT, output_folder)
    if args.num_inference_steps is None:
        args.num_inference_steps = world_eval.STEPS
    if args.guidance_scale is None:
        args.guidance_scale = world_eval.GUIDANCE


def use_tiny_demo(args, key: str, scratch: str, output_folder: str, steps: int, video: bool = False) -> None:
    """Like ``use_demo`` for any tiny family of ``klora.tiny`` (or ``klora.tiny_video``):
    its size, frame count and call arguments become soft defaults, ``steps`` the step
    count unless --num_inference_steps was given."""
    import diffusers

    from .pipelines import family_for_model

    if video:
        from .tiny_video import TINY_VIDEO_CALL_KWARGS as calls
        from .tiny_video import TINY_VIDEO_SIZES, build_tiny_video, write_demo_video_loras

        model = build_tiny_video(key, os.path.join(scratch, f"tiny-{key}"))
        height, width, frames = TINY_VIDEO_SIZES[key]
        soft = {"height": height, "width": width, "num_frames": frames}
    else:
        from .tiny import TINY_CALL_KWARGS as calls
        from .tiny import TINY_SIZES, build_tiny, write_demo_loras

        model = build_tiny(key, os.path.join(scratch, f"tiny-{key}"))
        soft = {"height": TINY_SIZES[key], "width": TINY_SIZES[key]}
    family, pipeline_class = family_for_model(model)
    component = family.denoisers[0]
    config = json.loads((Path(model) / component / "config.json").read_text())
    denoiser = getattr(diffusers, config["_class_name"]).from_pretrained(model, subfolder=component)
    if video:
        content, style = write_demo_video_loras(denoiser, scratch, prefix=component)
    else:
        content, style = write_demo_loras(denoiser, scratch)
    _point_at_demo(args, model, content, style, DEMO_PROMPT, output_folder)
    args.soft_defaults = soft
    args.demo_call_arguments = dict(calls[key])
    if args.num_inference_steps is None:
        args.num_inference_steps = steps
    if _is_controlnet(pipeline_class) and not args.control_image:  # a noise control image
        import numpy as np
        from PIL import Image

        noise = np.random.default_rng(0).integers(0, 256, (soft["height"], soft["width"], 3), dtype=np.uint8)
        args.control_image = os.path.join(scratch, "control.png")
        Image.fromarray(noise).save(args.control_image)


def _point_at_demo(args, model, content, style, prompt, output_folder) -> None:
    args.pretrained_model_name_or_path = model
    args.lora_name_or_path_content, args.lora_name_or_path_style = content, style
    args.prompt = args.prompt or prompt
    if args.output_folder == "output":
        args.output_folder = output_folder
    if args.selection_log is None:
        args.selection_log = os.path.join(args.output_folder, "selection_log.json")
    args.device = "cpu" if args.device == "auto" else args.device


def refuse_model_flags_with_demo(args, flags=("pretrained_model_name_or_path", "lora_name_or_path_content",
                                              "lora_name_or_path_style", "lora_name_or_path_content_2",
                                              "lora_name_or_path_style_2")) -> None:
    given = [flag for flag in (*flags, "extra_lora", "extra_lora_2") if getattr(args, flag, None) not in (None, [])]
    if given:
        raise KLoRAError(f"--demo brings its own model and LoRAs; drop --{given[0]}")


# --- outputs -----------------------------------------------------------------------------

def method_tag(method: str, pattern: str) -> str:
    return f"{method}-{'sstar' if pattern == 's*' else 's'}" if method in methods.CHOOSING else method


@dataclass
class Outputs:
    folder: Path
    media: list[tuple[int, Path]]  # (seed, image or clip path)
    maps: dict[int, Path] = field(default_factory=dict)  # seed -> selection map path
    log: Path | None = None
    kind: str = "image"  # "image" (PNG) or "video" (MP4)
    frames: dict[int, Path] = field(default_factory=dict)  # seed -> folder of PNG frames (--save_frames)
    fps: float | None = None  # video: frames per second of the MP4
    export: Path | None = None  # --export_lora

    def all(self) -> list[Path]:
        return ([p for _, p in self.media] + list(self.maps.values()) + list(self.frames.values())
                + ([self.log] if self.log else []) + ([self.export] if self.export else []))


def plan_outputs(args, kind: str = "image") -> Outputs:
    """Decide every output path up front; refuse existing ones unless --overwrite."""
    folder = Path(args.output_folder).expanduser()
    tag = method_tag(args.method, args.pattern)
    suffix = ".mp4" if kind == "video" else ".png"
    media = [(seed, folder / f"{tag}_seed{seed}{suffix}") for seed in args.seeds]
    maps = {seed: folder / f"{tag}_seed{seed}_selection.png" for seed in args.seeds} \
        if args.method in methods.PER_STEP else {}
    frames = {seed: folder / f"{tag}_seed{seed}_frames" for seed in args.seeds} \
        if getattr(args, "save_frames", False) else {}
    log = Path(args.selection_log).expanduser() if args.selection_log else None
    export = export_path(args.export_lora) if getattr(args, "export_lora", None) else None
    outputs = Outputs(folder=folder, media=media, maps=maps, log=log, kind=kind, frames=frames, export=export)
    _check_writable(folder, "--output_folder")
    if log is not None:
        _check_writable(log.parent if str(log.parent) else Path("."), "--selection_log")
    if export is not None:
        _check_writable(export.parent if str(export.parent) else Path("."), "--export_lora")
    if not args.overwrite:
        existing = [str(p) for p in outputs.all() if p.exists()]
        if existing:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            raise KLoRAError(f"output file '{existing[0]}'{more} already exists (pass --overwrite to replace)")
    return outputs


def _check_writable(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".klora-write-test-"):
            pass
    except OSError as exc:
        raise KLoRAError(f"{flag} '{folder}': cannot write there ({exc.strerror or exc})") from None


def save_png(image, path: Path) -> None:
    """Write a PNG atomically: a reader never sees a half-written image."""
    with replacing(path) as tmp:
        image.save(tmp, format="PNG")


# --- the run ------------------------------------------------------------------------------

def fuse_and_generate(args, expect: str) -> None:
    """Everything after the argument checks: family, LoRA files, pipeline, K-LoRA, outputs.

    ``expect``: "image" / "video" (inference.py, inference_video.py), "unet" / "transformer"
    (inference_sd.py, inference_flux.py). Every user mistake raises ``KLoRAError`` before
    the first output file is written.
    """
    from . import loras
    from .fusion import KLoRA, check_loras
    from .pipelines import denoisers_of, family_for_model, load_pipeline, resolve_device

    kind = "video" if expect == "video" else "image"
    outputs = plan_outputs(args, kind)
    model = args.pretrained_model_name_or_path
    family, model_class = family_for_model(model)
    _check_kind(model, family, model_class, expect)
    pipeline_class = pipeline_class_for(model_class, args, kind)
    call = call_arguments(args, pipeline_class)
    if kind == "video":
        from . import video

        video.check_num_frames(family.name, call.get("num_frames"))
    device = resolve_device(args.device)
    offload = getattr(args, "cpu_offload", False) or getattr(args, "sequential_cpu_offload", False)
    if getattr(args, "sequential_cpu_offload", False) and device == "cpu":
        raise KLoRAError("--sequential_cpu_offload streams weights from the CPU to a GPU; "
                         "with --device cpu there is nothing to offload (drop the flag)")
    # The LoRAs are small: fetch and check them before the (many GB) base model.
    files = {}
    for role in ("content", "style", "content_2", "style_2"):
        source = getattr(args, f"lora_name_or_path_{role}", None)
        if source:
            label = f"{role.removesuffix('_2')} LoRA" + (" (second expert)" if role.endswith("_2") else "")
            files[role] = loras.load_file(source, getattr(args, f"{role}_weight_name", None), label)
    extras = getattr(args, "extra_loras", {"": [], "_2": []})
    for suffix, where in (("", ""), ("_2", " (second expert)")):
        for i, (source, _) in enumerate(extras[suffix], start=1):
            files[f"extra{i}{suffix}"] = loras.load_file(source, None, f"extra LoRA {i}{where}")

    # ... and check them against the model's layers, built from its configs on the meta device, before
    # its weights load: a LoRA that does not fit is refused in one line (KLoRA warns again at attach).
    check_loras(model, files)
    embedder = None
    if args.beta == methods.AUTO:
        if kind == "video":
            raise KLoRAError("--beta auto compares two pictures (EST-LoRA, for image models); give video models a "
                             "number")
        embedder = dino.Embedder(args.dino_model)  # before the base model: a bad name fails in seconds

    pipe = load_pipeline(model, expect, device, args.dtype, place=not offload)
    if pipeline_class is not type(pipe):
        with loras.quiet_libraries():
            pipe = pipeline_class.from_pipe(pipe)
        print(f"--image: running {pipeline_class.__name__} (the image-to-image pipeline of {family.name})")
    if kind == "video":
        video.check_num_frames(family.name, call.get("num_frames"), video.max_frames(pipe))
        outputs.fps = args.fps or video.default_fps(pipe, family.name)
    second = [f"lora_name_or_path_{r}" for r in ("content_2", "style_2") if r in files]
    second += ["extra_lora_2"] if extras["_2"] else []
    if second and len(denoisers_of(pipe, family)) < 2:
        raise KLoRAError(f"--{second[0]}: {type(pipe).__name__} ({family.name}) has one denoiser; "
                         "the _2 LoRAs are for the second (low-noise) expert of two-expert models such as "
                         "Wan 2.2 A14B")
    compile_option = False
    if getattr(args, "compile", None):
        compile_option = True if args.compile == "inductor" else {"backend": args.compile}
    # K-LoRA first, offload second: its statistics need the real weights, and the
    # offload hooks then move the weights (or adapters) with the layers they belong to.
    stack = {suffix: [(files[f"extra{i}{suffix}"], scale) for i, (_, scale) in enumerate(extras[suffix], start=1)]
             for suffix in ("", "_2")}
    klora = KLoRA(pipe, files["content"], files["style"], content_2=files.get("content_2"),
                  style_2=files.get("style_2"), extra_loras=stack[""], extra_loras_2=stack["_2"] or None,
                  content_scale=args.content_scale, style_scale=args.style_scale,
                  pattern=args.pattern, alpha=args.alpha, beta=None if embedder else args.beta,
                  method=args.method, progress=getattr(args, "progress", "steps"),
                  switching=getattr(args, "switching", "fused"), compile=compile_option,
                  text_encoder_lora=args.text_encoder_lora, np_mu=args.np_mu, switch_every=args.switch_every)
    if outputs.export is not None:
        from .export import export_lora

        export_lora(pipe, files["content"], files["style"], outputs.export, method=args.method, np_mu=args.np_mu,
                    content_scale=args.content_scale, style_scale=args.style_scale, overwrite=args.overwrite)
        print(f"wrote {outputs.export} (the {args.method} LoRA of the two files)")
    if getattr(args, "cpu_offload", False):
        pipe.enable_model_cpu_offload(device=device)
    elif getattr(args, "sequential_cpu_offload", False):
        pipe.enable_sequential_cpu_offload(device=device)
    if embedder is not None:
        auto_beta(pipe, klora, embedder, args, call)
    print(klora_summary(klora))
    print(describe_settings(pipe, call) + (f", fps {outputs.fps:g}" if outputs.fps else ""))
    print(f"prompt: {args.prompt}")
    generate(pipe, klora, args, outputs, **call)


def auto_beta(pipe, klora, embedder, args, call: dict) -> float:
    """``dino.auto_beta`` at the run's prompt, first seed and settings, with the run's error handling."""
    seed = args.seeds[0]
    passed_through = list(getattr(args, "call_arguments", None) or {})
    print(f"--beta auto: a content-only and a style-only picture (seed {seed}) for DINO")
    beta = dino.auto_beta(pipe, klora, embedder, args.prompt, seed,
                          call=lambda arguments: _call(pipe, arguments, passed_through, True), **call)
    print(f"--beta auto: 1 - cos(DINO of the two pictures) = {beta:.4f}")
    return beta


def klora_summary(klora) -> str:
    gamma = klora.gamma
    gamma = ", ".join(f"{c} {g:.4g}" for c, g in gamma.items()) if isinstance(gamma, dict) else f"{gamma:.4g}"
    copies = ", ".join(f"{_megabytes(size)} on {device}" for device, size in klora.memory().items()) or "none"
    model = type(klora.pipeline).__name__ if klora.pipeline is not None else type(klora.denoiser).__name__
    strengths = "" if klora.strengths == {"content": 1.0, "style": 1.0} else \
        f", content scale {klora.strengths['content']:g}, style scale {klora.strengths['style']:g}"
    extras = f", {len(klora.extra_scales)} extra LoRA(s) always on" if klora.extra_scales else ""
    full = sum(1 for layer in klora.layers if layer.full)
    full = f", full-weight deltas on {full} layers" if full else ""
    return (f"K-LoRA on {klora.family.name} ({model}), {klora.switching} switching (weight copies: {copies}): "
            f"{len(klora.paths)} layers chosen per step, {len(klora.only)} with one LoRA only{full}, gamma {gamma}, "
            f"pattern {klora.pattern} (alpha {klora.alpha:g}, beta {klora.beta:g}), method {_method_text(klora)}, "
            f"progress {klora.progress_mode}{strengths}{extras}")


def _method_text(klora) -> str:
    if klora.method == "np":
        return f"np (mu {klora.np_mu:g})"
    if klora.method == "switch":
        return f"switch (every {klora.switch_every} steps)"
    return klora.method


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 2**10:.0f} kB"


def generate(pipe, klora, args, outputs: Outputs, **call_kwargs) -> list[Path]:
    """One image (or clip) per seed; K-LoRA maps and the JSON log when asked. Returns written paths."""
    import torch

    from . import selection_map

    written = []
    passed_through = list(getattr(args, "call_arguments", None) or {})
    for seed, path in outputs.media:
        kwargs = dict(prompt=args.prompt, generator=torch.Generator("cpu").manual_seed(seed))
        kwargs.update(call_kwargs)
        first = not written
        if outputs.kind == "video":
            from . import video

            with video.decoding_progress(pipe, kwargs.get("num_frames", _default(pipe, "num_frames"))):
                result = _call(pipe, kwargs, passed_through, first)
            frames = video.to_uint8(result.frames[0])
            video.write_mp4(frames, path, outputs.fps)
            height, width = frames[0].shape[:2]
            print(f"wrote {path} ({len(frames)} frames, {width}x{height}, {outputs.fps:g} fps)")
            written.append(path)
            if seed in outputs.frames:
                video.write_frames(frames, outputs.frames[seed])
                written.append(outputs.frames[seed])
                print(f"wrote {outputs.frames[seed]}/ ({len(frames)} PNG frames)")
        else:
            image = _call(pipe, kwargs, passed_through, first).images[0]
            save_png(image, path)
            written.append(path)
            print(f"wrote {path} ({image.width}x{image.height})")
        if seed in outputs.maps and klora is not None:
            save_png(selection_map.render(klora.selection_log()), outputs.maps[seed])
            written.append(outputs.maps[seed])
            print(f"wrote {outputs.maps[seed]}")
    if outputs.log is not None and klora is not None:
        klora.save_selection_log(outputs.log)
        written.append(outputs.log)
        print(f"wrote {outputs.log}")
    return written


def _default(pipe, name):
    parameter = call_parameters(type(pipe)).get(name)
    return parameter.default if parameter is not None else None


def _call(pipe, kwargs, passed_through=(), first=False):
    """Run the pipeline. The input checks diffusers makes (``check_inputs``) become one-line
    errors; so does a TypeError/ValueError of the first call when --call_arg values were given
    (a value of the wrong kind), naming them."""
    try:
        return pipe(**kwargs)
    except (TypeError, ValueError) as exc:
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, ValueError) and any(frame.name == "check_inputs"
                                               for frame in traceback.extract_tb(exc.__traceback__)):
            raise KLoRAError(f"{type(pipe).__name__}: {message}") from None
        if first and passed_through:
            raise KLoRAError(f"{type(pipe).__name__} failed with the --call_arg values given "
                             f"({', '.join(passed_through)}): {type(exc).__name__}: {message}") from None
        raise


def run(main, argv=None) -> int:
    """Call ``main(argv)``; user errors become one line on stderr and exit code 2."""

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line_warning
    try:
        main(argv)
    except KLoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no partial files were written", file=sys.stderr)
        return 130
    return 0


def quiet_libraries() -> None:
    """Keep library chatter (torchvision notices, load reports) out of the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
