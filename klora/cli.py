"""What the command lines share: arguments, checks, output files, error handling.

The scripts stay thin: they build a parser from these pieces, then call
``load_pipeline``, ``KLoRA`` and ``generate`` in that order.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import rule
from .errors import KLoRAError  # noqa: F401  (re-exported for the scripts)
from .fusion import METHODS

MAX_SIDE = 8192


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_lora_arguments(parser) -> None:
    group = parser.add_argument_group("LoRAs")
    group.add_argument("--lora_name_or_path_content", help="content (subject) LoRA: .safetensors file, folder or hub id")
    group.add_argument("--lora_name_or_path_style", help="style LoRA: .safetensors file, folder or hub id")
    group.add_argument("--content_weight_name", help="file inside the content folder or hub repo "
                       "(default pytorch_lora_weights.safetensors, or the folder's only .safetensors)")
    group.add_argument("--style_weight_name", help="file inside the style folder or hub repo")
    group.add_argument("--text_encoder_lora", action="store_true",
                       help="also apply text-encoder weights found in the LoRA files (both, always on)")


def add_klora_arguments(parser) -> None:
    group = parser.add_argument_group("K-LoRA")
    group.add_argument("--method", default="klora", choices=METHODS,
                       help="klora: the K-LoRA rule; merge: both LoRAs everywhere (direct merge); "
                            "content / style: one LoRA only (default: klora)")
    group.add_argument("--pattern", default="s*", help="scale pattern: 's' (alpha*p+beta) or "
                       "'s*' ((alpha*p+beta) mod alpha) (default: s*)")
    group.add_argument("--alpha", type=float, default=rule.DEFAULT_ALPHA, help="alpha of the scale (default 1.5)")
    group.add_argument("--beta", type=float, default=None,
                       help="beta of the scale (default: 0.5 for 's', 0.85*alpha = 1.275 for 's*')")
    group.add_argument("--selection_log", help="write the per-layer, per-step choices as JSON to this file")


def add_generation_arguments(parser, default_steps: int, default_guidance: float, default_size: int) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--prompt", help="text prompt (include both LoRAs' trigger words)")
    group.add_argument("--negative_prompt", default=None, help="negative prompt")
    group.add_argument("--num_inference_steps", type=int, default=default_steps,
                       help=f"denoising steps (default {default_steps})")
    group.add_argument("--guidance_scale", type=float, default=default_guidance,
                       help=f"classifier-free guidance scale (default {default_guidance})")
    group.add_argument("--seeds", type=int, nargs="+", default=None, help="one image per seed (default: 0)")
    group.add_argument("--num_images", type=int, default=None, help="seeds 0..N-1 (instead of --seeds)")
    group.add_argument("--height", type=int, default=None, help=f"image height, multiple of 8 (default {default_size})")
    group.add_argument("--width", type=int, default=None, help=f"image width, multiple of 8 (default {default_size})")
    group.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N, mps")
    group.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")
    group.add_argument("--output_folder", default="output", help="where images go (default: output)")
    group.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    group.add_argument("--demo", action="store_true",
                       help="no download: a tiny built-in model and two synthetic LoRAs (images are noise)")
    parser.set_defaults(default_size=default_size)


def check_arguments(args) -> None:
    """Reject bad values before anything is loaded."""
    if args.pattern not in rule.PATTERNS:
        raise KLoRAError(f"--pattern {args.pattern!r}: choose 's' or 's*'")
    if not (args.alpha > 0 and args.alpha < float("inf")):
        raise KLoRAError(f"--alpha {args.alpha}: must be a positive number")
    if args.beta is not None and not (abs(args.beta) < float("inf")):
        raise KLoRAError(f"--beta {args.beta}: must be a finite number")
    if args.num_inference_steps < 1:
        raise KLoRAError(f"--num_inference_steps {args.num_inference_steps}: must be at least 1")
    if not (args.guidance_scale >= 0):
        raise KLoRAError(f"--guidance_scale {args.guidance_scale}: must be 0 or more")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is None:
            setattr(args, name, args.default_size)
            continue
        if value < 8 or value % 8 or value > MAX_SIDE:
            raise KLoRAError(f"--{name} {value}: must be a positive multiple of 8 (at most {MAX_SIDE})")
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
    if not args.demo:
        for flag in ("pretrained_model_name_or_path", "lora_name_or_path_content", "lora_name_or_path_style"):
            if not getattr(args, flag, None):
                raise KLoRAError(f"--{flag} is required (or run --demo to try the tiny built-in model)")
        if not args.prompt:
            raise KLoRAError("--prompt is required (include both LoRAs' trigger words)")


def use_demo(args, family: str, scratch: str, prompt: str, output_folder: str) -> None:
    """Point ``args`` at a tiny built-in model and two demo LoRAs written to ``scratch``.

    Flags the user gave (prompt, output folder, selection log, device) still apply;
    the demo only fills in what was left at its default.
    """
    from .tiny import build_demo

    model, content, style = build_demo(scratch, family)
    args.pretrained_model_name_or_path = model
    args.lora_name_or_path_content, args.lora_name_or_path_style = content, style
    args.prompt = args.prompt or prompt
    args.default_size = 64
    if args.output_folder == "output":
        args.output_folder = output_folder
    if args.selection_log is None:
        args.selection_log = os.path.join(args.output_folder, "selection_log.json")
    args.device = "cpu" if args.device == "auto" else args.device


def method_tag(method: str, pattern: str) -> str:
    return f"klora-{'sstar' if pattern == 's*' else 's'}" if method == "klora" else method


@dataclass
class Outputs:
    folder: Path
    images: list[tuple[int, Path]]  # (seed, image path)
    maps: dict[int, Path] = field(default_factory=dict)  # seed -> selection map path
    log: Path | None = None

    def all(self) -> list[Path]:
        return [p for _, p in self.images] + list(self.maps.values()) + ([self.log] if self.log else [])


def plan_outputs(args) -> Outputs:
    """Decide every output path up front; refuse existing ones unless --overwrite."""
    folder = Path(args.output_folder).expanduser()
    tag = method_tag(args.method, args.pattern)
    images = [(seed, folder / f"{tag}_seed{seed}.png") for seed in args.seeds]
    maps = {seed: folder / f"{tag}_seed{seed}_selection.png" for seed in args.seeds} if args.method == "klora" else {}
    log = Path(args.selection_log).expanduser() if args.selection_log else None
    outputs = Outputs(folder=folder, images=images, maps=maps, log=log)
    _check_writable(folder, "--output_folder")
    if log is not None:
        _check_writable(log.parent if str(log.parent) else Path("."), "--selection_log")
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
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def generate(pipe, klora, args, outputs: Outputs, **call_kwargs) -> list[Path]:
    """One image per seed; K-LoRA maps and the JSON log when asked. Returns written paths."""
    import torch

    from . import selection_map

    written = []
    for seed, image_path in outputs.images:
        generator = torch.Generator("cpu").manual_seed(seed)
        kwargs = dict(prompt=args.prompt, num_inference_steps=args.num_inference_steps,
                      guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                      generator=generator)
        if args.negative_prompt is not None:
            kwargs["negative_prompt"] = args.negative_prompt
        kwargs.update(call_kwargs)
        image = pipe(**kwargs).images[0]
        save_png(image, image_path)
        written.append(image_path)
        print(f"wrote {image_path}")
        if seed in outputs.maps and klora is not None:
            save_png(selection_map.render(klora.selection_log()), outputs.maps[seed])
            written.append(outputs.maps[seed])
            print(f"wrote {outputs.maps[seed]}")
    if outputs.log is not None and klora is not None:
        klora.save_selection_log(outputs.log)
        written.append(outputs.log)
        print(f"wrote {outputs.log}")
    return written


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
