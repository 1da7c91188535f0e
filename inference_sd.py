"""K-LoRA on Stable Diffusion (XL, 1.x, 2.x): a subject LoRA in a style LoRA's style.

The Stable Diffusion front of inference.py (same code, SD defaults: 50 steps,
guidance 5, the model's own size: 1024 px for SDXL); other families: inference.py
and inference_video.py.

    python inference_sd.py \
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
      --lora_name_or_path_content lora-sdxl-dog --lora_name_or_path_style lora-sdxl-waterpainting \
      --prompt "a sbu dog in szn style" --output_folder out

    python inference_sd.py --demo --overwrite     # the world trained in this repository, no download
"""

from __future__ import annotations

import sys

from klora import cli


def build_parser():
    parser = cli.ArgumentParser(description="Fuse a content LoRA and a style LoRA on Stable Diffusion with K-LoRA.")
    parser.add_argument("--pretrained_model_name_or_path",
                        help="base model: hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0) or local folder")
    cli.add_lora_arguments(parser)
    cli.add_klora_arguments(parser)
    cli.add_generation_arguments(parser, default_steps=None, default_guidance=None)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.demo:
        if args.pretrained_model_name_or_path or args.lora_name_or_path_content or args.lora_name_or_path_style:
            raise cli.KLoRAError("--demo brings its own model and LoRAs; drop the model and LoRA arguments")
        cli.use_world_demo(args, "demo_output")
        print(f"demo: the world trained in this repository ({args.pretrained_model_name_or_path}), "
              "its sbu toy LoRA and its szn style LoRA (docs/world.md)")
    cli.check_arguments(args)
    cli.fuse_and_generate(args, expect="unet")
    if args.demo and args.method == "klora":
        print("demo done: K-LoRA's 32 x 32 picture of 'a sbu toy in szn style' on the world; at its default "
              "schedule it keeps the sbu toy (a yellow star with a red centre) and mostly loses szn's stripes "
              "on this model, measured in docs/world.md.")
    elif args.demo:
        print(f"demo done: method {args.method}'s 32 x 32 picture of 'a sbu toy in szn style' on the world; "
              "docs/world.md measures every method on 32 seeds.")


if __name__ == "__main__":
    cli.quiet_libraries()
    sys.exit(cli.run(main))
