"""K-LoRA in the browser: a page to try a content LoRA in a style LoRA's style.

    python inference_gradio.py \
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
      --lora_name_or_path_content lora-sdxl-dog --lora_name_or_path_style lora-sdxl-waterpainting

    python inference_gradio.py --demo                       # the world trained in this repository, no download
    python inference_gradio.py --demo --demo_family wan22   # tiny Wan 2.2 (two experts): the page shows clips
    python inference_gradio.py --demo --dino_model facebook/dino-vits16   # also EST-LoRA's beta from DINO

Any diffusers pipeline that loads LoRAs works, image or video: the family comes
from the model's model_index.json, and the page shows the fields that pipeline
takes. Serves on http://127.0.0.1:7860 (loopback only) unless --server_name /
--share say otherwise. The page is built by ``klora.app``; this file only parses
arguments.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from klora import cli

DEMO_PROMPT = "a sbu dog in szn style"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# --demo_family: the trained world (world/, docs/world.md), or a tiny model of klora.tiny / klora.tiny_video
# (random weights; their images and clips are noise).
DEMO_IMAGE = ("world", "sdxl", "sd", "flux", "sd3", "qwen-image", "z-image", "flux2-klein", "chroma", "sana", "lumina2")
DEMO_VIDEO = ("wan21", "wan22", "hunyuanvideo", "ltx-video", "cogvideox", "animatediff")
DEMO_STEPS = {"wan22": 8}  # 8 steps give each tiny Wan 2.2 expert 4; the others take 20


def build_parser():
    parser = cli.ArgumentParser(description="Serve a web page that fuses a content and a style LoRA with K-LoRA.")
    parser.add_argument("--pretrained_model_name_or_path",
                        help="base model: hub id or local folder of any diffusers pipeline that loads LoRAs "
                             "(SDXL, FLUX, SD3, Qwen-Image, Wan, HunyuanVideo, ...)")
    # Kept so that old command lines get a clear message instead of "unrecognized arguments".
    parser.add_argument("--family", help=argparse.SUPPRESS)
    cli.add_lora_arguments(parser, second_expert=True)
    group = parser.add_argument_group("K-LoRA")
    cli.add_engine_arguments(group)
    group.add_argument("--dino_model", default=None, metavar="NAME_OR_FOLDER",
                       help="a DINO ViT, hub id or folder (EST-LoRA's is facebook/dino-vits16): the page then offers "
                            "EST-LoRA's beta from DINO, for image models (default: none, the option is off)")
    group = parser.add_argument_group("video (video models only)")
    group.add_argument("--num_frames", type=int, default=None, help="initial number of frames (default: the model's)")
    group.add_argument("--fps", type=int, default=None, help="initial frame rate of the MP4 (default: the model's)")
    group = parser.add_argument_group("serving")
    group.add_argument("--server_name", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    group.add_argument("--server_port", type=int, default=None, help="port (default 7860, or the next free one)")
    group.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    group.add_argument("--max_steps", type=int, default=100, help="most denoising steps one request may ask (100)")
    group.add_argument("--max_side", type=int, default=2048, help="largest image width or height (2048)")
    group.add_argument("--max_frames", type=int, default=257, help="most frames one video request may ask (257)")
    group.add_argument("--uploads_only", action="store_true",
                       help="the page switches LoRAs by upload only, never by a typed path or hub id "
                            "(use when others can reach the page)")
    group.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N, mps")
    group.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")
    group.add_argument("--demo", action="store_true",
                       help="no download: the world trained in this repository and its two LoRAs")
    group.add_argument("--demo_family", choices=DEMO_IMAGE + DEMO_VIDEO, default=None,
                       help="with --demo: the world (default), or a tiny model with random weights and synthetic "
                            "LoRAs, whose outputs are noise (wan22 shows the video page)")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.family not in (None, "auto"):
        raise cli.KLoRAError(f"--family {args.family}: no longer needed; the page finds the model family from the "
                             "model's model_index.json (drop --family)")
    if args.server_port is not None and not 1 <= args.server_port <= 65535:
        raise cli.KLoRAError(f"--server_port {args.server_port}: must be from 1 to 65535")
    if args.max_steps < 1:
        raise cli.KLoRAError(f"--max_steps {args.max_steps}: must be at least 1")
    if args.max_side < 64 or args.max_side % 16:
        raise cli.KLoRAError(f"--max_side {args.max_side}: must be a multiple of 16, at least 64")
    if args.max_frames < 1:
        raise cli.KLoRAError(f"--max_frames {args.max_frames}: must be at least 1")
    if args.demo and (args.pretrained_model_name_or_path or args.lora_name_or_path_content
                      or args.lora_name_or_path_style or args.lora_name_or_path_content_2
                      or args.lora_name_or_path_style_2 or args.extra_lora or args.extra_lora_2):
        raise cli.KLoRAError("--demo brings its own model and LoRAs; drop the model and LoRA arguments")
    cli.check_stack_arguments(args)
    if args.demo_family and not args.demo:
        raise cli.KLoRAError("--demo_family picks the tiny model of --demo; add --demo")
    if not args.demo:
        for flag in ("pretrained_model_name_or_path", "lora_name_or_path_content", "lora_name_or_path_style"):
            if not getattr(args, flag):
                raise cli.KLoRAError(f"--{flag} is required (or run --demo to try the tiny built-in model)")

    from klora.app import Defaults, Limits, Studio, build_app, gamma_text, interrupt_on_sigterm, serve
    from klora.pipelines import family_of, load_pipeline

    # Stopped by SIGTERM, even while it loads, its temporary folders go as with Ctrl+C.
    with interrupt_on_sigterm(), tempfile.TemporaryDirectory(prefix="klora-gradio-") as scratch:
        embedder = None
        if args.dino_model:
            from klora.dino import Embedder

            embedder = Embedder(args.dino_model)  # before the base model: a bad name fails in seconds
        if args.demo:
            pipe, initial, call_kwargs = _prepare_demo(args, scratch)
        else:
            pipe = load_pipeline(args.pretrained_model_name_or_path, None, args.device, args.dtype)
            initial, call_kwargs = {}, {}
        if embedder is not None and family_of(pipe).output == "video":
            raise cli.KLoRAError(f"--dino_model: beta from DINO compares two pictures (EST-LoRA, for image models); "
                                 f"{family_of(pipe).name} makes videos (drop --dino_model)")
        limits = Limits(max_steps=args.max_steps, max_side=args.max_side, max_frames=args.max_frames)
        initial.update(_video_flags(args, pipe, limits))
        defaults = Defaults.for_pipeline(pipe, limits, **initial)
        studio = Studio(pipe, args.lora_name_or_path_content, args.lora_name_or_path_style,
                        content_2=args.lora_name_or_path_content_2, style_2=args.lora_name_or_path_style_2,
                        content_weight_name=args.content_weight_name, style_weight_name=args.style_weight_name,
                        content_2_weight_name=args.content_2_weight_name, style_2_weight_name=args.style_2_weight_name,
                        extra_loras=args.extra_loras[""], extra_loras_2=args.extra_loras["_2"] or None,
                        content_scale=args.content_scale, style_scale=args.style_scale,
                        text_encoder_lora=args.text_encoder_lora, switching=args.switching, progress=args.progress,
                        call_kwargs=call_kwargs, limits=limits, defaults=defaults, embedder=embedder,
                        model_label=("the world (world/sdxl)" if args.demo_family == "world"
                                     else f"tiny demo {args.demo_family}") if args.demo
                        else args.pretrained_model_name_or_path)
        for message in studio.warnings:
            print(f"warning: {message}", file=sys.stderr)
        print(f"K-LoRA on {studio.family.name} ({type(pipe).__name__}): {len(studio.klora.paths)} layers chosen per "
              f"step, {len(studio.klora.only)} with one LoRA only, gamma {gamma_text(studio.klora.gamma)}, "
              f"{studio.klora.switching} switching" + (f"; EST-LoRA's beta from DINO offered ({embedder.name})"
                                                         if embedder is not None else ""))
        if args.share or args.server_name not in LOOPBACK:
            print("warning: the page is reachable from other machines; anyone who reaches it can run "
                  "generations" + ("" if args.uploads_only else " and load LoRA files by path from this "
                                   "machine (--uploads_only turns that off)"), file=sys.stderr)
        demo = build_app(studio, typed_lora_paths=not args.uploads_only)
        try:
            serve(demo, limits, server_name=args.server_name, server_port=args.server_port, share=args.share)
        except OSError as exc:
            raise cli.KLoRAError(f"cannot serve on {args.server_name}:{args.server_port or 7860}: {exc}") from None
        finally:
            studio.close()


def _video_flags(args, pipe, limits) -> dict:
    """--num_frames / --fps checked against the model's frame rule, before any LoRA is read."""
    from klora.app import MAX_FPS, frame_step, frames_rule, most_frames
    from klora.pipelines import family_of

    given = {name: value for name, value in (("num_frames", args.num_frames), ("fps", args.fps)) if value is not None}
    if not given:
        return given
    family = family_of(pipe)
    if family.output != "video":
        raise cli.KLoRAError(f"--{next(iter(given))}: {family.name} makes images, not videos")
    step, most = frame_step(pipe), most_frames(pipe, limits)
    frames = given.get("num_frames")
    if frames is not None and (not 1 <= frames <= most or (frames - 1) % step):
        raise cli.KLoRAError(f"--num_frames {frames}: {family.name} takes {frames_rule(step)} frames, "
                             f"at most {most}")
    if not 1 <= given.get("fps", 1) <= MAX_FPS:
        raise cli.KLoRAError(f"--fps {args.fps}: must be from 1 to {MAX_FPS}")
    return given


