"""klora.metrics and evaluate_metrics.py: the math, the embedders, the reports."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script
from klora import metrics as M

RED, GREEN, BLUE, GREY = (220, 30, 30), (30, 200, 60), (30, 60, 220), (128, 128, 128)


def _np_cosine_percent(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return 100.0 * float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))


# --- the math -------------------------------------------------------------------

def test_cosine_percent_known_values():
    e = torch.eye(3)
    got = M.cosine_percent(e, e)
    assert torch.allclose(got, 100 * torch.eye(3, dtype=torch.float64))  # identical 100, orthogonal 0
    assert M.cosine_percent(torch.tensor([[2.0, 0.0]]), torch.tensor([[-0.5, 0.0]])).item() == pytest.approx(-100)
    assert M.cosine_percent(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 3.0]])).item() == pytest.approx(100 / math.sqrt(2))


def test_cosine_percent_against_numpy():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 7, generator=gen), torch.randn(3, 7, generator=gen)
    got = M.cosine_percent(a, b)
    assert got.shape == (4, 3)
    for i in range(4):
        for j in range(3):
            assert got[i, j].item() == pytest.approx(_np_cosine_percent(a[i], b[j]), abs=1e-9)


def test_mean_similarity_is_the_mean_over_references():
    images = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    refs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    got = M.mean_similarity(images, refs)
    expected = [np.mean([_np_cosine_percent(x, r) for r in refs.numpy()]) for x in images.numpy()]
    assert got.tolist() == pytest.approx(expected)
    assert got.tolist() == pytest.approx([0.0, 100 / math.sqrt(2) / 3])


class FakeModel:
    """Maps an image to a fixed vector by its colour; counts the images it embeds."""

    def __init__(self, table: dict, texts: dict | None = None):
        self.table, self.text_table, self.embedded, self.text_calls = table, texts or {}, 0, 0

    def images(self, images):
        self.embedded += len(images)
        return torch.tensor([self.table[im.getpixel((0, 0))] for im in images], dtype=torch.float32)

    def texts(self, texts):
        self.text_calls += len(texts)
        return torch.tensor([self.text_table[t] for t in texts], dtype=torch.float32)


def _png(path: Path, colour, size: int = 16) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return str(path)


def test_score_with_known_embeddings(tmp_path):
    # CLIP space: red = e1, green = e2, blue = (e1 + e2) / sqrt 2, grey = -e1; DINO space: its own vectors
    clip = FakeModel({RED: [1, 0, 0], GREEN: [0, 1, 0], BLUE: [1, 1, 0], GREY: [-1, 0, 0]},
                     texts={"a dog": [1, 0, 0], "a cat": [0, 0, 1]})
    dino = FakeModel({RED: [0, 1], GREEN: [0, 1], BLUE: [1, 0], GREY: [1, 1]})
    subject = (_png(tmp_path / "s1.png", GREEN), _png(tmp_path / "s2.png", BLUE))
    style = (_png(tmp_path / "style.png", RED),)
    items = [M.ImageToScore("dog__red", "merge", "seed0", _png(tmp_path / "o1.png", RED), subject, style, "a dog"),
             M.ImageToScore("dog__red", "merge", "seed1", _png(tmp_path / "o2.png", GREY), subject, style, "a cat"),
             M.ImageToScore("dog__red", "merge", "seed2", str(tmp_path / "unreadable.png"), subject, style, "a dog")]
    (tmp_path / "unreadable.png").write_text("no")
    rows, unreadable = M.score(items, clip, dino, batch_size=2)
    assert unreadable == [str(tmp_path / "unreadable.png")]
    first, second = rows
    assert first["style_sim"] == pytest.approx(100.0)  # identical embedding
    assert first["clip_score"] == pytest.approx((0.0 + 100 / math.sqrt(2)) / 2)  # orthogonal 0, 45 degrees 70.7
    assert first["dino_score"] == pytest.approx((100.0 + 0.0) / 2)
    assert first["clip_text"] == pytest.approx(100.0)
    assert second["style_sim"] == pytest.approx(-100.0)
    assert second["clip_score"] == pytest.approx((0.0 - 100 / math.sqrt(2)) / 2)
    assert second["dino_score"] == pytest.approx((100 / math.sqrt(2) + 100 / math.sqrt(2)) / 2)
    assert second["clip_text"] == pytest.approx(0.0)
    assert (first["pair"], first["method"], first["image"]) == ("dog__red", "merge", "seed0")
    # references are embedded once, not once per image: 2 outputs + 2 subject + 1 style images
    assert clip.embedded == 5 and dino.embedded == 4 and clip.text_calls == 2


def test_summarize_means_over_images_then_over_pairs():
    rows = [{"pair": "a", "method": "m", **{k: v for k in M.METRICS}} for v in (10.0, 20.0)]
    rows += [{"pair": "b", "method": "m", **{k: 60.0 for k in M.METRICS}}]
    rows += [{"pair": "a", "method": "n", **{k: 1.0 for k in M.METRICS}}]
    per_pair, per_method = M.summarize(rows)
    by = {(p["method"], p["pair"]): p for p in per_pair}
    assert by[("m", "a")]["style_sim"] == pytest.approx(15.0) and by[("m", "a")]["images"] == 2
    assert by[("m", "b")]["dino_score"] == pytest.approx(60.0)
    m = next(x for x in per_method if x["method"] == "m")
    assert m["clip_score"] == pytest.approx(37.5)  # (15 + 60) / 2: every pair counts the same, not 30
    assert (m["pairs"], m["images"]) == (2, 3)


# --- real (tiny) models -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evalmodels")
    M.quiet_loading()
    return M.build_tiny_clip(folder / "clip"), M.build_tiny_dino(folder / "dino")


def _manual_pixels(image: Image.Image, mean, std) -> torch.Tensor:
    """A 32x32 RGB image as the models expect it, computed by hand."""
    x = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    x = (x - np.array(mean)) / np.array(std)
    return torch.tensor(x.transpose(2, 0, 1)[None], dtype=torch.float32)


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_clip_embedder_matches_a_direct_computation(tiny_models):
    from transformers import CLIPModel

    clip_dir, _ = tiny_models
    embedder = M.ClipEmbedder(clip_dir, "cpu")
    gen = np.random.default_rng(0)
    images = [Image.fromarray(gen.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    model = CLIPModel.from_pretrained(clip_dir).eval()
    openai_mean, openai_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    with torch.no_grad():
        direct = torch.cat([_features(model.get_image_features(pixel_values=_manual_pixels(im, openai_mean, openai_std)))
                            for im in images])
        tokens = embedder.tokenizer(["a dog in sks style"], return_tensors="pt")
        direct_text = _features(model.get_text_features(**tokens))
    got = embedder.images(images)
    assert got.shape == (3, 16)
    assert torch.allclose(got, direct, atol=1e-4)
    assert torch.allclose(embedder.texts(["a dog in sks style"]), direct_text, atol=1e-4)


def test_dino_embedder_is_the_cls_token_of_the_last_layer(tiny_models):
    from transformers import ViTModel

    _, dino_dir = tiny_models
    embedder = M.DinoEmbedder(dino_dir, "cpu")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    model = ViTModel.from_pretrained(dino_dir).eval()
    pixels = _manual_pixels(image, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        direct = model.layernorm(hidden)[:, 0]
    assert torch.allclose(embedder.images([image]), direct, atol=1e-4)


def test_identical_images_score_100_with_real_models(tiny_models, tmp_path):
    clip_dir, dino_dir = tiny_models
    clip, dino = M.ClipEmbedder(clip_dir, "cpu"), M.DinoEmbedder(dino_dir, "cpu")
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    picture.save(tmp_path / "x.png")
    other = _png(tmp_path / "other.png", GREEN, 40)
    item = M.ImageToScore("p", "m", "seed0", str(tmp_path / "x.png"), subject_images=(str(tmp_path / "x.png"), other),
                          style_images=(str(tmp_path / "x.png"),), prompt="a dog")
    (row,), _ = M.score([item], clip, dino)
    assert row["style_sim"] == pytest.approx(100.0, abs=1e-3)
    vectors = clip.images([picture, Image.open(other)])
    assert row["clip_score"] == pytest.approx((100.0 + _np_cosine_percent(vectors[0], vectors[1])) / 2, abs=1e-3)


# --- reports --------------------------------------------------------------------

def _per_method(values: dict) -> list[dict]:
    return [{"method": m, "pairs": 2, "images": 4, **dict(zip(M.METRICS, v))} for m, v in values.items()]


def _markdown_table(text: str, first_cell: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell}"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    return table


def test_markdown_has_the_layout_of_table_1():
    per_method = _per_method({"merge": (48.94, 66.6, 43.0, 20.0), "klora-sstar": (58.7, 69.44, 46.9, 25.55)})
    per_pair = [{"method": "merge", "pair": "dog__ink", "images": 2, **dict(zip(M.METRICS, (1.0, 2.0, 3.0, 4.0)))}]
    text = M.markdown_report(per_pair, per_method, ["merge", "klora-sstar"],
                             {"merge": "Direct merge", "klora-sstar": "K-LoRA (s*)"}, "T", ["note"])
    table = _markdown_table(text, "|")
    assert table[0] == ["", "Direct merge", "K-LoRA (s*)"]  # methods are the columns
    assert [row[0] for row in table[2:6]] == ["Style Sim ↑", "CLIP score ↑", "DINO score ↑", "CLIP text-image ↑"]
    assert table[2][1:] == ["48.9", "58.7"] and table[3][1:] == ["66.6", "69.4"] and table[5][1:] == ["20.0", "25.6"]
    paper = _markdown_table(text.split("The paper's Table 1")[1], "|")
    assert paper[0][1:] == list(M.PAPER_TABLE_1) and paper[2][1:] == ["48.9", "68.2", "58.0", "60.4", "58.7"]
    assert "| dog__ink | Direct merge | 2 | 1.0 | 2.0 | 3.0 | 4.0 |" in text


def test_csv_round_trips():
    rows = [{"pair": "a", "method": "m", "images": 2, "style_sim": 1 / 3, "clip_score": 2.0, "dino_score": -1.5,
             "clip_text": 0.0}]
    parsed = list(csv.DictReader(io.StringIO(M.csv_text(rows, ["method", "pair", "images", *M.METRICS]))))
    assert parsed == [{"method": "m", "pair": "a", "images": "2", "style_sim": "0.3333", "clip_score": "2.0000",
                       "dino_score": "-1.5000", "clip_text": "0.0000"}]


def _bar_heights(chart: Image.Image, colour, plot_right: int) -> list[int]:
    """Heights of the runs of ``colour`` pixels at least 10 px wide (bars, not text), left to right."""
    pixels = np.asarray(chart)[:, :plot_right]
    mask = (pixels == np.array(colour)).all(axis=2)
    columns = mask.any(axis=0)
    heights, x = [], 0
    while x < mask.shape[1]:
        if columns[x]:
            start = x
            while x < mask.shape[1] and columns[x]:
                x += 1
            if x - start >= 10:
                heights.append(int(mask[:, (start + x) // 2].sum()))
        x += 1
    return heights


def test_bar_chart_heights_follow_the_values():
    layout = M.ChartLayout()
    values = {"merge": (80.0, 40.0, 20.0, 60.0), "klora-sstar": (50.0, 100.0, 10.0, -20.0)}
    chart = M.bar_chart(_per_method(values), list(values), {}, layout=layout)
    plot_right = chart.width - layout.legend_width
    # axis from -20 to 100: 120 units over plot_height pixels
    unit = layout.plot_height / 120
    for i, method in enumerate(values):
        heights = _bar_heights(chart, M.PALETTE[i], plot_right)
        assert len(heights) == 4, method
        for h, v in zip(heights, values[method]):
            assert abs(h - abs(v) * unit) <= 1.5, (method, h, v)
    # the legend shows each method's colour
    legend = np.asarray(chart)[:, plot_right:]
    for i in range(2):
        assert (legend == np.array(M.PALETTE[i])).all(axis=2).sum() >= 100


# --- the command ----------------------------------------------------------------

def _results_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A results folder laid out like evaluate_grid.py's, with a foreign method, and its pairs file."""
    refs = tmp_path / "refs"
    subject = [_png(refs / "dog1.png", GREEN, 40), _png(refs / "dog2.png", BLUE, 40)]
    _png(refs / "red.png", RED, 40)
    (tmp_path / "lora.safetensors").write_bytes(b"")
    pairs = {"contents": [{"name": "dog", "lora": "lora.safetensors", "images": ["refs/dog1.png", "refs/dog2.png"]}],
             "styles": [{"name": "red", "lora": "lora.safetensors", "images": ["refs/red.png"]}]}
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    results = tmp_path / "results"
    for method, seeds in (("merge", 2), ("klora-sstar", 2), ("ziplora", 1)):
        for s in range(seeds):
            _png(results / "images" / "dog__red" / method / f"seed{s}.png", RED if s == 0 else GREY, 40)
    Image.open(subject[0]).save(results / "images" / "dog__red" / "ziplora" / "seed0.png")
    _png(results / "images" / "cat__red" / "merge" / "seed0.png", RED, 40)  # not a pair of the file
    return results, tmp_path / "pairs.json"


