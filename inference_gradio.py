"""K-LoRA in the browser: a page to try a content LoRA in a style LoRA's style.

    python inference_gradio.py \
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
      --lora_name_or_path_content lora-sdxl-dog --lora_name_or_path_style lora-sdxl-waterpainting

    python inference_gradio.py --demo        # tiny built-in model, no download

Serves on http://127.0.0.1:7860 (loopback only) unless --server_name / --share say
otherwise. The page is built by ``klora.app``; this file only parses arguments.
"""

from __future__ import annotations

import sys
import tempfile

from klora import cli

DEMO_PROMPT = "a sbu dog in szn style"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser():
    parser = cli.ArgumentParser(description="Serve a web page that fuses a content and a style LoRA with K-LoRA.")
    parser.add_argument("--pretrained_model_name_or_path",
                        help="base model: hub id or local folder, Stable Diffusion (XL) or FLUX.1")
    parser.add_argument("--family", default="auto", choices=("auto", "unet", "transformer"),
                        help="denoiser of the base model: unet (SD/SDXL), transformer (FLUX); "
                             "auto reads model_index.json (default)")
    cli.add_lora_arguments(parser)
    group = parser.add_argument_group("serving")
    group.add_argument("--server_name", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    group.add_argument("--server_port", type=int, default=None, help="port (default 7860, or the next free one)")
    group.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    group.add_argument("--max_steps", type=int, default=100, help="most denoising steps one request may ask (100)")
    group.add_argument("--max_side", type=int, default=2048, help="largest image width or height (2048)")
    group.add_argument("--uploads_only", action="store_true",
                       help="the page switches LoRAs by upload only, never by a typed path or hub id "
                            "(use when others can reach the page)")
    group.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N, mps")
    group.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")
    group.add_argument("--demo", action="store_true",
                       help="no download: a tiny built-in SDXL and two synthetic LoRAs (images are noise)")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.server_port is not None and not 1 <= args.server_port <= 65535:
        raise cli.KLoRAError(f"--server_port {args.server_port}: must be from 1 to 65535")
    if args.max_steps < 1:
        raise cli.KLoRAError(f"--max_steps {args.max_steps}: must be at least 1")
    if args.max_side < 64 or args.max_side % 16:
        raise cli.KLoRAError(f"--max_side {args.max_side}: must be a multiple of 16, at least 64")
    if args.demo and (args.pretrained_model_name_or_path or args.lora_name_or_path_content
                      or args.lora_name_or_path_style):
        raise cli.KLoRAError("--demo brings its own model and LoRAs; drop the model and LoRA arguments")

    from klora.app import Defaults, Limits, Studio, build_app, model_family, serve
    from klora.pipelines import load_pipeline

    with tempfile.TemporaryDirectory(prefix="klora-gradio-") as scratch:
        overrides = _prepare_demo(args, scratch) if args.demo else {}
        for flag in ("pretrained_model_name_or_path", "lora_name_or_path_content", "lora_name_or_path_style"):
            if not getattr(args, flag):
                raise cli.KLoRAError(f"--{flag} is required (or run --demo to try the tiny built-in model)")
        family = model_family(args.pretrained_model_name_or_path) if args.family == "auto" else args.family
        pipe = load_pipeline(args.pretrained_model_name_or_path, family, args.device, args.dtype)
        limits = Limits(max_steps=args.max_steps, max_side=args.max_side)
        studio = Studio(pipe, args.lora_name_or_path_content, args.lora_name_or_path_style,
                        content_weight_name=args.content_weight_name, style_weight_name=args.style_weight_name,
                        text_encoder_lora=args.text_encoder_lora, limits=limits,
                        defaults=Defaults.for_family(family, **overrides),
                        model_label="tiny demo SDXL" if args.demo else args.pretrained_model_name_or_path)
        for message in studio.warnings:
            print(f"warning: {message}", file=sys.stderr)
        print(f"K-LoRA: {len(studio.klora.paths)} layers chosen per step, {len(studio.klora.only)} with one "
              f"LoRA only, gamma {studio.klora.gamma:.4g}")
        if args.share or args.server_name not in LOOPBACK:
            print("warning: the page is reachable from other machines; anyone who reaches it can run "
                  "generations" + ("" if args.uploads_only else " and load LoRA files by path from this "
                                   "machine (--uploads_only turns that off)"), file=sys.stderr)
        demo = build_app(studio, typed_lora_paths=not args.uploads_only)
        try:
            serve(demo, limits, server_name=args.server_name, server_port=args.server_port, share=args.share)
        except OSError as exc:
            raise cli.KLoRAError(f"cannot serve on {args.server_name}:{args.server_port or 7860}: {exc}") from None


def _prepare_demo(args, scratch: str) -> dict:
    """Tiny SDXL and two synthetic LoRAs in ``scratch``; returns the page's demo defaults."""
    from klora.tiny import build_demo

    print("demo: building a tiny SDXL pipeline and two synthetic LoRAs (random weights, no download)")
    model, content, style = build_demo(scratch, "unet")
    args.pretrained_model_name_or_path = model
    args.lora_name_or_path_content, args.lora_name_or_path_style = content, style
    args.family = "unet"
    args.device = "cpu" if args.device == "auto" else args.device
    return {"prompt": DEMO_PROMPT, "steps": 20, "size": 64}


if __name__ == "__main__":
    cli.quiet_libraries()
    sys.exit(cli.run(main))