def _prepare_demo(args, scratch: str):
    """A tiny pipeline of ``args.demo_family`` and two synthetic LoRAs for it, written to ``scratch``.

    Returns (pipeline, the page's initial values, the tiny model's extra call arguments).
    """
    import os

    from klora.pipelines import family_of, load_pipeline

    args.demo_family = key = args.demo_family or "world"
    video = key in DEMO_VIDEO
    device = "cpu" if args.device == "auto" else args.device
    if key == "world":
        from klora import world, world_eval

        cli.check_world()
        args.pretrained_model_name_or_path = str(world_eval.MODEL)
        args.lora_name_or_path_content, args.lora_name_or_path_style = (str(world_eval.SUBJECT_LORA),
                                                                        str(world_eval.STYLE_LORA))
        print(f"demo: the world trained in this repository ({world_eval.MODEL}) and its sbu and szn LoRAs")
        pipe = load_pipeline(args.pretrained_model_name_or_path, None, device, args.dtype)
        return pipe, {"prompt": world.FUSED_PROMPT, "steps": world_eval.STEPS}, {}
    print(f"demo: building a tiny {key} pipeline and two synthetic LoRAs (random weights, no download)")
    if video:
        from klora.tiny_video import TINY_VIDEO_CALL_KWARGS, TINY_VIDEO_SIZES, build_tiny_video, write_demo_video_loras

        model = build_tiny_video(key, os.path.join(scratch, key))
        height, width, frames = TINY_VIDEO_SIZES[key]
        call_kwargs = TINY_VIDEO_CALL_KWARGS[key]
        initial = {"height": height, "width": width, "num_frames": frames}
    else:
        from klora.tiny import TINY_CALL_KWARGS, TINY_SIZES, build_tiny, write_demo_loras

        model = build_tiny(key, os.path.join(scratch, key))
        size = TINY_SIZES[key]
        call_kwargs = TINY_CALL_KWARGS[key]
        initial = {"height": size, "width": size}
    pipe = load_pipeline(model, None, device, args.dtype)
    family = family_of(pipe)
    denoiser = getattr(pipe, family.denoisers[0])
    if video:
        content, style = write_demo_video_loras(denoiser, scratch, prefix=family.prefix)
    else:
        content, style = write_demo_loras(denoiser, scratch)
    args.pretrained_model_name_or_path = model
    args.lora_name_or_path_content, args.lora_name_or_path_style = content, style
    initial.update(prompt=DEMO_PROMPT, steps=DEMO_STEPS.get(key, 20))
    return pipe, initial, call_kwargs


if __name__ == "__main__":
    cli.quiet_libraries()
    sys.exit(cli.run(main))