@pytest.mark.slow
def test_evaluate_metrics_end_to_end(tiny_models, tmp_path, capsys):
    import evaluate_metrics

    clip_dir, dino_dir = tiny_models
    results, pairs = _results_folder(tmp_path)
    evaluate_metrics.main(["--results", str(results), "--pairs", str(pairs), "--clip_model", clip_dir,
                           "--dino_model", dino_dir, "--device", "cpu"])
    captured = capsys.readouterr()
    assert "skipping 1 image folder(s) that the pairs do not name: cat__red" in captured.err
    with open(results / "metrics_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["image"]) for r in rows] == [("klora-sstar", "seed0"), ("klora-sstar", "seed1"),
                                                         ("merge", "seed0"), ("merge", "seed1"), ("ziplora", "seed0")]
    red = [r for r in rows if r["image"] == "seed0" and r["method"] != "ziplora"]
    assert all(float(r["style_sim"]) == pytest.approx(100.0, abs=0.01) for r in red)  # the style image itself
    zip_row = rows[-1]
    clip, dino = M.ClipEmbedder(clip_dir), M.DinoEmbedder(dino_dir)
    refs = [Image.open(tmp_path / "refs" / n) for n in ("dog1.png", "dog2.png")]
    out = Image.open(results / "images" / "dog__red" / "ziplora" / "seed0.png")
    expected = np.mean([_np_cosine_percent(clip.images([out])[0], clip.images([r])[0]) for r in refs])
    assert float(zip_row["clip_score"]) == pytest.approx(expected, abs=1e-3)
    expected = np.mean([_np_cosine_percent(dino.images([out])[0], dino.images([r])[0]) for r in refs])
    assert float(zip_row["dino_score"]) == pytest.approx(expected, abs=1e-3)
    text_vector = clip.texts(["dog in red style"])[0]
    assert float(zip_row["clip_text"]) == pytest.approx(_np_cosine_percent(clip.images([out])[0], text_vector), abs=1e-3)

    with open(results / "metrics.csv") as f:
        summary = list(csv.DictReader(f))
    merge_all = next(r for r in summary if r["method"] == "merge" and r["pair"] == "all")
    merge_rows = [r for r in rows if r["method"] == "merge"]
    assert float(merge_all["dino_score"]) == pytest.approx(np.mean([float(r["dino_score"]) for r in merge_rows]), abs=1e-3)
    assert merge_all["images"] == "2"
    table = (results / "metrics.md").read_text()
    assert "| | Direct merge | ziplora | K-LoRA (s*) |" in table  # baselines, other methods, then K-LoRA
    chart = Image.open(results / "metrics.png")
    assert chart.size[0] > 300 and chart.format == "PNG"


