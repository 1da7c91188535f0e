"""Score a results folder the way the paper does: Style Sim, CLIP score, DINO score (+ CLIP text).

    python evaluate_metrics.py --results results
    accelerate launch --multi_gpu --num_processes 4 evaluate_metrics.py --results results
    python evaluate_metrics.py --demo     # scores evaluate_grid.py --demo's folder with the world's scorers

Reads results/images/<content>__<style>/<method>/*.png and the pairs (reference images,
prompts) from results/run.json, or from --pairs. Writes, into the results folder:
metrics_per_image.csv, metrics.csv (per pair and method, and per method over all
pairs), metrics.md (the paper's Table 1 layout) and metrics.png (a bar chart).

Pictures of the trained world (evaluate_grid.py --demo) are scored by the world's own
scorers instead (subject, szn style, both: klora/world_scorers.py): world_rates.md and
.csv, and with a step-split sweep, step_split.png.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from klora import cli
from klora import grid as G

DEMO_FOLDER = "demo_evaluation"


def build_parser():
    from klora.metrics import DEFAULT_CLIP, DEFAULT_DINO

    parser = cli.ArgumentParser(description="Score generated images with the K-LoRA paper's metrics.")
    parser.add_argument("--results", default=None, help=f"results folder of evaluate_grid.py (default results, "
                                                        f"{DEMO_FOLDER} with --demo)")
    parser.add_argument("--pairs", default=None,
                        help="pairs file with the reference images and prompts (default: the folder's run.json)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="score only these method folders (default: every folder found)")
    parser.add_argument("--clip_model", default=DEFAULT_CLIP, help=f"CLIP hub id or local folder (default {DEFAULT_CLIP})")
    parser.add_argument("--dino_model", default=DEFAULT_DINO, help=f"DINO ViT hub id or local folder (default {DEFAULT_DINO})")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present; under accelerate launch, "
                                                         "each process's own device), cpu, cuda:N")
    parser.add_argument("--batch_size", type=int, default=16, help="images per model call (default 16)")
    parser.add_argument("--output_folder", default=None, help="where the reports go (default: the results folder)")
    parser.add_argument("--world", action="store_true",
                        help="score with the world's scorers, not CLIP and DINO (the default for a folder of "
                             "evaluate_grid.py --demo)")
    parser.add_argument("--demo", action="store_true",
                        help=f"score {DEMO_FOLDER} (evaluate_grid.py --demo's world pictures) with the world's scorers")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise cli.KLoRAError(f"--batch_size {args.batch_size}: must be at least 1")
    root = Path(args.results or (DEMO_FOLDER if args.demo else "results")).expanduser()
    items, spec, methods = _collect(root, args)
    out = Path(args.output_folder).expanduser() if args.output_folder else root
    record = G.read_run_record(root) or {}
    if args.world or args.demo or record.get("settings", {}).get("world"):
        _world_report(items, methods, record.get("settings", {}), root, out)
        return

    from klora.metrics import ClipEmbedder, DinoEmbedder, quiet_loading

    quiet_loading()
    state = _process_state()
    with tempfile.TemporaryDirectory(prefix="klora-metrics-demo-") as scratch:
        if args.demo:
            args.clip_model, args.dino_model = _demo_models(scratch)
        device = _device(args.device, state)
        with state.main_process_first():  # one download into the hub cache, then the others read it
            clip = ClipEmbedder(args.clip_model, device, args.batch_size)
            dino = DinoEmbedder(args.dino_model, device, args.batch_size)
        with state.split_between_processes(items) as mine:
            rows, unreadable = _score(list(mine), clip, dino, args.batch_size, state)
        if state.num_processes > 1:
            G.report_in_turn(state, f"process {state.process_index}: scored {len(rows)} images")

    from accelerate.utils import gather_object

    rows, unreadable = gather_object(rows), gather_object(unreadable)
    state.wait_for_everyone()
    if state.is_main_process:
        _report(rows, unreadable, items, methods, root, out, args)


def _collect(root: Path, args):
    """The images to score, with their references and prompts; every check before any model loads."""
    from klora.metrics import ImageToScore

    if not root.is_dir():
        raise cli.KLoRAError(f"--results '{root}': no such folder (run evaluate_grid.py first"
                             + (", with --demo)" if args.demo else ")"))
    if args.pairs:
        spec = G.load_pairs(args.pairs)
    else:
        record = G.read_run_record(root)
        if record is None:
            raise cli.KLoRAError(f"--results '{root}': no run.json; pass the pairs file with --pairs")
        spec = G.spec_from_record(record, f"'{root / 'run.json'}'")
    found = G.scan(root)
    if not found:
        raise cli.KLoRAError(f"--results '{root}': no images under {root / 'images'}/<content>__<style>/<method>/")
    if args.methods:
        missing = [m for m in args.methods if m not in {f.method for f in found}]
        if missing:
            raise cli.KLoRAError(f"--methods: no images for {', '.join(missing)} "
                                 f"(found: {', '.join(sorted({f.method for f in found}))})")
        found = [f for f in found if f.method in args.methods]
    unknown = sorted({f.pair for f in found if spec.pair(f.pair) is None})
    if unknown:
        print(f"warning: skipping {len(unknown)} image folder(s) that the pairs do not name: "
              f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}", file=sys.stderr)
    items = []
    for f in found:
        pair = spec.pair(f.pair)
        if pair is None:
            continue
        for entry in (pair.content, pair.style):
            if not entry.images:
                raise cli.KLoRAError(f"{entry.role} '{entry.name}' has no reference images ('images' in the pairs "
                                     f"file): the {'CLIP and DINO scores' if entry.role == 'content' else 'Style Sim'} "
                                     "need them")
            for path in entry.images:
                if not Path(path).is_file():
                    raise cli.KLoRAError(f"{entry.role} '{entry.name}': reference image '{path}' not found")
        items.append(ImageToScore(pair=f.pair, method=f.method, name=f.name, path=str(f.path),
                                  subject_images=pair.content.images, style_images=pair.style.images,
                                  prompt=pair.text_prompt))
    if not items:
        raise cli.KLoRAError(f"--results '{root}': none of its image folders is a pair of the pairs file")
    return items, spec, G.method_order(f.method for f in found)


def _score(items, clip, dino, batch_size, state):
    from tqdm.auto import tqdm

    from klora.metrics import score

    bar = tqdm(total=len(items), unit="image", disable=not state.is_main_process,
               desc="scoring" + (f" (process 0 of {state.num_processes})" if state.num_processes > 1 else ""))
    rows, unreadable = score(items, clip, dino, progress=bar.update, batch_size=batch_size)
    bar.close()
    return rows, unreadable


def _report(rows, unreadable, items, methods, root: Path, out: Path, args) -> None:
    from klora import metrics as M
    from klora.cli import save_png

    for path in unreadable:
        print(f"warning: could not read '{path}'; it is left out", file=sys.stderr)
    if not rows:
        raise cli.KLoRAError("no image could be read")
    order = {(i.pair, i.method, i.name): n for n, i in enumerate(items)}
    rows.sort(key=lambda r: order[(r["pair"], r["method"], r["image"])])
    if len(rows) + len(unreadable) != len(items):
        raise cli.KLoRAError(f"internal: {len(items)} images to score, {len(rows) + len(unreadable)} scored")
    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    per_pair, per_method = M.summarize(rows)
    labels = {m: G.method_label(m) for m in methods}
    n_pairs = len({r["pair"] for r in rows})
    models = ("tiny random CLIP and DINO of --demo: the numbers are meaningless" if args.demo
              else f"CLIP: `{args.clip_model}`, DINO: `{args.dino_model}`")
    notes = [f"Cosine similarities in %, higher is better: {len(rows)} images of {n_pairs} pairs in `{root}`.",
             f"Models: {models}.",
             "Each number is the mean over a pair's images, then over pairs. "
             "CLIP text-image compares each image with its prompt (trigger words replaced by descriptions)."]
    _make_folder(out)
    G.write_text_atomic(out / "metrics_per_image.csv",
                        M.csv_text(rows, ["pair", "method", "image", "path", *M.METRICS]))
    summary = per_pair + [{**m, "pair": "all"} for m in per_method]
    G.write_text_atomic(out / "metrics.csv", M.csv_text(summary, ["method", "pair", "images", *M.METRICS]))
    G.write_text_atomic(out / "metrics.md", M.markdown_report(per_pair, per_method, methods, labels,
                                                              "K-LoRA evaluation", notes))
    save_png(M.bar_chart(per_method, methods, labels), out / "metrics.png")
    width = max(len(labels[m]) for m in methods)
    print(f"{'':{width}}  " + "  ".join(f"{M.METRIC_LABELS[k]:>15}" for k in M.METRICS))
    by_method = {m["method"]: m for m in per_method}
    for m in methods:
        print(f"{labels[m]:{width}}  " + "  ".join(f"{by_method[m][k]:15.1f}" for k in M.METRICS))
    print(f"wrote {out / 'metrics.md'}, metrics.csv, metrics_per_image.csv and metrics.png")


def _world_report(items, methods, settings: dict, root: Path, out: Path) -> None:
    """The world's rates per method; the step-split sweep's chart when the folder has one."""
    import json

    from klora import metrics as M
    from klora import world_eval
    from klora.cli import save_png

    found = [G.ResultImage(i.pair, i.method, i.name, Path(i.path)) for i in items]
    table = world_eval.score_results(found)
    labels = {m: G.method_label(m) for m in methods}
    main = [m for m in methods if not G.parse_split(m)]
    _make_folder(out)
    rows = [{"method": m, **table[m]} for m in methods]
    G.write_text_atomic(out / "world_rates.csv",
                        M.csv_text(rows, ["method", "pictures", "subject", "style", "both"]))
    text = ["# The world's rates", "",
            "Share of pictures the world's scorers (klora/world_scorers.py) call the sbu toy, szn style, and both; "
            f"{settings.get('num_inference_steps')} steps, guidance {settings.get('guidance_scale')}.", "",
            world_eval.markdown_table(table, main, labels)]
    steps = settings.get("num_inference_steps")
    if steps and any(G.parse_split(m) for m in methods):
        curves = world_eval.split_curves(table, steps)
        shares = {}
        for m in ("klora-s", "klora-sstar"):
            for item in found:
                choices = G.choices_path(root, item.pair, m)
                if item.method == m and choices.is_file():
                    shares[m] = json.loads(choices.read_text())["content_share"]
                    break
        save_png(world_eval.split_chart(curves, steps, shares, "One LoRA for the first K steps, the other after"),
                 out / "step_split.png")
        text += ["## Step split", "", "| K | " + " | ".join(f"{o} {r}" for o, r in curves) + " |",
                 "|---:|" + "---:|" * len(curves)]
        for k in range(steps + 1):
            cells = [("" if v[k] is None else f"{v[k]:.0%}") for v in curves.values()]
            text.append(f"| {k} | " + " | ".join(cells) + " |")
        for name, share in shares.items():
            text += ["", f"{labels.get(name, name)}: share of shared layers on content, per step: "
                     + " ".join(f"{v:.2f}" for v in share)]
    G.write_text_atomic(out / "world_rates.md", "\n".join(text) + "\n")
    width = max(len(labels[m]) for m in main)
    print(f"{'':{width}}  {'subject':>8} {'style':>8} {'both':>8}")
    for m in main:
        r = table[m]
        print(f"{labels[m]:{width}}  {r['subject']:8.0%} {r['style']:8.0%} {r['both']:8.0%}")
    print(f"wrote {out / 'world_rates.md'}, world_rates.csv" + (", step_split.png" if steps and len(main) < len(methods) else ""))


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cli.KLoRAError(f"--output_folder '{out}': cannot create it ({exc.strerror or exc})") from None


def _process_state():
    import torch
    from accelerate import PartialState

    # Without a GPU accelerate only joins the workers of a launch when asked for CPU.
    return PartialState(cpu=not torch.cuda.is_available())


def _device(device: str, state) -> str:
    from klora.pipelines import resolve_device

    if state.num_processes > 1 and device == "auto":
        return str(state.device)
    return resolve_device(device)


def _demo_models(scratch: str) -> tuple[str, str]:
    from klora.metrics import build_tiny_clip, build_tiny_dino

    return (build_tiny_clip(Path(scratch) / "tiny-clip"), build_tiny_dino(Path(scratch) / "tiny-dino"))


if __name__ == "__main__":
    cli.quiet_libraries()
    sys.exit(cli.run(main))
