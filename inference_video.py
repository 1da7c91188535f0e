"""K-LoRA on diffusers video models: a subject LoRA in a style LoRA's style, as a clip.

    python inference_video.py --pretrained_model_name_or_path Wan-AI/Wan2.2-T2V-A14B-Diffusers \
      --lora_name_or_path_content my-character.safetensors --lora_name_or_path_style ghibli.safetensors \
      --prompt "..." --num_frames 81 --output_folder out --cpu_offload

    python inference_video.py --demo --overwrite     # tiny Wan 2.2 (two experts), no download

Families: Wan 2.1/2.2, HunyuanVideo, LTX-Video, CogVideoX, AnimateDiff, and the
other video pipelines diffusers loads LoRAs into. Per seed it writes
<method>_seed<N>.mp4 (H.264) and the selection map; --save_frames adds the PNG
frames. Wan 2.2 A14B has two experts: by default both LoRAs go into both; a
HIGH/LOW pair goes in as --lora_name_or_path_content HIGH
--lora_name_or_path_content_2 LOW (the same for style).
"""

from __future__ import annotations

import os
import sys
import tempfile

from klora import cli

DEMO_FAMILY = "wan22"
DEMO_STEPS = 8  # the tiny Wan 2.2's shift 5 splits 8 steps 4 / 4 between its experts


def build_parser():
    parser = cli.ArgumentParser(description="Fuse a content LoRA and a style LoRA with K-LoRA on a diffusers video "
                                            "model (Wan, HunyuanVideo, LTX-Video, CogVideoX, AnimateDiff, ...).")
    parser.add_argument("--pretrained_model_name_or_path",
                        help="base model: hub id (e.g. Wan-AI/Wan2.2-T2V-A14B-Diffusers) or local diffusers folder")
    cli.add_lora_arguments(parser, second_expert=True)
    cli.add_klora_arguments(parser)
    cli.add_generation_arguments(parser)
    cli.add_video_arguments(parser)
    cli.add_pipeline_arguments(parser, img2img=False)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="klora-demo-") as scratch:
        if args.demo:
            cli.refuse_model_flags_with_demo(args)
            print("demo: building a tiny Wan 2.2 pipeline (two experts) and two synthetic LoRAs "
                  "(random weights, no download)")
            cli.use_tiny_demo(args, DEMO_FAMILY, scratch, os.path.join("demo_output", "video"), DEMO_STEPS,
                              video=True)
        cli.check_arguments(args)
        cli.fuse_and_generate(args, expect="video")
        if args.demo:
            print("demo done: the tiny model's clip is noise; the demo checks the installation, "
                  "not video quality.")


if __name__ == "__main__":
    cli.quiet_libraries()
    sys.exit(cli.run(main))