def test_evaluate_metrics_mistakes(tiny_models, tmp_path):
    from klora import cli

    import evaluate_metrics

    clip_dir, dino_dir = tiny_models
    results, pairs = _results_folder(tmp_path)
    models = ["--clip_model", clip_dir, "--dino_model", dino_dir, "--device", "cpu"]
    data = json.loads(pairs.read_text())
    del data["styles"][0]["images"]
    (tmp_path / "no_style_refs.json").write_text(json.dumps(data))
    cases = [
        (["--results", str(tmp_path / "absent")], "no such folder"),
        (["--results", str(results)], "no run.json; pass the pairs file with --pairs"),
        (["--results", str(results), "--pairs", str(tmp_path / "no_style_refs.json")],
         "style 'red' has no reference images"),
        (["--results", str(results), "--pairs", str(pairs), "--methods", "b-lora"], "no images for b-lora"),
        (["--results", str(tmp_path / "refs"), "--pairs", str(pairs)], "no images under"),
    ]
    for argv, message in cases:
        with pytest.raises(cli.KLoRAError, match=message):
            evaluate_metrics.main(argv + models)
    with pytest.raises(cli.KLoRAError, match="--clip_model '.*nothing': could not load"):
        evaluate_metrics.main(["--results", str(results), "--pairs", str(pairs), "--clip_model",
                               str(tmp_path / "nothing"), "--dino_model", dino_dir, "--device", "cpu"])
    assert not list(results.glob("metrics*"))  # no partial reports
    result = run_script("evaluate_metrics.py", "--results", str(results), *models)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == f"error: --results '{results}': no run.json; pass the pairs file with --pairs\n"
