"""K-LoRA on Stable Diffusion (XL, 1.x, 2.x): a subject LoRA in a style LoRA's style.

The Stable Diffusion front of inference.py (same code, SD defaults: 50 steps,
guidance 5, 1024 px); other families: inference.py and inference_video.py.

    python inference_sd.py \
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
      --lora_name_or_path_content lora-sdxl-dog --lora_name_or_path_style lora-sdxl-waterpainting \
      --prompt "a sbu dog in szn style" --output_folder out

    python inference_sd.py --demo --overwrite     # tiny built-in model, no download
"""

from __future__ import annotations

import sys
import tempfile

from klora import cli

DEMO_PROMPT = "a sbu dog in szn style"


def build_parser():
    parser = cli.ArgumentParser(description="Fuse a content LoRA and a style LoRA on Stable Diffusion with K-LoRA.")
    parser.add_argument("--pretrained_model_name_or_path",
                        help="base model: hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0) or local folder")
    cli.add_lora_arguments(parser)
    cli.add_klora_arguments(parser)
    cli.add_generation_arguments(parser, default_steps=50, default_guidance=5.0, default_size=1024)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="klora-demo-") as scratch:
        if args.demo:
            given = sys.argv[1:] if argv is None else argv
            _prepare_demo(args, scratch, steps_given=any(a.startswith("--num_inference_steps") for a in given))
        cli.check_arguments(args)
        cli.fuse_and_generate(args, expect="unet")
        if args.demo:
            print("demo done: the tiny model's images are noise; the demo checks the installation, "
                  "not image quality.")


def _prepare_demo(args, scratch: str, steps_given: bool) -> None:
    """Tiny SDXL + two synthetic LoRAs in ``scratch``; user flags still apply."""
    if args.pretrained_model_name_or_path or args.lora_name_or_path_content or args.lora_name_or_path_style:
        raise cli.KLoRAError("--demo brings its own model and LoRAs; drop the model and LoRA arguments")
    print("demo: building a tiny SDXL pipeline and two synthetic LoRAs (random weights, no download)")
    cli.use_demo(args, "unet", scratch, DEMO_PROMPT, "demo_output")
    if not steps_given:
        args.num_inference_steps = 20


if __name__ == "__main__":
    cli.quiet_libraries()
    sys.exit(cli.run(main))
