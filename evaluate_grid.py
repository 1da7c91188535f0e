"""Generate the paper's comparison: every content x style pair, every method, every seed.

    python evaluate_grid.py --pairs pairs.json \
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
      --num_images 10 --output_folder results

    accelerate launch --multi_gpu --num_processes 4 evaluate_grid.py --pairs pairs.json ...

    python evaluate_grid.py --demo --num_images 32 --sweep   # the trained world (world/), no download

Images go to results/images/<content>__<style>/<method>/seed<N>.png; finished images
are skipped, so an interrupted run continues where it stopped. Grid pictures go to
results/grids/. Score the folder with evaluate_metrics.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from klora import cli
from klora import grid as G
from klora import methods

FAMILIES = {"sd": "unet", "flux": "transformer"}
DEFAULTS = {"sd": dict(steps=50, guidance=5.0, size=1024), "flux": dict(steps=28, guidance=3.5, size=1024)}
DEMO_FOLDER = "demo_evaluation"


def build_parser():
    parser = cli.ArgumentParser(description="Generate K-LoRA and baseline images for content x style pairs, "
                                            "and the comparison grids.")
    parser.add_argument("--pairs", help="pairs file (JSON; YAML with PyYAML): LoRAs, triggers, reference images")
    parser.add_argument("--pretrained_model_name_or_path", help="base model: hub id or local diffusers folder")
    parser.add_argument("--family", default="sd", choices=sorted(FAMILIES),
                        help="sd: Stable Diffusion (XL, 1.x, 2.x); flux: FLUX.1 (default sd)")
    parser.add_argument("--methods", nargs="+", default=list(G.METHODS), choices=list(G.METHODS), metavar="METHOD",
                        help="any of " + ", ".join(G.METHODS) + " (default: all)")
    parser.add_argument("--alpha", type=float, default=1.5, help="K-LoRA alpha (default 1.5)")
    parser.add_argument("--beta", type=float, default=None,
                        help="beta of K-LoRA and EST-LoRA, >= 0 (default: 0.5 for the s pattern, 0.85*alpha for s*); "
                             "np is NP-LoRA at mu 0.5, np-hard at mu inf; switch is LoRA Switch every 5 steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="one image per seed and method (default: 0)")
    parser.add_argument("--num_images", type=int, default=None, help="seeds 0..N-1 (the paper: 10)")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="denoising steps (default 50 sd, 28 flux)")
    parser.add_argument("--guidance_scale", type=float, default=None, help="guidance scale (default 5.0 sd, 3.5 flux)")
    parser.add_argument("--negative_prompt", default=None, help="negative prompt for every image")
    parser.add_argument("--height", type=int, default=None, help="image height (default 1024)")
    parser.add_argument("--width", type=int, default=None, help="image width (default 1024)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if present; under accelerate launch, each process's own device), cpu, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")
    parser.add_argument("--output_folder", default=None, help=f"results folder (default results, {DEMO_FOLDER} with --demo)")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="seeds of one method per pipeline call (default 1; more is faster on small models, "
                             "and each image still depends on its own seed only)")
    parser.add_argument("--cell_size", type=int, default=256, help="pixels per image in the grid pictures (default 256)")
    parser.add_argument("--no_grids", action="store_true", help="only generate images, draw no grid pictures")
    parser.add_argument("--sweep", action="store_true",
                        help="also every step split: the content LoRA for the first K steps and the style LoRA "
                             "after (c2s-K), and the reverse (s2c-K), for K = 1 .. steps-1")
    parser.add_argument("--demo", action="store_true",
                        help="no download: the trained world (world/sdxl, its sbu and szn LoRAs) at 32 x 32")
    return parser


def check_arguments(args) -> None:
    if args.demo and args.family != "sd":
        raise cli.KLoRAError("--demo runs the world's Stable Diffusion XL model; drop --family")
    defaults = DEFAULTS[args.family]
    if args.demo:  # the world's own settings
        from klora import world, world_eval

        defaults = dict(steps=world_eval.STEPS, guidance=world_eval.GUIDANCE, size=world.SIZE)
    args.num_inference_steps = args.num_inference_steps or defaults["steps"]
    args.guidance_scale = defaults["guidance"] if args.guidance_scale is None else args.guidance_scale
    if args.num_inference_steps < 1:
        raise cli.KLoRAError(f"--num_inference_steps {args.num_inference_steps}: must be at least 1")
    if not (args.guidance_scale >= 0):
        raise cli.KLoRAError(f"--guidance_scale {args.guidance_scale}: must be 0 or more")
    if not (0 < args.alpha < float("inf")):
        raise cli.KLoRAError(f"--alpha {args.alpha}: must be a positive number")
    if args.beta is not None:
        methods.check_beta(args.beta, "--beta")
    for name in ("height", "width"):
        value = getattr(args, name) or defaults["size"]
        if value < 8 or value % 8 or value > cli.MAX_SIDE:
            raise cli.KLoRAError(f"--{name} {value}: must be a positive multiple of 8 (at most {cli.MAX_SIDE})")
        setattr(args, name, value)
    if args.num_images is not None:
        if args.seeds is not None:
            raise cli.KLoRAError("--seeds and --num_images: give one or the other")
        if args.num_images < 1:
            raise cli.KLoRAError(f"--num_images {args.num_images}: must be at least 1")
        args.seeds = list(range(args.num_images))
    args.seeds = args.seeds if args.seeds is not None else [0]
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise cli.KLoRAError("--seeds: non-negative, each seed once")
    if len(set(args.methods)) != len(args.methods):
        raise cli.KLoRAError("--methods: each method once")
    if args.batch_size < 1:
        raise cli.KLoRAError(f"--batch_size {args.batch_size}: must be at least 1")
    if not 16 <= args.cell_size <= 2048:
        raise cli.KLoRAError(f"--cell_size {args.cell_size}: between 16 and 2048, please")
    if not args.demo:
        if not args.pairs:
            raise cli.KLoRAError("--pairs is required (or run --demo to try the tiny built-in model)")
        if not args.pretrained_model_name_or_path:
            raise cli.KLoRAError("--pretrained_model_name_or_path is required (e.g. stabilityai/stable-diffusion-xl-base-1.0)")
    args.output_folder = args.output_folder or (DEMO_FOLDER if args.demo else "results")
    if args.sweep:
        args.methods = list(dict.fromkeys([*args.methods, *G.split_methods(args.num_inference_steps)]))


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.demo and (args.pairs or args.pretrained_model_name_or_path):
        raise cli.KLoRAError("--demo brings its own model, LoRAs and pairs; drop --pairs and the model")
    check_arguments(args)
    root = Path(args.output_folder).expanduser()
    if not args.demo:
        spec = G.load_pairs(args.pairs)  # every mistake in the file is found before anything is written

    state = _process_state()
    if args.demo:
        if state.is_main_process:
            _prepare_demo(args, root)
        state.wait_for_everyone()
        from klora import world_eval

        args.pretrained_model_name_or_path = str(world_eval.MODEL)
        spec = G.load_pairs(root / "inputs" / "pairs.json")

    settings = {"model": args.pretrained_model_name_or_path, "family": args.family,
                "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
                "height": args.height, "width": args.width, "negative_prompt": args.negative_prompt,
                "alpha": args.alpha, "beta": args.beta}
    if args.demo:
        settings["world"] = True  # evaluate_metrics.py scores it with the world's scorers
    record = G.merge_run_record(G.read_run_record(root) if root.is_dir() else None, settings, spec,
                                f"results folder '{root}'")
    jobs = G.plan(root, spec, args.methods, args.seeds)
    todo = [job for job in jobs if not G.is_finished(job.path)]
    # Every process has looked at the folder before any process writes to it:
    # all of them see the same to-do list, so the split below loses and repeats nothing.
    state.wait_for_everyone()
    if state.is_main_process:
        _make_folder(root)
        G.write_text_atomic(root / "run.json", _json(record))
        print(f"{len(jobs)} images planned ({len(spec.pairs)} pairs x {len(args.methods)} methods x "
              f"{len(args.seeds)} seeds): {len(jobs) - len(todo)} finished, {len(todo)} to generate"
              + (f" on {state.num_processes} processes" if state.num_processes > 1 else ""), flush=True)
    state.wait_for_everyone()

    with state.split_between_processes(todo) as mine:
        mine = list(mine)
    with state.main_process_first():  # one download into the hub cache, then the others read it
        pipe = _load(args, state) if mine else None
    generated = _generate(pipe, mine, args, state) if mine else 0
    state.wait_for_everyone()
    if state.num_processes > 1:
        G.report_in_turn(state, f"process {state.process_index}: generated {generated} images")
    if state.is_main_process:
        if not args.no_grids:
            written = G.write_grids(root, spec, args.methods, args.seeds, G.Layout(cell=args.cell_size))
            print(f"wrote {len(written)} grid pictures to {root / 'grids'}")
        missing = [job.path for job in jobs if not G.is_finished(job.path)]
        if missing:
            raise cli.KLoRAError(f"{len(missing)} planned images are missing (first: {missing[0]}); run again to resume")
        print(f"done: {len(jobs)} images in {root / 'images'}; score them with "
              f"python evaluate_metrics.py --results {root}")


def _load(args, state):
    from klora.pipelines import load_pipeline

    _quiet_loading()
    device = args.device
    if state.num_processes > 1 and device == "auto":
        device = str(state.device)  # this process's own GPU
    pipe = load_pipeline(args.pretrained_model_name_or_path, FAMILIES[args.family], device, args.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, jobs: list, args, state) -> int:
    """Generate this process's share, attaching each pair's LoRAs once."""
    import torch
    from tqdm.auto import tqdm

    from klora.fusion import KLoRA

    bar = tqdm(total=len(jobs), unit="image", disable=not state.is_main_process,
               desc="generating" + (f" (process 0 of {state.num_processes})" if state.num_processes > 1 else ""))
    done = 0
    for pair in dict.fromkeys(job.pair for job in jobs):
        mine = [job for job in jobs if job.pair == pair]
        def attach(**options):
            return KLoRA(pipe, pair.content.lora, pair.style.lora, content_weight_name=pair.content.weight_name,
                         style_weight_name=pair.style.weight_name, alpha=args.alpha, **options)

        klora, attached_with = attach(), {}
        choices_written = set()
        batches = []  # jobs of one method, at most --batch_size, generated in one pipeline call
        for job in mine:
            if batches and batches[-1][0].method == job.method and len(batches[-1]) < args.batch_size:
                batches[-1].append(job)
            else:
                batches.append([job])
        try:
            for batch in batches:
                job = batch[0]
                split = G.parse_split(job.method)
                callback = None
                if split:
                    first, at, second = split
                    klora.set_method(first)
                    callback = _switch_after(klora, at, second)
                else:
                    method, pattern, options = G.METHODS[job.method]
                    if options != attached_with:  # NP-LoRA's mu is fixed when its correction is built
                        klora.detach()
                        klora, attached_with = attach(**options), options
                    if method in methods.CHOOSING:
                        klora.set_schedule(pattern, args.alpha, args.beta)
                    klora.set_method(method)
                kwargs = dict(prompt=pair.prompt, num_inference_steps=args.num_inference_steps,
                              guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                              num_images_per_prompt=len(batch),
                              generator=[torch.Generator("cpu").manual_seed(j.seed) for j in batch])
                if callback is not None:
                    kwargs["callback_on_step_end"] = callback
                if args.negative_prompt is not None:
                    kwargs["negative_prompt"] = args.negative_prompt
                images = pipe(**kwargs).images
                for job, image in zip(batch, images):
                    job.path.parent.mkdir(parents=True, exist_ok=True)
                    cli.save_png(image, job.path)
                    done += 1
                    bar.update(1)
                    # one flushed line per image: the processes share the terminal
                    if state.is_main_process:
                        bar.write(f"wrote {job.path}")
                        sys.stdout.flush()
                    else:
                        print(f"wrote {job.path}", flush=True)
                if klora.method in methods.PER_STEP and job.method not in choices_written:  # the same for every seed
                    choices_written.add(job.method)
                    _write_choices(klora, G.choices_path(Path(args.output_folder).expanduser(), pair.id, job.method))
        finally:
            klora.detach()
    bar.close()
    return done


def _switch_after(klora, step: int, method: str):
    """A step-end callback: from step ``step`` on, ``method`` (the LoRA switch is written at once)."""
    def callback(pipe, index, timestep, tensors):
        if index + 1 == step:
            klora.set_method(method)
        return tensors

    return callback


def _write_choices(klora, path: Path) -> None:
    """K-LoRA's choice at each step of the last generation: the share of shared layers on content."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    steps = klora.selection_log()["generations"][-1]["steps"]
    shares = [sum(c == "content" for c in s["choices"].values()) / max(1, len(s["choices"])) for s in steps]
    G.write_text_atomic(path, json.dumps({"num_inference_steps": len(steps), "content_share": shares}) + "\n")


