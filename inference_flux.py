"""K-LoRA on FLUX.1: a subject LoRA in a style LoRA's style, with community LoRAs.

    python inference_flux.py --list                       # the catalogue of hub LoRAs
    python inference_flux.py --content_index 0 --style_index 3 --output_folder out

    python inference_flux.py \
      --lora_name_or_path_content my-subject-lora.safetensors \
      --lora_name_or_path_style glif-loradex-trainer/maxxd4240_BlueDraw --style_weight_name BlueDraw.safetensors \
      --prompt "a sks dog in BluD!! style." --output_folder out

    python inference_flux.py --demo --overwrite           # tiny built-in FLUX, no download

The FLUX.1 front of inference.py (same code, plus the catalogue). Any FLUX LoRA
that diffusers' FLUX loader reads works (diffusers/PEFT, ai-toolkit,
kohya, XLabs); content and style may differ in format, rank and layers.
FLUX.1-dev needs about 24 GB of GPU memory in bf16: ``--cpu_offload`` keeps
each model on the CPU until it runs, ``--sequential_cpu_offload`` streams
layer by layer (slowest, least memory).
"""

from __future__ import annotations

import os
import sys
import tempfile

from klora import cli, flux_catalogue

DEMO_PROMPT = "eric cat in BluD!! style."


def build_parser():
    parser = cli.ArgumentParser(description="Fuse a content LoRA and a style LoRA on FLUX.1 with K-LoRA.")
    parser.add_argument("--pretrained_model_name_or_path", default=None,
                        help=f"base model: hub id or local folder (default {flux_catalogue.BASE_MODEL})")
    catalogue = parser.add_argument_group("catalogue of community LoRAs (see --list)")
    catalogue.add_argument("--list", action="store_true", help="print the catalogue and exit")
    catalogue.add_argument("--content_index", type=int, default=None,
                           help="subject LoRA from the catalogue (instead of --lora_name_or_path_content)")
    catalogue.add_argument("--style_index", type=int, default=None,
                           help="style LoRA from the catalogue (instead of --lora_name_or_path_style)")
    cli.add_lora_arguments(parser)
    cli.add_klora_arguments(parser)
    cli.add_generation_arguments(parser, default_steps=28, default_guidance=3.5, default_size=1024)
    flux = parser.add_argument_group("FLUX")
    flux.add_argument("--true_cfg_scale", type=float, default=1.0,
                      help="true classifier-free guidance with --negative_prompt when > 1 (two transformer "
                           "calls per step; default 1: off)")
    flux.add_argument("--max_sequence_length", type=int, default=512,
                      help="T5 prompt length in tokens (default 512)")
    cli.add_offload_arguments(parser, flux)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.list:
        print(flux_catalogue.table())
        return
    with tempfile.TemporaryDirectory(prefix="klora-demo-") as scratch:
        if args.demo:
            _prepare_demo(args, scratch)
        else:
            _apply_catalogue(args)
        cli.check_arguments(args)
        _check_flux_arguments(args)
        cli.fuse_and_generate(args, expect="transformer")
        if args.demo:
            print("demo done: the tiny model's images are noise; the demo checks the installation, "
                  "not image quality.")


def _apply_catalogue(args) -> None:
    """Fill model, LoRAs, weight names and prompt from the catalogue where asked."""
    if args.pretrained_model_name_or_path is None:
        args.pretrained_model_name_or_path = flux_catalogue.BASE_MODEL
    chosen = {}
    for role, index, entries, kind in (("content", args.content_index, flux_catalogue.SUBJECTS, "subjects"),
                                       ("style", args.style_index, flux_catalogue.STYLES, "styles")):
        path_flag, weight_flag = f"lora_name_or_path_{role}", f"{role}_weight_name"
        if index is None:
            if not getattr(args, path_flag):
                raise cli.KLoRAError(f"--{path_flag} is required, or --{role}_index N from the catalogue "
                                     "(see --list), or --demo for the tiny built-in model")
            continue
        if getattr(args, path_flag) or getattr(args, weight_flag):
            raise cli.KLoRAError(f"--{role}_index and --{path_flag}/--{weight_flag}: give one or the other")
        if not 0 <= index < len(entries):
            raise cli.KLoRAError(f"--{role}_index {index}: the catalogue has {len(entries)} {kind} "
                                 f"(0 to {len(entries) - 1}); see --list")
        entry = entries[index]
        setattr(args, path_flag, entry.repo_id)
        setattr(args, weight_flag, entry.weight_name)
        chosen[role] = entry
    if not args.prompt and len(chosen) == 2:
        args.prompt = flux_catalogue.prompt_for(chosen["content"], chosen["style"])


def _check_flux_arguments(args) -> None:
    for name in ("height", "width"):
        value = getattr(args, name) or args.soft_defaults.get(name)
        if value % 16:
            raise cli.KLoRAError(f"--{name} {value}: FLUX needs a multiple of 16")
    if not (args.true_cfg_scale >= 1.0 and args.true_cfg_scale < float("inf")):
        raise cli.KLoRAError(f"--true_cfg_scale {args.true_cfg_scale}: must be 1 (off) or more")
    if args.true_cfg_scale > 1 and not args.negative_prompt:
        raise cli.KLoRAError("--true_cfg_scale > 1 needs --negative_prompt (true CFG pushes away from it)")
    if args.negative_prompt and args.true_cfg_scale <= 1:
        raise cli.KLoRAError("--negative_prompt has no effect on FLUX unless --true_cfg_scale > 1 (e.g. 4)")
    if args.max_sequence_length < 1 or args.max_sequence_length > 512:
        raise cli.KLoRAError(f"--max_sequence_length {args.max_sequence_length}: must be 1 to 512")


def _prepare_demo(args, scratch: str) -> None:
    """Tiny FLUX + two synthetic LoRAs in ``scratch``; user flags still apply."""
    given = [flag for flag in ("pretrained_model_name_or_path", "lora_name_or_path_content",
                               "lora_name_or_path_style", "content_index", "style_index")
             if getattr(args, flag) is not None]
    if given:
        raise cli.KLoRAError(f"--demo brings its own model and LoRAs; drop --{given[0]}")
    print("demo: building a tiny FLUX pipeline and two synthetic LoRAs (random weights, no download)")
    cli.use_demo(args, "transformer", scratch, DEMO_PROMPT, os.path.join("demo_output", "flux"))


if __name__ == "__main__":
    cli.quiet_libraries()
    sys.exit(cli.run(main))
