"""evaluate_grid.py and klora.grid: pairs files, folder layout, grid pictures, resume, two processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_script
from klora import grid as G

RED, GREEN, BLUE, YELLOW = (220, 30, 30), (30, 200, 60), (30, 60, 220), (230, 210, 20)


def _square(path: Path, colour, size: int = 24) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return str(path)


def _pairs_dict(content_lora: str, style_lora: str, style_lora_2: str | None = None) -> dict:
    styles = [{"name": "water", "lora": style_lora, "trigger": "szn", "description": "watercolour painting",
               "images": ["refs/water.png"]}]
    if style_lora_2:
        styles.append({"name": "ink", "lora": style_lora_2, "trigger": "ink", "images": ["refs/ink.png"]})
    return {"prompt_template": "a {content} in {style} style",
            "contents": [{"name": "dog", "lora": content_lora, "trigger": "sbu dog", "description": "dog",
                          "images": "refs/dog"}],
            "styles": styles}


@pytest.fixture
def pairs_folder(tmp_path):
    """A pairs file whose LoRA files are empty placeholders (load_pairs only checks that they exist)."""
    (tmp_path / "loras").mkdir()
    for name in ("content", "style", "style2"):
        (tmp_path / "loras" / f"{name}.safetensors").write_bytes(b"")
    _square(tmp_path / "refs" / "dog" / "b.png", GREEN)
    _square(tmp_path / "refs" / "dog" / "a.png", RED)
    _square(tmp_path / "refs" / "water.png", BLUE)
    _square(tmp_path / "refs" / "ink.png", YELLOW)
    data = _pairs_dict("loras/content.safetensors", "loras/style.safetensors", "loras/style2.safetensors")
    (tmp_path / "pairs.json").write_text(json.dumps(data))
    return tmp_path


# --- the pairs file -------------------------------------------------------------

def test_pairs_file_resolves_paths_prompts_and_default_pairs(pairs_folder):
    spec = G.load_pairs(pairs_folder / "pairs.json")
    assert [p.id for p in spec.pairs] == ["dog__water", "dog__ink"]  # every content with every style
    dog = spec.contents["dog"]
    assert dog.lora == str((pairs_folder / "loras" / "content.safetensors").resolve())
    # a folder of references: its images in name order, as absolute paths
    assert dog.images == (str(pairs_folder / "refs" / "dog" / "a.png"), str(pairs_folder / "refs" / "dog" / "b.png"))
    water = spec.pairs[0]
    assert water.prompt == "a sbu dog in szn style"
    assert water.text_prompt == "a dog in watercolour painting style"
    ink = spec.pairs[1]
    assert ink.text_prompt == "a dog in ink style"  # no description: the trigger


def test_pairs_file_explicit_pairs_with_own_prompt_and_hub_ids(pairs_folder):
    data = _pairs_dict("someone/dog-lora", "loras/style.safetensors", "loras/style2.safetensors")
    data["pairs"] = [{"content": "dog", "style": "ink", "prompt": "{content} sleeping, {style}"}]
    (pairs_folder / "p.json").write_text(json.dumps(data))
    spec = G.load_pairs(pairs_folder / "p.json")
    assert [p.id for p in spec.pairs] == ["dog__ink"]
    assert spec.pairs[0].prompt == "sbu dog sleeping, ink"
    assert spec.contents["dog"].lora == "someone/dog-lora"


def test_pairs_file_yaml(pairs_folder):
    yaml = pytest.importorskip("yaml")
    data = _pairs_dict("loras/content.safetensors", "loras/style.safetensors")
    (pairs_folder / "pairs.yaml").write_text(yaml.safe_dump(data))
    assert [p.id for p in G.load_pairs(pairs_folder / "pairs.yaml").pairs] == ["dog__water"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["contents"][0].update(images=["refs/missing.png"]), "reference image 'refs/missing.png' not found"),
    (lambda d: d["styles"][0].update(lora="loras/nope.safetensors"), "LoRA 'loras/nope.safetensors' not found"),
    (lambda d: d.update(pairs=[["dog", "oil"]]), "no style LoRA named 'oil'"),
    (lambda d: d.update(pairs=[["dog", "ink"], ["dog", "ink"]]), "listed twice"),
    (lambda d: d["contents"][0].update(name="my dog"), "'name' 'my dog' must be"),
    (lambda d: d["contents"][0].update(name="a__b"), "no '__'"),
    (lambda d: d["styles"].append(dict(d["styles"][0])), "two style LoRAs are named 'water'"),
    (lambda d: d.update(prompt_template="a {subject}"), "only {content} and {style}"),
    (lambda d: d["styles"][0].update(colour="blue"), "unknown key(s) colour"),
    (lambda d: d.update(contents=[]), "'contents' must be a non-empty list"),
])
def test_pairs_file_mistakes(pairs_folder, change, message):
    data = _pairs_dict("loras/content.safetensors", "loras/style.safetensors", "loras/style2.safetensors")
    change(data)
    (pairs_folder / "bad.json").write_text(json.dumps(data))
    with pytest.raises(G.PairsError) as info:
        G.load_pairs(pairs_folder / "bad.json")
    assert message in str(info.value)


def test_pairs_file_not_json_or_missing(pairs_folder):
    (pairs_folder / "broken.json").write_text('{"contents": [\n  {"name": "dog",, }]}')
    with pytest.raises(G.PairsError, match=r"not valid JSON \(line 2, column 18"):
        G.load_pairs(pairs_folder / "broken.json")
    with pytest.raises(G.PairsError, match="no such file"):
        G.load_pairs(pairs_folder / "absent.json")
    (pairs_folder / "refs" / "fake.png").write_text("not an image")
    data = _pairs_dict("loras/content.safetensors", "loras/style.safetensors")
    data["styles"][0]["images"] = ["refs/fake.png"]
    (pairs_folder / "fake.json").write_text(json.dumps(data))
    with pytest.raises(G.PairsError, match="not an image PIL can read"):
        G.load_pairs(pairs_folder / "fake.json")


# --- layout and grid pictures ---------------------------------------------------

def test_image_paths_and_plan_order(tmp_path, pairs_folder):
    spec = G.load_pairs(pairs_folder / "pairs.json")
    jobs = G.plan(tmp_path, spec, ["merge", "klora-sstar"], [3, 1])
    assert [(j.pair.id, j.method, j.seed) for j in jobs] == [
        ("dog__water", "merge", 3), ("dog__water", "merge", 1), ("dog__water", "klora-sstar", 3),
        ("dog__water", "klora-sstar", 1), ("dog__ink", "merge", 3), ("dog__ink", "merge", 1),
        ("dog__ink", "klora-sstar", 3), ("dog__ink", "klora-sstar", 1)]
    assert jobs[2].path == tmp_path / "images" / "dog__water" / "klora-sstar" / "seed3.png"


def test_is_finished_only_for_complete_pngs(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 40), RED).save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:-30])
    jpeg = tmp_path / "x.png"
    Image.new("RGB", (8, 8), RED).save(jpeg, format="JPEG")
    assert G.is_finished(good)
    assert not G.is_finished(truncated)
    assert not G.is_finished(jpeg)
    assert not G.is_finished(tmp_path / "absent.png")


def _dark_pixels(picture: Image.Image, box) -> int:
    region = np.asarray(picture.crop(box).convert("L"))
    return int((region < 100).sum())


def test_compose_puts_each_image_in_its_cell_with_labels():
    layout = G.Layout(cell=30, gap=5, margin=7, title_height=20, label_height=18, label_width=60, font_size=12)
    colours = [[RED, GREEN, None], [BLUE, G.BLANK, YELLOW]]
    cells = [[Image.new("RGB", (50, 50), c) if isinstance(c, tuple) else c for c in row] for row in colours]
    table = G.Table(title="Title", row_labels=["first", "second"], col_labels=["one", "two", "three"], cells=cells)
    picture = G.compose(table, layout)
    # size, computed independently: margins + label column + 3 cells + 2 gaps; title + labels + 2 cells + 1 gap
    assert picture.size == (7 + 60 + 3 * 30 + 2 * 5 + 7, 7 + 20 + 18 + 2 * 30 + 5 + 7)
    pixels = np.asarray(picture)
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            left, top = 7 + 60 + c * 35, 7 + 20 + 18 + r * 35
            cell = pixels[top:top + 30, left:left + 30].reshape(-1, 3)
            expected = {None: G.EMPTY, G.BLANK: G.BACKGROUND}.get(colour, colour)
            assert (cell == np.array(expected)).all(), (r, c)
            # the gap right of each cell is background
            if c < 2:
                assert (pixels[top:top + 30, left + 30:left + 35] == 255).all()
    # labels: dark text above every column, left of every row, and in the title strip
    for c in range(3):
        left = 7 + 60 + c * 35
        assert _dark_pixels(picture, (left, 7 + 20, left + 30, 7 + 20 + 18)) > 5
    for r in range(2):
        top = 7 + 20 + 18 + r * 35
        assert _dark_pixels(picture, (7, top, 7 + 60, top + 30)) > 5
    assert _dark_pixels(picture, (7, 7, picture.width - 7, 7 + 20)) > 10
    # nothing dark where no label is (the label column beside the header strip)
    assert _dark_pixels(picture, (0, 7 + 20, 7 + 60, 7 + 20 + 18)) == 0


def test_compose_shortens_long_labels_to_the_cell():
    layout = G.Layout(cell=40, gap=0, margin=0, title_height=0, label_height=16, label_width=0, font_size=12)
    table = G.Table(title="", row_labels=["r"], col_labels=["a very long label that does not fit", "b"],
                    cells=[[G.BLANK, G.BLANK]])
    picture = G.compose(table, layout)
    # the first label stays inside its own column: the second column's strip only holds "b"
    first = _dark_pixels(picture, (0, 0, 40, 16))
    second = _dark_pixels(picture, (40, 0, 80, 16))
    assert first > second > 0
    lone_b = G.compose(G.Table(title="", row_labels=["r"], col_labels=["", "b"], cells=[[G.BLANK, G.BLANK]]), layout)
    assert second == _dark_pixels(lone_b, (40, 0, 80, 16))


def test_method_and_pair_tables(tmp_path, pairs_folder):
    data = _pairs_dict("loras/content.safetensors", "loras/style.safetensors", "loras/style2.safetensors")
    data["contents"].append({"name": "cat", "lora": "loras/content.safetensors"})  # no references
    data["pairs"] = [["dog", "water"], ["dog", "ink"], ["cat", "ink"]]
    (pairs_folder / "p.json").write_text(json.dumps(data))
    spec = G.load_pairs(pairs_folder / "p.json")
    done = _square(G.image_path(tmp_path, "dog__ink", "merge", 0), RED)
    _square(G.image_path(tmp_path, "cat__ink", "merge", 0), GREEN)
    table = G.method_table(tmp_path, spec, "merge", 0)
    assert table.row_labels == ["subject image", "water", "ink"]
    assert table.col_labels == ["style image", "dog", "cat"]
    assert table.cells[0] == [G.BLANK, spec.contents["dog"].images[0], G.BLANK]
    assert table.cells[1] == [spec.styles["water"].images[0], None, None]  # dog/water not generated; cat/water not a pair
    assert table.cells[2][:2] == [spec.styles["ink"].images[0], G.image_path(tmp_path, "dog__ink", "merge", 0)]
    assert str(table.cells[2][1]) == done

    pair = spec.pair("dog__ink")
    table = G.pair_table(tmp_path, pair, ["klora-sstar", "merge"], [0, 1])
    assert table.col_labels == ["subject: dog", "style: ink", "K-LoRA (s*)", "Direct merge"]
    assert table.row_labels == ["seed 0", "seed 1"]
    assert table.cells[0] == [pair.content.images[0], pair.style.images[0], None,
                              G.image_path(tmp_path, "dog__ink", "merge", 0)]
    assert table.cells[1] == [G.BLANK, G.BLANK, None, None]


def test_run_record_refuses_a_resume_with_other_settings(pairs_folder):
    spec = G.load_pairs(pairs_folder / "pairs.json")
    settings = {"model": "m", "num_inference_steps": 50}
    record = G.merge_run_record(None, settings, spec, "here")
    assert G.merge_run_record(record, settings, spec, "here")["pairs"] == record["pairs"]
    with pytest.raises(G.KLoRAError, match="num_inference_steps = 50, this run asks for 30"):
        G.merge_run_record(record, {**settings, "num_inference_steps": 30}, spec, "here")
    data = _pairs_dict("loras/content.safetensors", "loras/style.safetensors")
    data["prompt_template"] = "{content}, {style}"
    (pairs_folder / "other.json").write_text(json.dumps(data))
    with pytest.raises(G.KLoRAError, match="pair 'dog__water' had prompt"):
        G.merge_run_record(record, settings, G.load_pairs(pairs_folder / "other.json"), "here")
    # the record keeps what is needed to score the folder later
    again = G.spec_from_record(json.loads(json.dumps(record)), "run.json")
    assert again.pairs == spec.pairs


# --- the command ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_setup(tiny_sdxl_dir, demo_sdxl_loras, tmp_path_factory):
    """A pairs file for the tiny SDXL: one content, two styles (the second from another seed)."""
    from diffusers import UNet2DConditionModel

    from klora.tiny import write_demo_loras

    folder = tmp_path_factory.mktemp("evalpairs")
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    (folder / "second").mkdir()
    _, style_2 = write_demo_loras(unet, folder / "second", seed=1)
    _square(folder / "refs" / "dog" / "a.png", RED)
    _square(folder / "refs" / "water.png", BLUE)
    _square(folder / "refs" / "ink.png", YELLOW)
    data = _pairs_dict(demo_sdxl_loras[0], demo_sdxl_loras[1], style_2)
    (folder / "pairs.json").write_text(json.dumps(data))
    return tiny_sdxl_dir, folder / "pairs.json"


def _grid_args(model, pairs, out, *extra):
    return ["--pairs", str(pairs), "--pretrained_model_name_or_path", str(model), "--output_folder", str(out),
            "--num_inference_steps", "2", "--height", "64", "--width", "64", "--device", "cpu", "--cell_size", "32",
            *extra]


def _stamp(paths):
    return {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in paths}


@pytest.mark.slow
def test_generate_resume_and_grids(tiny_setup, tmp_path, monkeypatch, capsys):
    import torch
    from diffusers import StableDiffusionXLPipeline

    import evaluate_grid
    from klora.fusion import KLoRA
    from klora.pipelines import load_pipeline

    model, pairs = tiny_setup
    out = tmp_path / "results"
    calls = []
    original = StableDiffusionXLPipeline.__call__

    def counting(self, *args, **kwargs):
        calls.append(kwargs["prompt"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", counting)
    args = _grid_args(model, pairs, out, "--methods", "klora-sstar", "merge")
    evaluate_grid.main(args)
    expected = {out / "images" / p / m / "seed0.png" for p in ("dog__water", "dog__ink") for m in ("klora-sstar", "merge")}
    assert {p for p in (out / "images").rglob("*") if p.is_file()} == expected
    assert len(calls) == 4 and set(calls) == {"a sbu dog in szn style", "a sbu dog in ink style"}
    assert all(G.is_finished(p) for p in expected)
    grids = {p.name for p in (out / "grids").iterdir()}
    assert grids == {"method_klora-sstar_seed0.png", "method_merge_seed0.png", "pair_dog__water.png", "pair_dog__ink.png"}
    # a method grid: header row + 2 styles, style column + 1 subject, 32 px cells
    layout = G.Layout(cell=32)
    assert Image.open(out / "grids" / "method_merge_seed0.png").size == layout.size(3, 2)
    assert Image.open(out / "grids" / "pair_dog__ink.png").size == layout.size(1, 4)

    # the merge image is what the library makes for that pair, method and seed
    pipe = load_pipeline(str(model), "unet", "cpu", "fp32")
    spec = G.load_pairs(pairs)
    with KLoRA(pipe, spec.contents["dog"].lora, spec.styles["ink"].lora, method="merge"):
        direct = original(pipe, prompt="a sbu dog in ink style", num_inference_steps=2, height=64, width=64,
                          guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    made = {m: np.asarray(Image.open(out / "images" / "dog__ink" / m / "seed0.png")) for m in ("merge", "klora-sstar")}
    assert np.array_equal(made["merge"], np.asarray(direct))
    assert not np.array_equal(made["merge"], made["klora-sstar"])

    # resume: nothing to do, nothing touched
    before = _stamp(expected)
    calls.clear()
    evaluate_grid.main(args)
    assert calls == [] and _stamp(expected) == before
    assert "4 finished, 0 to generate" in capsys.readouterr().out

    # a truncated image and a missing one are made again; the others stay as they are
    damaged = out / "images" / "dog__water" / "merge" / "seed0.png"
    damaged.write_bytes(damaged.read_bytes()[:100])
    lost = out / "images" / "dog__ink" / "klora-sstar" / "seed0.png"
    lost.unlink()
    evaluate_grid.main(args)
    assert len(calls) == 2
    assert G.is_finished(damaged) and G.is_finished(lost)
    untouched = expected - {damaged, lost}
    assert _stamp(untouched) == {p: before[p] for p in untouched}

    # a new seed adds only its own images
    calls.clear()
    evaluate_grid.main(args[:-3] + ["--methods", "merge", "--seeds", "0", "5"])
    assert len(calls) == 2
    assert (out / "images" / "dog__ink" / "merge" / "seed5.png").is_file()

    # other generation settings would mix images: refused before anything is written
    calls.clear()
    stamps = _stamp(expected)
    with pytest.raises(G.KLoRAError, match="num_inference_steps = 2, this run asks for 3"):
        evaluate_grid.main(args + ["--num_inference_steps", "3"])
    assert calls == [] and _stamp(expected) == stamps


def test_command_line_mistakes_are_one_line(tiny_setup, tmp_path, capsys):
    from klora import cli

    import evaluate_grid

    model, pairs = tiny_setup
    out = tmp_path / "never"
    broken = tmp_path / "broken.json"
    broken.write_text("{ nope")
    data = json.loads(pairs.read_text())
    data["styles"][0]["images"] = [str(tmp_path / "missing.png")]
    missing_ref = pairs.parent / "missing_ref.json"  # beside the good one: its relative paths still resolve
    missing_ref.write_text(json.dumps(data))
    cases = [
        (["--pairs", str(tmp_path / "absent.json")], "no such file"),
        (["--pairs", str(broken)], "not valid JSON (line 1, column 3"),
        (["--pairs", str(missing_ref)], "missing.png' not found"),
        (["--pairs", str(pairs), "--seeds", "1", "1"], "each seed once"),
        (["--pairs", str(pairs), "--num_images", "0"], "--num_images 0"),
    ]
    for extra, message in cases:
        argv = ["--pretrained_model_name_or_path", str(model), "--output_folder", str(out), *extra]
        with pytest.raises(cli.KLoRAError, match=re.escape(message)):
            evaluate_grid.main(argv)
    assert not out.exists()
    # a usage mistake: argparse's one line, exit code 2
    with pytest.raises(SystemExit) as info:
        evaluate_grid.build_parser().parse_args(["--methods", "klora", "ziplora"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'klora'" in err
    # as a user sees it: one line, exit code 2, no traceback, no folder
    result = run_script("evaluate_grid.py", "--pairs", str(broken), "--pretrained_model_name_or_path", str(model),
                        "--output_folder", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == f"error: pairs file '{broken}': not valid JSON (line 1, column 3: " \
                            "Expecting property name enclosed in double quotes)\n"
    assert not out.exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(script: str, *args: str, timeout: int = 300):
    """``accelerate launch`` with two CPU worker processes (torchrun underneath); ACCELERATE_USE_CPU
    keeps both on the CPU where a GPU is present (with one GPU, the second would ask for cuda:1)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error", ACCELERATE_USE_CPU="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(ROOT / script), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_processes_generate_and_score_each_image_once(tiny_setup, tmp_path):
    import csv

    from klora.metrics import build_tiny_clip, build_tiny_dino

    model, pairs = tiny_setup
    out = tmp_path / "results"
    result = accelerate_launch("evaluate_grid.py", *_grid_args(model, pairs, out, "--methods", "merge",
                                                                "--seeds", "0", "1", "--no_grids"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    written = re.findall(r"^wrote (.+\.png)$", result.stdout, flags=re.M)
    expected = {str(out / "images" / p / m / f"seed{s}.png")
                for p in ("dog__water", "dog__ink") for m in ("merge",) for s in (0, 1)}
    assert sorted(written) == sorted(expected), result.stdout  # each image written exactly once, none lost
    assert {str(p) for p in (out / "images").rglob("*.png")} == expected
    # both processes worked, each on half of the images
    shares = sorted(re.findall(r"^process (\d): generated (\d+) images$", result.stdout, flags=re.M))
    assert shares == [("0", "2"), ("1", "2")]

    clip, dino = build_tiny_clip(tmp_path / "clip"), build_tiny_dino(tmp_path / "dino")
    result = accelerate_launch("evaluate_metrics.py", "--results", str(out), "--clip_model", clip,
                               "--dino_model", dino, "--device", "cpu", "--batch_size", "3")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    with open(out / "metrics_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(expected)  # every image scored once
    shares = sorted(re.findall(r"^process (\d): scored (\d+) images$", result.stdout, flags=re.M))
    assert shares == [("0", "2"), ("1", "2")]
