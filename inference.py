"""K-LoRA on any diffusers image model that loads LoRAs: a subject LoRA in a style LoRA's style.

    python inference.py --pretrained_model_name_or_path Qwen/Qwen-Image \
      --lora_name_or_path_content my-dog.safetensors --lora_name_or_path_style watercolor.safetensors \
      --prompt "a sbu dog, szn watercolor" --output_folder out

    python inference.py --demo --overwrite                           # tiny SDXL, no download
    python inference.py --demo --demo_family qwen-image --overwrite  # any tiny family

The family (SDXL, SD 1.x/2.x, SD3/3.5, FLUX.1, FLUX.2, Qwen-Image, Z-Image, Chroma,
Sana, Lumina 2, HiDream, ...) comes from the model's model_index.json. Steps,
guidance and size default to the pipeline's own; family-specific arguments pass
through (--true_cfg_scale, --max_sequence_length, --call_arg KEY=VALUE), each
checked against the pipeline's __call__. --image switches to the family's
image-to-image pipeline (--mask_image: inpainting); --control_image feeds a
ControlNet. Video models: inference_video.py.
"""

from __future__ import annotations

import os
import sys
import tempfile

from klora import cli
from klora.tiny import TINY_BUILDERS

DEMO_STEPS = 20


def build_parser():
    parser = cli.ArgumentParser(description="Fuse a content LoRA and a style LoRA with K-LoRA on any diffusers image "
                                            "model that loads LoRAs.")
    parser.add_argument("--pretrained_model_name_or_path",
                        help="base model: hub id (e.g. Qwen/Qwen-Image) or local diffusers folder")
    cli.add_lora_arguments(parser)
    cli.add_klora_arguments(parser)
    cli.add_generation_arguments(parser)
    cli.add_pipeline_arguments(parser)
    parser.add_argument("--demo_family", choices=sorted(TINY_BUILDERS), default=None,
                        help="with --demo: which tiny model (default sdxl)")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="klora-demo-") as scratch:
        if args.demo:
            cli.refuse_model_flags_with_demo(args)
            family = args.demo_family or "sdxl"
            print(f"demo: building a tiny {family} pipeline and two synthetic LoRAs (random weights, no download)")
            cli.use_tiny_demo(args, family, scratch, os.path.join("demo_output", family), DEMO_STEPS)
        elif args.demo_family:
            raise cli.KLoRAError("--demo_family picks the tiny model of --demo; add --demo")
        cli.check_arguments(args)
        cli.fuse_and_generate(args, expect="image")
        if args.demo:
            print("demo done: the tiny model's images are noise; the demo checks the installation, "
                  "not image quality.")


if __name__ == "__main__":
    cli.quiet_libraries()
    sys.exit(cli.run(main))
