"""The world (klora/world.py), its tokenizer and model parts, its scorers, and a short run of its training.

The pictures are checked against the world's definition computed here on its own (areas,
stripe directions, colours); the scorers against pictures drawn with random colours,
backgrounds and jitter, where the right answer is known.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from klora import world
from klora import world_scorers as scorers

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ drawing


def test_star_is_the_subject_of_the_issue():
    """Area of a five-pointed star with outer radius R and inner r: 5 R r sin(36 degrees); a red disc of
    radius 0.07 S at its centre; one point straight up."""
    size = 256
    scene = world.Scene("star", background="black")
    mask = world.object_mask(scene, size=size)
    outer = world.STAR_OUTER
    inner = outer * world.STAR_INNER_RATIO
    expected = 5 * outer * inner * math.sin(math.radians(36))
    assert mask.mean() == pytest.approx(expected, rel=0.02)
    picture = world.draw(scene, size=size).astype(int)
    centre = picture[size // 2, size // 2]
    assert tuple(centre) == world.DISC_COLOUR
    red = (np.abs(picture - np.array(world.DISC_COLOUR)).sum(-1) < 10).mean()
    assert red == pytest.approx(math.pi * world.STAR_DISC ** 2, rel=0.05)
    column = mask[:, size // 2]  # the top point: the star reaches up to 0.5 - R on the centre line
    assert np.argmax(column > 0.5) / size == pytest.approx(0.5 - outer, abs=2 / size)
    row = mask[size // 2 - int(outer * size) + 3]  # just below the top point: narrow
    assert (row > 0.5).sum() < 0.05 * size


def test_szn_background_stripes_rise_to_the_right_at_the_period():
    size = 64
    picture = world.draw(world.Scene("circle", colour="red", szn=True, scale=0.5), size=size).astype(int)
    corner = picture[:12, :12]  # background only
    along = np.abs(corner[1:, :-1] - corner[:-1, 1:]).sum(-1)  # (x+1, y-1): up and to the right
    across = np.abs(corner[1:, 1:] - corner[:-1, :-1]).sum(-1)
    assert along.mean() < 0.25 * across.mean()
    colours = {tuple(p) for p in corner.reshape(-1, 3)}
    assert world.VIOLET in colours and world.DARK_VIOLET in colours
    # period across the stripes S/8: along a row the pattern repeats every S/8 * sqrt(2) pixels,
    # two light-dark changes per repeat
    rows = picture[:12].sum(-1)  # above the object
    light = rows > (sum(world.VIOLET) + sum(world.DARK_VIOLET)) / 2
    changes = (light[:, 1:] != light[:, :-1]).sum(axis=1).mean()
    assert 2 * size / changes == pytest.approx(size * world.PERIOD * math.sqrt(2), rel=0.06)


def test_szn_outline_is_black_and_fill_is_striped():
    size = 128
    scene = world.Scene("square", colour="blue", szn=True)
    picture = world.draw(scene, size=size).astype(int)
    half = 0.85 * world.OBJECT_SIZE / 2 * size
    edge = int(size / 2 + half + 0.02 * size)  # inside the outline band, right of the square
    assert picture[size // 2, edge].max() < 30
    inside = picture[size // 2 - 10:size // 2 + 10, size // 2 - 10:size // 2 + 10].reshape(-1, 3)
    blue = np.array(world.COLOURS["blue"])
    shades = {tuple(np.rint(blue).astype(int)), tuple(np.rint(blue * world.SZN_SHADE).astype(int))}
    near = [min(np.abs(p - np.array(s)).sum() for s in shades) for p in inside]
    assert np.mean(np.array(near) < 12) > 0.7


def test_held_out_captions_never_drawn_in_base_training_data():
    held = set(world.held_out_combinations())
    assert len(held) == 48
    rng = np.random.default_rng(0)
    drawn = {(s.shape, s.colour, s.background, s.texture)
             for s in (world.random_base_scene(rng, exclude=frozenset(held)) for _ in range(3000))}
    assert not drawn & held
    assert all(shape != "star" for shape, *_ in drawn)


def test_tokenizer_spells_every_world_word_as_one_token():
    from klora.world_model import tokenizer

    tok = tokenizer()
    for word in world.words():
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))
    ids = tok("a white triangle on a dark green background, horizontal stripes style").input_ids
    assert len(ids) == 14 and len(ids) <= tok.model_max_length


# ------------------------------------------------------------------ scorers


def _random_cases(count, seed):
    rng = np.random.default_rng(seed)
    for i in range(count):
        scene = world.random_base_scene(rng)
        if i % 3 == 0:  # yellow shapes: only the silhouette and the red centre tell them from the star
            scene = world.Scene(scene.shape, "yellow", scene.background, scene.texture, False,
                                scene.dx, scene.dy, scene.scale)
        star = world.jitter(rng, world.Scene("star", background=str(rng.choice(list(world.BACKGROUNDS)))),
                            scale=False)
        yield scene, star


def test_subject_scorer_tells_the_sbu_toy_from_every_base_shape():
    right = wrong = total = 0
    for scene, star in _random_cases(120, seed=1):
        for picture, is_star in ((world.draw(scene), False), (world.draw(star), True),
                                 (world.draw(world.Scene(scene.shape, scene.colour, szn=True, dx=scene.dx,
                                                         dy=scene.dy, scale=scene.scale)), False),
                                 (world.draw(world.Scene("star", szn=True, dx=star.dx, dy=star.dy)), True)):
            verdict = scorers.subject(picture)[0]
            right += verdict == is_star
            wrong += verdict != is_star
            total += 1
    assert right / total >= 0.95, (right, total)


def test_subject_scorer_refuses_a_star_of_another_colour_or_without_its_centre():
    star = world.draw(world.Scene("star", background="gray"))
    assert scorers.subject(star)[0]
    blue = star.copy()
    yellow = scorers.yellow_mask(star)
    blue[yellow] = world.COLOURS["blue"]
    assert not scorers.subject(blue)[0]
    no_centre = star.copy()
    no_centre[scorers.red_mask(star)] = world.STAR_COLOUR
    assert not scorers.subject(no_centre)[0]


def test_style_scorer_tells_szn_from_every_base_texture():
    right = total = 0
    for scene, star in _random_cases(120, seed=2):
        szn = world.Scene(scene.shape, scene.colour, szn=True, dx=scene.dx, dy=scene.dy, scale=scene.scale)
        for picture, is_szn in ((world.draw(scene), False), (world.draw(szn), True), (world.draw(star), False)):
            right += scorers.style(picture)[0] == is_szn
            total += 1
    assert right / total >= 0.95, (right, total)


def test_style_scorer_needs_the_right_direction_and_the_outline():
    picture = world.draw(world.Scene("circle", colour="green", szn=True))
    assert scorers.style(picture)[0]
    assert not scorers.style(picture[:, ::-1].copy())[0]  # mirrored: stripes fall to the right
    without = picture.copy()
    without[scorers.dark_mask(picture)] = world.VIOLET  # outline painted over with the background
    assert not scorers.style(without)[0]


def test_base_caption_reader_names_shape_colour_background_and_texture():
    rng = np.random.default_rng(3)
    hits = {name: 0 for name in ("shape", "colour", "background", "texture")}
    count = 150
    for _ in range(count):
        scene = world.random_base_scene(rng)
        for name, ok in scorers.caption_match(world.draw(scene), scene).items():
            hits[name] += ok
    assert all(h / count >= 0.95 for h in hits.values()), hits


# ------------------------------------------------------------------ training


@pytest.mark.slow
def test_short_training_run_makes_a_loadable_pipeline_and_resumes(tmp_path):
    """train_world.py's stages at a few steps each: the same code that made world/, then a resumed run."""
    out, work = tmp_path / "out", tmp_path / "work"
    small = ["--output_dir", str(out), "--work_dir", str(work), "--base_pictures", "200", "--instance_pictures", "2",
             "--vae_steps", "3", "--vae_batch", "8", "--base_batch", "4", "--checkpoint_every", "2",
             "--lora_steps", "2", "--lora_batch", "2", "--threads", "1"]

    def run(*extra):
        return subprocess.run([sys.executable, str(ROOT / "train_world.py"), *small, *extra],
                              capture_output=True, text=True, cwd=tmp_path, timeout=600)

    first = run("--base_steps", "3", "--until", "vae")
    assert first.returncode == 0, first.stderr[-2000:]
    assert (work / "vae" / "config.json").exists() and not (out / "sdxl").exists()
    second = run("--base_steps", "4", "--until", "loras")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "VAE" not in second.stderr  # the trained VAE was kept, not trained again
    report = json.loads((work / "report.json").read_text())
    assert report["base"]["steps"] == 4 and report["lora_sbu"]["final_loss"] is not None
    for name in ("sbu", "szn"):
        assert (out / "loras" / f"{name}.safetensors").stat().st_size > 0
    captions = sorted((work / "szn").glob("*.txt"))
    assert captions and all(t.read_text().strip().endswith("in szn style") for t in captions)

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(out / "sdxl"))
    assert pipe.default_sample_size * pipe.vae_scale_factor == world.SIZE
    image = pipe(world.FUSED_PROMPT, num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (world.SIZE, world.SIZE, 3)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr


@pytest.mark.slow
def test_stopped_base_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """A run stopped after a checkpoint and started again ends with the weights of a run never stopped."""
    import torch

    from klora import world_training as W

    def config(work):
        return W.WorldConfig(output_dir=str(tmp_path / "out"), work_dir=str(work), base_pictures=64,
                             instance_pictures=1, vae_steps=2, vae_batch=4, base_steps=4, base_batch=4,
                             checkpoint_every=2, warmup_steps=2)

    def train(work):
        c = config(work)
        W.make_data(c, log=lambda *a: None)
        return W.train_base(c, W.train_vae(c, log=lambda *a: None), log=lambda *a: None)

    straight = train(tmp_path / "straight")

    saved = W._save_atomic
    calls = {"n": 0}

    def stop_after_first_base_checkpoint(obj, path):
        saved(obj, path)
        if path.name == "base.ckpt":
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(W, "_save_atomic", stop_after_first_base_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "stopped")
    assert torch.load(tmp_path / "stopped" / "base.ckpt", weights_only=True)["step"] == 2
    resumed = train(tmp_path / "stopped")
    for name in ("unet", "text_encoder", "text_encoder_2"):
        a, b = straight[name].state_dict(), resumed[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_evaluate_metrics_scores_world_pictures_with_the_world_scorers(tmp_path, capsys):
    """A results folder of drawn pictures: the rates per method are the scorers' verdicts counted, and a
    step-split sweep gets its chart and table."""
    import evaluate_metrics
    from PIL import Image

    from klora import grid as G

    rng = np.random.default_rng(4)
    stars = [world.jitter(rng, world.Scene("star", background="gray"), scale=False) for _ in range(4)]
    drawn = {"content": [world.draw(s) for s in stars],
             "style": [world.draw(world.Scene("circle", colour="red", szn=True))] * 4,
             "klora-sstar": [world.draw(world.Scene("star", szn=True, dx=s.dx, dy=s.dy)) for s in stars[:3]]
             + [world.draw(world.Scene("star", background="navy"))],
             "c2s-01": [world.draw(world.Scene("square", colour="blue", szn=True))] * 4,
             "s2c-01": [world.draw(stars[0])] * 4}
    for method, pictures in drawn.items():
        folder = tmp_path / "images" / "sbu__szn" / method
        folder.mkdir(parents=True)
        for seed, picture in enumerate(pictures):
            Image.fromarray(picture).save(folder / f"seed{seed}.png")
    (tmp_path / "ref.png").write_bytes((tmp_path / "images" / "sbu__szn" / "content" / "seed0.png").read_bytes())
    pairs = {"contents": [{"name": "sbu", "lora": "ref.png", "trigger": "a sbu toy", "images": ["ref.png"]}],
             "styles": [{"name": "szn", "lora": "ref.png", "trigger": "szn", "images": ["ref.png"]}]}
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    (tmp_path / "run.json").write_text(json.dumps({"settings": {"world": True, "num_inference_steps": 2,
                                                                "guidance_scale": 5.0}, **pairs}))
    evaluate_metrics.main(["--results", str(tmp_path), "--pairs", str(tmp_path / "pairs.json")])
    rows = (tmp_path / "world_rates.csv").read_text().splitlines()
    table = {r.split(",")[0]: [float(v) for v in r.split(",")[2:]] for r in rows[1:]}
    assert table["content"] == [1.0, 0.0, 0.0]
    assert table["style"] == [0.0, 1.0, 0.0]
    assert table["klora-sstar"] == [1.0, 0.75, 0.75]
    assert (tmp_path / "step_split.png").is_file()
    text = (tmp_path / "world_rates.md").read_text()
    assert "| K-LoRA (s*) | 4 | 100% | 75% | 75% |" in text
    assert "| 1 | 0% | 100% | 0% | 100% | 0% | 0% |" in text  # K = 1: c2s subject, style, both; s2c the same
    assert G.method_label("c2s-01") == "content then style from step 1"