def _quiet_loading() -> None:
    """One progress bar (ours): not one per loaded component from diffusers and transformers."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _process_state():
    """accelerate's view of the processes: one, or one per ``accelerate launch`` worker."""
    import torch
    from accelerate import PartialState

    # Without a GPU accelerate only joins the workers of a launch when asked for CPU.
    return PartialState(cpu=not torch.cuda.is_available())


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cli.KLoRAError(f"--output_folder '{folder}': cannot create it ({exc.strerror or exc})") from None


def _json(record: dict) -> str:
    import json

    return json.dumps(record, indent=1) + "\n"


def _prepare_demo(args, root: Path) -> None:
    """The world's pair (sbu x szn) and reference pictures in root/inputs; the model and LoRAs are world/'s."""
    import json

    from PIL import Image

    from klora import world, world_eval

    _quiet_loading()
    cli.check_world()
    inputs = root / "inputs"
    if (inputs / "pairs.json").is_file():
        return
    print(f"demo: the trained world ({world_eval.WORLD}): sbu toy x szn style, reference pictures in {inputs}")
    _make_folder(inputs)
    references = {"sbu": world.subject_scenes(4, seed=1), "szn": world.style_scenes(4, seed=2)}
    for name, scenes in references.items():
        for i, scene in enumerate(scenes):
            Image.fromarray(world.draw(scene)).save(inputs / f"{name}{i}.png")
    pairs = {"prompt_template": "{content} in {style} style",
             "contents": [{"name": "sbu", "lora": str(world_eval.SUBJECT_LORA), "trigger": world.SUBJECT_PROMPT,
                           "description": "a yellow star with a red centre",
                           "images": [f"sbu{i}.png" for i in range(4)]}],
             "styles": [{"name": "szn", "lora": str(world_eval.STYLE_LORA), "trigger": "szn",
                         "description": "violet diagonal stripes with black outlines",
                         "images": [f"szn{i}.png" for i in range(4)]}]}
    G.write_text_atomic(inputs / "pairs.json", json.dumps(pairs, indent=1) + "\n")


if __name__ == "__main__":
    cli.quiet_libraries()
    sys.exit(cli.run(main))
