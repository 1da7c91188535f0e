"""The gradio page over HTTP: what the page returns equals a direct library call.

The app is built in-process on tiny models (``klora.app``), launched on
127.0.0.1 and called with ``gradio_client`` like any API user: the tiny SDXL
for everything the page does, then a tiny Qwen-Image (true CFG, negative
prompt) and a tiny Wan 2.2 (two experts, an MP4 clip). Every image, clip,
selection map and selection log is compared with ``KLoRA`` attached afresh to a
separately loaded pipeline with the same settings and seed.
``tests/test_browser.py`` runs the real ``inference_gradio.py`` script.
"""

import json
import math
import re
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image

PROMPT = "a sbu dog in szn style"
# (method, pattern, alpha, beta, steps, guidance, seed, width, height, negative prompt)
SETTINGS = [
    ("klora", "s*", 1.5, None, 3, 5.0, 3, 64, 64, ""),
    ("klora", "s", 1.2, 0.3, 3, 5.0, 3, 64, 64, ""),
    ("merge", "s*", 1.5, None, 2, 5.0, 3, 64, 64, ""),
    ("content", "s*", 1.5, None, 2, 5.0, 3, 64, 64, ""),
    ("style", "s*", 1.5, None, 2, 5.0, 3, 64, 64, ""),
    ("klora", "s*", 2.0, 1.0, 2, 3.0, 11, 48, 32, "blurry"),
    # The other fusion rules, at the page's default knobs (NP-LoRA's mu 0.5, LoRA Switch every 5 steps).
    ("est", "s", 1.2, 0.3, 3, 5.0, 3, 64, 64, ""),
    ("switch", "s*", 1.5, None, 3, 5.0, 3, 64, 64, ""),
    ("np", "s*", 1.5, None, 2, 5.0, 3, 64, 64, ""),
]
# Every field of the /generate endpoint (the same for every family; fields a pipeline does not take are ignored).
FIELDS = dict(prompt=PROMPT, negative_prompt="", method="klora", pattern="s*", alpha=1.5, beta=None, steps=3,
              guidance=5.0, true_cfg=1.0, seed=3, random_seed=False, width=64, height=64, num_frames=1, fps=16,
              np_mu=0.5, hard_projection=False, switch_every=5, beta_from_dino=False)


class Reply(NamedTuple):
    image: str | None
    video: str | None
    selection_map: str | None
    selection_log: str | None
    seed: int
    summary: str


def pixels(image_or_path) -> np.ndarray:
    image = Image.open(image_or_path) if isinstance(image_or_path, str) else image_or_path
    return np.asarray(image.convert("RGB"))


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def named(log: dict) -> dict:
    """The library's selection ``log`` (its labels carry the paths it was given) as the page writes it: every
    LoRA named by its file name only."""
    def name_only(label):
        return re.sub(r"'[^']*/([^'/]+)'", r"'\1'", label)

    out = dict(log)
    for role in ("content", "style", "content_2", "style_2"):
        if role in out:
            out[role] = name_only(out[role])
    if "extra_loras" in out:
        out["extra_loras"] = [{**entry, "file": name_only(entry["file"])} for entry in out["extra_loras"]]
    return out


def raw_call(url: str, api: str, data=None, body: str | None = None) -> tuple[str, object]:
    """``/gradio_api/call/<api>`` over plain HTTP, no gradio_client: (event, data) of the last message, e.g.
    ("complete", [outputs]) or ("error", {"error": message}). ``body`` replaces the JSON of ``{"data": data}``."""
    import httpx

    base = url.rstrip("/")
    posted = httpx.post(f"{base}/gradio_api/call/{api}", timeout=30, headers={"content-type": "application/json"},
                        content=json.dumps({"data": data}) if body is None else body)
    posted.raise_for_status()
    stream = httpx.get(f"{base}/gradio_api/call/{api}/{posted.json()['event_id']}", timeout=120).text
    event = payload = None
    for line in stream.splitlines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            payload = json.loads(line.removeprefix("data: "))
    return event, payload


def decoded(mp4) -> np.ndarray:
    """Every frame of an MP4, decoded with imageio's own ffmpeg: (frames, height, width, 3) uint8."""
    import imageio

    with imageio.get_reader(mp4, format="FFMPEG") as reader:
        return np.stack([frame for frame in reader])  # list(reader) asks len(): inf for a stream


# --- the app and an independent reference ---------------------------------------


@pytest.fixture(scope="module")
def app(tiny_sdxl_dir, demo_sdxl_loras):
    from gradio_client import Client

    from klora.app import Defaults, Limits, Studio, build_app, serve
    from klora.pipelines import load_pipeline

    content, style = demo_sdxl_loras
    studio = Studio(load_pipeline(tiny_sdxl_dir, "unet", "cpu"), content, style,
                    limits=Limits(max_steps=3000, max_side=256, max_prompt_chars=200),
                    defaults=Defaults(prompt=PROMPT, steps=3, height=64, width=64))
    demo = build_app(studio)
    serve(demo, studio.limits, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, studio, Client(demo.local_url, verbose=False)
    finally:
        demo.close()
        studio.close()


@pytest.fixture(scope="module")
def reference(tiny_sdxl_dir):
    """``reference(content, style, *settings, **KLoRA options) -> (image, selection map or None, selection log or
    None)`` by the library alone; a map and a log for the per-step methods."""
    from klora import selection_map
    from klora.fusion import KLoRA
    from klora.methods import PER_STEP
    from klora.pipelines import load_pipeline

    pipe = load_pipeline(tiny_sdxl_dir, "unet", "cpu")

    def run(content, style, method, pattern, alpha, beta, steps, guidance, seed, width, height, negative,
            **options):
        klora = KLoRA(pipe, content, style, pattern=pattern, alpha=alpha, beta=beta, method=method, **options)
        try:
            kwargs = {"negative_prompt": negative} if negative else {}
            image = pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=height,
                         width=width, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images[0]
            if method not in PER_STEP:
                return image, None, None
            log = klora.selection_log()
            return image, selection_map.render(log), log
        finally:
            klora.detach()

    return run


def call(client, **change) -> Reply:
    """One /generate request: ``FIELDS`` with ``change`` applied."""
    return Reply(*client.predict(**{**FIELDS, **change}, api_name="/generate"))


def call_with(client, settings) -> Reply:
    method, pattern, alpha, beta, steps, guidance, seed, width, height, negative = settings
    return call(client, method=method, pattern=pattern, alpha=alpha, beta=beta, steps=steps, guidance=guidance,
                seed=seed, width=width, height=height, negative_prompt=negative)


class Counter:
    """Counts calls of a function or method while installed with monkeypatch."""

    def __init__(self, monkeypatch, owner, name):
        self.calls = 0
        original = getattr(owner, name)
        is_classmethod = isinstance(owner.__dict__.get(name), classmethod)
        func = original.__func__ if is_classmethod else original

        def counted(*args, **kwargs):
            self.calls += 1
            return func(*args, **kwargs)

        monkeypatch.setattr(owner, name, classmethod(counted) if is_classmethod else counted)


@pytest.fixture
def loads(monkeypatch):
    """How often models are loaded, LoRA files read, and K-LoRA attached or detached."""
    from diffusers import DiffusionPipeline, ModelMixin

    from klora import fusion, loras

    return {"pipelines": Counter(monkeypatch, DiffusionPipeline, "from_pretrained"),
            "models": Counter(monkeypatch, ModelMixin, "from_pretrained"),
            "lora reads": Counter(monkeypatch, loras, "read"),
            "attach": Counter(monkeypatch, fusion.KLoRA, "__init__"),
            "detach": Counter(monkeypatch, fusion.KLoRA, "detach")}


def counts(loads) -> dict:
    return {name: counter.calls for name, counter in loads.items()}


# --- what the page returns -----------------------------------------------------

@pytest.mark.slow
def test_settings_switch_without_reloading_and_match_the_library(app, reference, demo_sdxl_loras, request):
    _, studio, client = app
    content, style = demo_sdxl_loras
    expected = [reference(content, style, *settings) for settings in SETTINGS]
    loads = request.getfixturevalue("loads")  # counting starts after the reference work
    klora_before, unet_before = studio.klora, studio.pipe.unet

    for settings, (want_image, want_map, want_log) in zip(SETTINGS, expected):
        method, seed, steps = settings[0], settings[6], settings[4]
        reply = call_with(client, settings)
        assert np.array_equal(pixels(reply.image), pixels(want_image)), settings
        assert reply.video is None  # an image family
        if method in ("klora", "est", "switch"):  # the per-step methods
            assert np.array_equal(pixels(reply.selection_map), pixels(want_map)), settings
            # The JSON offered for download is the library's own log of the same run.
            assert read_json(reply.selection_log) == named(want_log), settings
        else:
            # No per-step choices were made: no map and no log, not stale ones.
            assert reply.selection_map is None and reply.selection_log is None
        assert reply.seed == seed
        assert reply.summary.startswith("Generated in ") and f"{steps} of {steps} steps" in reply.summary

    assert counts(loads) == {"pipelines": 0, "models": 0, "lora reads": 0, "attach": 0, "detach": 0}
    assert studio.klora is klora_before and studio.pipe.unet is unet_before
    # The settings really changed between calls (otherwise the images above prove little).
    assert not np.array_equal(pixels(expected[0][0]), pixels(expected[2][0]))
    assert not np.array_equal(pixels(expected[0][1]), pixels(expected[1][1]))
    assert expected[0][2]["generations"] != expected[1][2]["generations"]
    # EST-LoRA chooses otherwise than K-LoRA at the same schedule, and NP-LoRA is not the merge.
    assert expected[6][2]["generations"] != expected[1][2]["generations"]
    assert not np.array_equal(pixels(expected[8][0]), pixels(expected[2][0]))


def test_random_seed_is_reported_and_reproducible(app, reference, demo_sdxl_loras):
    _, _, client = app
    first = call(client, seed=0, random_seed=True)
    second = call(client, seed=0, random_seed=True)
    assert first.seed != second.seed  # two draws from 2**32 seeds
    want, _, _ = reference(*demo_sdxl_loras, "klora", "s*", 1.5, None, 3, 5.0, first.seed, 64, 64, "")
    assert np.array_equal(pixels(first.image), pixels(want))
    assert f"seed {first.seed}" in first.summary


# --- bad inputs: a visible error, and the app keeps serving -----------------------

@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "less than minimum"),
    ({"steps": 3001}, "greater than maximum"),
    ({"width": 60}, "width must be a multiple of 8"),
    ({"height": 512}, "greater than maximum"),
    ({"prompt": "x" * 201}, "at most 200"),
    ({"prompt": "   "}, "type a prompt"),
    ({"negative_prompt": "x" * 201}, "negative prompt is 201 characters"),
    ({"pattern": "t"}, "not in the list of choices"),
    ({"method": "blend"}, "not in the list of choices"),
    ({"alpha": 0}, r"alpha must be in \(0, 10\], got 0"),
    ({"seed": -1}, "seed must be a whole number from 0 to 4294967295, got -1"),
    # What gradio's Number field failed on with no message (its checks compare and round before ours):
    ({"seed": "nan"}, "seed must be a whole number from 0 to 4294967295, got nan"),
    ({"seed": "1e309"}, "seed must be a whole number from 0 to 4294967295, got 1e309"),
    ({"seed": 2.5}, "seed must be a whole number"),
    ({"alpha": "x"}, r"alpha must be in \(0, 10\], got x"),
    ({"beta": "1e309"}, r"beta must be in \[0, 10\], got 1e309"),
    ({"beta": -0.5}, r"beta must be in \[0, 10\], got -0.5"),  # s(p)'s style-side weight: no negative meaning
    ({"method": "est", "beta": -1}, r"beta must be in \[0, 10\], got -1"),
    ({"np_mu": "nan"}, r"NP-LoRA's mu must be a number >= 0, or inf \(the hard projection\), got nan"),
    ({"method": "np", "np_mu": -0.5}, "NP-LoRA's mu must be a number >= 0, or inf"),
    ({"switch_every": 0}, "LoRA Switch's block must be a whole number of steps from 1 to 3000, got 0"),
    ({"method": "switch", "switch_every": 2.5}, "LoRA Switch's block must be a whole number of steps"),
    ({"method": "switch", "switch_every": 3001}, "LoRA Switch's block must be a whole number of steps"),
    ({"method": "est", "beta_from_dino": True}, "beta from DINO needs a DINO model: start the page with "
                                                "--dino_model NAME_OR_FOLDER"),
])
def test_out_of_range_inputs_give_a_visible_error(app, change, message):
    from gradio_client.exceptions import AppError

    _, _, client = app
    with pytest.raises(AppError, match=message) as caught:
        call(client, **change)
    assert "\n" not in str(caught.value.message)


def test_bad_inputs_leave_the_app_serving(app, reference, demo_sdxl_loras):
    from gradio_client.exceptions import AppError

    _, _, client = app
    for change in ({"steps": 0}, {"width": 60}, {"prompt": ""}):
        with pytest.raises(AppError):
            call(client, **change)
    reply = call(client)
    want_image, want_map, _ = reference(*demo_sdxl_loras, *SETTINGS[0])
    assert np.array_equal(pixels(reply.image), pixels(want_image))
    assert np.array_equal(pixels(reply.selection_map), pixels(want_map))


def test_inputs_only_gradio_can_answer_leave_the_page_serving(app, reference, demo_sdxl_loras):
    """Over plain HTTP: a NaN (Python's JSON reads it) reaches the page's checks and gets its message. A string
    in a slider and too few inputs fail inside gradio before the page sees them: gradio answers with an error
    event and no message (docs/gradio.md says so); the page goes on serving."""
    demo, _, _ = app

    def with_value(name, value):
        return [value if field == name else default for field, default in FIELDS.items()]

    assert raw_call(demo.local_url, "generate", with_value("seed", math.nan)) == ("error", {
        "error": "seed must be a whole number from 0 to 4294967295, got nan", "duration": 10, "visible": True,
        "title": "Error"})
    assert raw_call(demo.local_url, "generate", with_value("steps", math.nan))[1]["error"] == (
        "steps must be a whole number from 1 to 3000, got nan")
    assert raw_call(demo.local_url, "generate", with_value("np_mu", math.nan))[1]["error"] == (
        "NP-LoRA's mu must be a number >= 0, or inf (the hard projection), got nan")
    for data in (with_value("steps", "nan"), with_value("width", "1e309"), list(FIELDS.values())[:3]):
        assert raw_call(demo.local_url, "generate", data)[0] == "error"
    event, outputs = raw_call(demo.local_url, "generate", list(FIELDS.values()))
    assert event == "complete"
    assert np.array_equal(pixels(outputs[0]["path"]), pixels(reference(*demo_sdxl_loras, *SETTINGS[0])[0]))


@pytest.mark.parametrize("field, value, message", [
    ("alpha", math.nan, "alpha must be in"), ("alpha", 11.0, "alpha must be in"), ("beta", math.inf, "beta must be in"),
    ("beta", -0.01, r"beta must be in \[0, 10\]"), ("np_mu", math.nan, "NP-LoRA's mu must be"),
    ("np_mu", -math.inf, "NP-LoRA's mu must be"), ("switch_every", 0, "LoRA Switch's block must be"),
    ("beta_auto", "yes", "beta from DINO must be true or false"), ("guidance", -1.0, "guidance must be in"),
    ("steps", 2.5, "steps must be a whole number"),
    ("seed", 2**32, "seed must be a whole number"), ("height", 264, "height must be a multiple of 8 from 8 to 256"),
])
def test_studio_checks_what_the_page_cannot(app, field, value, message):
    """Direct callers of ``Studio.generate`` (and API values the widgets let through) get the same checks."""
    from klora.errors import KLoRAError

    _, studio, _ = app
    with pytest.raises(KLoRAError, match=message):
        studio.generate(PROMPT, **{field: value})


# --- the other fusion rules and their knobs ---------------------------------------

def test_switch_every_sets_lora_switchs_block(app, reference, demo_sdxl_loras, request):
    """LoRA Switch through the page: content for N steps, then style for N, ...; the picture, map and log are the
    library's with ``switch_every=N``, and changing N reloads and re-attaches nothing."""
    from klora import selection_map

    _, studio, client = app
    content, style = demo_sdxl_loras
    settings = ("switch", "s*", 1.5, None, 5, 5.0, 3, 64, 64, "")
    want = {every: reference(content, style, *settings, switch_every=every) for every in (2, 1)}
    loads = request.getfixturevalue("loads")
    for every, (want_image, want_map, want_log) in want.items():
        reply = call(client, method="switch", steps=5, switch_every=every)
        assert np.array_equal(pixels(reply.image), pixels(want_image)), every
        log = read_json(reply.selection_log)
        assert log == named(want_log) and log["switch_every"] == every and log["method"] == "switch"
        steps = log["generations"][0]["steps"]
        assert [s["step"] for s in steps] == [0, 1, 2, 3, 4]
        for step in steps:  # every shared layer takes the step's LoRA
            content_step = (max(step["step"] - 1, 0) // every) % 2 == 0  # the paper's code: a step-end callback
            assert set(step["choices"].values()) == {"content" if content_step else "style"}
        assert np.array_equal(pixels(reply.selection_map), pixels(want_map))
        assert np.array_equal(pixels(reply.selection_map), pixels(selection_map.render(log)))
        assert f"LoRA Switch (content first, then style, switching every {every} steps)" in reply.summary
    assert not np.array_equal(pixels(want[2][0]), pixels(want[1][0]))  # N changed the picture
    assert counts(loads) == {"pipelines": 0, "models": 0, "lora reads": 0, "attach": 0, "detach": 0}
    assert studio.klora.switch_every == 1


def test_np_mu_change_reattaches_and_gives_the_librarys_picture(app, reference, demo_sdxl_loras, request):
    """NP-LoRA's correction is built from mu when the LoRAs attach: another mu re-attaches first (said under the
    picture; no file is read again) and makes ``KLoRA(np_mu=...)``'s picture; the hard projection is mu = inf, as a
    checkbox or as "inf" from an API client; methods other than np run with whatever mu is attached."""
    _, studio, client = app
    content, style = demo_sdxl_loras
    settings = ("np", "s*", 1.5, None, 2, 5.0, 3, 64, 64, "")
    want = {mu: reference(content, style, *settings, np_mu=mu)[0] for mu in (0.5, 2.0, math.inf)}
    want_klora = reference(content, style, *SETTINGS[0])
    loads = request.getfixturevalue("loads")
    try:
        reply = call(client, method="np", steps=2)  # the attached mu: nothing to do
        assert np.array_equal(pixels(reply.image), pixels(want[0.5]))
        assert reply.selection_map is None and reply.selection_log is None  # a static merge: no per-step choice
        assert "re-attached" not in reply.summary and "NP-LoRA (mu 0.5)" in reply.summary
        assert loads["attach"].calls == 0

        reply = call(client, method="np", steps=2, np_mu=2.0)
        assert np.array_equal(pixels(reply.image), pixels(want[2.0]))
        assert re.search(r" steps; re-attached first for NP-LoRA's mu 2: \d+\.\d\d s\) · ", reply.summary)
        assert "NP-LoRA (mu 2)" in reply.summary and studio.klora.np_mu == 2.0

        reply = call(client, method="np", steps=2, np_mu=2.0, hard_projection=True)
        assert np.array_equal(pixels(reply.image), pixels(want[math.inf]))
        assert "re-attached first for NP-LoRA's mu inf" in reply.summary
        assert "NP-LoRA (mu inf: the hard projection)" in reply.summary
        reply = call(client, method="np", steps=2, np_mu="inf")  # as an API client may send it: the same mu
        assert np.array_equal(pixels(reply.image), pixels(want[math.inf])) and "re-attached" not in reply.summary

        reply = call(client, np_mu=7.0)  # K-LoRA does not use mu: no re-attach
        assert np.array_equal(pixels(reply.image), pixels(want_klora[0]))
        assert read_json(reply.selection_log) == named(want_klora[2]) and "re-attached" not in reply.summary
        assert counts(loads) == {"pipelines": 0, "models": 0, "lora reads": 0, "attach": 2, "detach": 2}
        assert not np.array_equal(pixels(want[0.5]), pixels(want[2.0]))  # the pictures tell the mus apart
        assert not np.array_equal(pixels(want[2.0]), pixels(want[math.inf]))
    finally:
        call(client, method="np", steps=1)  # the server's mu again, for the tests that follow
    assert studio.klora.np_mu == 0.5


@pytest.mark.slow
def test_beta_from_dino_equals_auto_beta_called_directly(tiny_sdxl_dir, demo_sdxl_loras, tiny_dino):
    """With an Embedder (``--dino_model``), EST-LoRA's beta from DINO on the page is ``klora.dino.auto_beta`` at
    the request's prompt, seed and settings: the same beta, picture, map and log; the visitor's pattern and alpha
    stay; the log names the DINO folder, not its path; K-LoRA ignores the option."""
    from klora import dino, selection_map
    from klora.app import Defaults, Studio
    from klora.fusion import KLoRA
    from klora.pipelines import load_pipeline

    content, style = demo_sdxl_loras
    embedder = dino.Embedder(tiny_dino)
    pipe = load_pipeline(tiny_sdxl_dir, "unet", "cpu")

    def direct(pattern, alpha, seed, steps):
        with KLoRA(pipe, content, style, method="est", pattern=pattern, alpha=alpha) as klora:
            settings = dict(num_inference_steps=steps, guidance_scale=5.0, height=64, width=64)
            beta = dino.auto_beta(pipe, klora, embedder, PROMPT, seed, **settings)
            klora.set_schedule(pattern, alpha, beta)  # the schedule the visitor chose, with DINO's beta
            image = pipe(prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(seed), **settings).images[0]
            return beta, image, klora.selection_log()

    want = [direct("s", 1.5, 3, 3), direct("s*", 2.0, 8, 4)]
    studio = Studio(load_pipeline(tiny_sdxl_dir, "unet", "cpu"), content, style, embedder=embedder,
                    defaults=Defaults(prompt=PROMPT, steps=3, height=64, width=64))
    with served(studio) as client:
        replies = [call(client, method="est", pattern="s", alpha=1.5, beta=0.7, seed=3, beta_from_dino=True),
                   call(client, method="est", pattern="s*", alpha=2.0, seed=8, steps=4, beta_from_dino=True)]
        plain = call(client, beta=0.7, beta_from_dino=True)  # K-LoRA: its own beta
    with KLoRA(pipe, content, style, pattern="s*", alpha=1.5, beta=0.7) as klora:
        plain_image = pipe(prompt=PROMPT, num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                           generator=torch.Generator("cpu").manual_seed(3)).images[0]
        plain_log = klora.selection_log()

    folder_name = Path(tiny_dino).name
    for reply, (beta, image, log) in zip(replies, want):
        assert np.array_equal(pixels(reply.image), pixels(image))
        got = read_json(reply.selection_log)
        assert log["beta_auto"]["dino_model"] == tiny_dino  # the library records what it was given ...
        assert got["beta_auto"]["dino_model"] == folder_name  # ... the page names the folder only
        assert got == named({**log, "beta_auto": {**log["beta_auto"], "dino_model": folder_name}})
        assert got["beta"] == beta and got["method"] == "est" and 0 < beta < 2
        assert np.array_equal(pixels(reply.selection_map), pixels(selection_map.render(log)))
        assert f"beta {beta:g} from DINO ({folder_name}: 1 - cosine" in reply.summary
        assert tiny_dino not in reply.summary
    assert want[1][2]["alpha"] == 2.0 and want[0][0] != want[1][0]
    assert np.array_equal(pixels(plain.image), pixels(plain_image))
    assert read_json(plain.selection_log) == named(plain_log) and "from DINO" not in plain.summary


# --- switching LoRAs in the page -------------------------------------------------

def switch(client, content_path="", content_upload=None, style_path="", style_upload=None, content_weight="",
           style_weight=""):
    from gradio_client import handle_file

    return client.predict(content_path, handle_file(content_upload) if content_upload else None, content_weight,
                          style_path, handle_file(style_upload) if style_upload else None, style_weight,
                          api_name="/switch_loras")


@pytest.mark.slow
def test_rejected_loras_show_the_message_and_keep_the_previous_ones(app, reference, demo_sdxl_loras, tmp_path,
                                                                    tiny_flux_dir, request):
    from diffusers import FluxTransformer2DModel
    from gradio_client.exceptions import AppError
    from safetensors.torch import save_file

    from klora.tiny import write_demo_loras

    _, studio, client = app
    flux_lora, _ = write_demo_loras(FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer"),
                                    tmp_path)
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"not read")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    not_a_lora = tmp_path / "checkpoint.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(not_a_lora))
    want_image, want_map, _ = reference(*demo_sdxl_loras, *SETTINGS[0])
    loads = request.getfixturevalue("loads")
    klora_before = studio.klora

    rejected = [
        (dict(content_path=str(tmp_path / "missing.safetensors")), "no such file or folder"),
        (dict(content_upload=str(pickle)), r"Invalid file type.*\.safetensors"),  # gradio's own check
        (dict(style_upload=str(corrupt)), r"style LoRA \(uploaded 'corrupt.safetensors'\): not a readable"),
        (dict(content_upload=str(not_a_lora)), "not a LoRA"),
        (dict(style_path=flux_lora), "none of its .* layers exist in this UNet2DConditionModel"),
        (dict(), "no LoRA given"),
    ]
    for fields, message in rejected:
        with pytest.raises(AppError, match=message) as caught:
            switch(client, **fields)
        assert "\n" not in str(caught.value.message)  # one line
        assert "/tmp/gradio" not in str(caught.value.message)  # uploads are named, not the server's cache
    assert studio.klora is klora_before  # rejected before the attached LoRAs were touched
    assert loads["attach"].calls == 0 and loads["detach"].calls == 0
    reply = call(client)
    assert np.array_equal(pixels(reply.image), pixels(want_image))
    assert np.array_equal(pixels(reply.selection_map), pixels(want_map))


def test_a_failed_attach_brings_the_previous_loras_back(app, reference, demo_sdxl_loras, monkeypatch):
    from gradio_client.exceptions import AppError

    import klora.app
    from klora.loras import LoRAError

    _, _, client = app
    content, style = demo_sdxl_loras
    real = klora.app.KLoRA
    attempts = []

    def fails_once(*args, **kwargs):
        attempts.append(kwargs["content"].label)
        if len(attempts) == 1:
            raise LoRAError("content LoRA 'x': could not be loaded (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(klora.app, "KLoRA", fails_once)
    with pytest.raises(AppError, match="simulated"):
        switch(client, content_path=style)
    assert attempts == [f"content LoRA '{Path(style).name}'", f"content LoRA '{Path(content).name}'"]
    want_image, want_map, _ = reference(content, style, *SETTINGS[0])
    reply = call(client)
    assert np.array_equal(pixels(reply.image), pixels(want_image))
    assert np.array_equal(pixels(reply.selection_map), pixels(want_map))


@pytest.mark.slow
def test_switching_loras_by_upload_and_path(app, reference, demo_sdxl_loras, request):
    _, _, client = app
    content, style = demo_sdxl_loras
    swapped = [reference(style, content, *settings) for settings in SETTINGS[:2]]
    loads = request.getfixturevalue("loads")
    try:
        info = switch(client, content_upload=style, style_path=content)
        assert "content LoRA (uploaded 'demo_style_lora.safetensors')" in info
        assert "style LoRA 'demo_content_lora.safetensors'" in info and content not in info  # no server path
        assert counts(loads) == {"pipelines": 0, "models": 0, "lora reads": 2, "attach": 1, "detach": 1}
        for settings, (want_image, want_map, _) in zip(SETTINGS[:2], swapped):
            reply = call_with(client, settings)
            assert np.array_equal(pixels(reply.image), pixels(want_image)), settings
            assert np.array_equal(pixels(reply.selection_map), pixels(want_map)), settings
        # One role only: the other LoRA stays.
        info = switch(client, style_path=style)
        assert "content LoRA (uploaded 'demo_style_lora.safetensors')" in info
        assert "style LoRA 'demo_style_lora.safetensors'" in info
    finally:
        switch(client, content_path=content, style_path=style)
    reply = call(client)
    assert np.array_equal(pixels(reply.image), pixels(reference(content, style, *SETTINGS[0])[0]))


def test_uploads_only_refuses_typed_paths(app, demo_sdxl_loras):
    import gradio as gr

    from klora.app import build_app

    _, studio, _ = app
    page = build_app(studio, typed_lora_paths=False)  # not launched: its handler is called directly
    switch_handler = next(fn.fn for fn in page.fns.values() if fn.api_name == "switch_loras")
    klora_before = studio.klora
    with pytest.raises(gr.Error, match="accepts uploaded .safetensors files only"):
        switch_handler(demo_sdxl_loras[1], None, "", "", None, "", None)
    assert studio.klora is klora_before


def test_typed_devices_and_weight_names_are_refused_or_used(app, reference, demo_sdxl_loras, tmp_path):
    import shutil

    from gradio_client import Client
    from gradio_client.exceptions import AppError

    import gradio as gr

    import klora.app
    from klora import selection_map

    demo, studio, _ = app
    client = Client(demo.local_url, verbose=False)
    content, style = demo_sdxl_loras
    folder = tmp_path / "both"
    folder.mkdir()
    shutil.copy(content, folder / "a.safetensors")
    shutil.copy(style, folder / "b.safetensors")
    for fields, message in (
            (dict(content_path="/dev/zero"), r"^content LoRA '/dev/zero': not a file or folder \(a device, pipe or "
                                             r"socket\); type a .safetensors file, a folder or a hub id$"),
            # A weight name was ignored with an upload; it picks a file inside a typed folder or repo only.
            (dict(content_upload=style, content_weight="x.safetensors"),
             "content LoRA: a weight name picks a file inside a typed folder or hub repo; an uploaded file is used "
             "as it is"),
            (dict(style_path=style, style_weight="b.safetensors"), "is a file; a weight name picks a file inside"),
            (dict(style_weight="b.safetensors"), "style LoRA: a weight name without a path or hub id"),
            (dict(content_path=str(folder)), r"several .safetensors files \(a.safetensors, b.safetensors\)"),
            (dict(content_path=str(folder), content_weight="c.safetensors"), "has no file 'c.safetensors'")):
        with pytest.raises(AppError, match=message) as caught:
            switch(client, **fields)
        assert "\n" not in str(caught.value.message)
    # A weight name picks its file from a typed folder: b (a copy of the style LoRA) becomes the content LoRA,
    # a (of the content LoRA) the style LoRA.
    info = switch(client, content_path=str(folder), content_weight="b.safetensors", style_path=str(folder),
                  style_weight="a.safetensors")
    assert info.startswith("content LoRA 'both/b.safetensors'  \nstyle LoRA 'both/a.safetensors'")
    want_image, _, want_log = reference(style, content, *SETTINGS[0])
    reply = call(client)
    assert np.array_equal(pixels(reply.image), pixels(want_image))
    # The map's legend names the files the page read.
    want_log = {**want_log, "content": "content LoRA 'both/b.safetensors'", "style": "style LoRA 'both/a.safetensors'"}
    assert read_json(reply.selection_log) == want_log
    assert np.array_equal(pixels(reply.selection_map), pixels(selection_map.render(want_log)))
    # Under --uploads_only the weight field is hidden; an API client sending one is refused all the same.
    page = klora.app.build_app(studio, typed_lora_paths=False)
    handler = next(fn.fn for fn in page.fns.values() if fn.api_name == "switch_loras")
    with pytest.raises(gr.Error, match="an uploaded file is used as it is"):
        handler("", content, "x.safetensors", "", None, "", None)


# --- extra LoRAs and strengths ---------------------------------------------------------

def set_stack(client, extra_paths="", uploads=None, upload_scales="", content_scale=1.0, style_scale=1.0):
    from gradio_client import handle_file

    return client.predict(extra_paths, [handle_file(u) for u in uploads] if uploads else None, upload_scales,
                          content_scale, style_scale, api_name="/set_stack")


def test_extra_loras_and_strengths_on_the_page_match_the_library(app, reference, demo_sdxl_loras, tiny_sdxl_dir):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from klora.fusion import KLoRA
    from klora.pipelines import load_pipeline

    demo, studio, client = app
    content, style = demo_sdxl_loras
    pipe = load_pipeline(tiny_sdxl_dir, "unet", "cpu")
    klora = KLoRA(pipe, content, style, extra_loras=[(style, 0.5), (content, -0.25)], content_scale=0.8)
    want = pipe(prompt=PROMPT, num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(3)).images[0]
    want_log = klora.selection_log()
    klora.detach()
    try:
        info = set_stack(client, f"{style} 0.5", uploads=[content], upload_scales="-0.25", content_scale=0.8)
        assert "extra LoRA 1 'demo_style_lora.safetensors' at scale 0.5" in info
        assert "extra LoRA (uploaded 'demo_content_lora.safetensors') at scale -0.25" in info
        assert "strengths: content 0.8, style 1" in info
        reply = call(client)
        assert np.array_equal(pixels(reply.image), pixels(want))
        log = read_json(reply.selection_log)
        assert log["generations"] == want_log["generations"] and log["layers"] == want_log["layers"]
        bounded = r"must be a finite number other than 0, from -100 to 100 \(0 would apply nothing\), got "
        for fields, message in (
                (dict(extra_paths=f"{style} 0"), "extra LoRA 1 scale " + bounded + "0"),
                # Each of these was accepted, and blackened every visitor's pictures (1e308 overflowed).
                (dict(extra_paths=f"{style} 1e308"), "extra LoRA 1 scale " + bounded + r"1e\+308"),
                (dict(extra_paths=f"{content} 0.5\n{style} 1e30"), "extra LoRA 2 scale " + bounded + r"1e\+30"),
                (dict(extra_paths=f"{style} inf"), "extra LoRA 1 scale " + bounded + "inf"),
                (dict(uploads=[content], upload_scales="1e30"),
                 "scale 1 of the uploaded extra LoRAs " + bounded + r"1e\+30"),
                (dict(content_scale=1e30), "content strength " + bounded + r"1e\+30"),
                (dict(content_scale=1e308), "content strength " + bounded + r"1e\+308"),
                (dict(style_scale=-1e38), "style strength " + bounded + r"-1e\+38"),
                (dict(content_scale=0), "content strength " + bounded + "0"),
                (dict(content_scale="nan"), "content strength " + bounded + "nan"),  # a string, as an API may send
                (dict(style_scale="1e309"), "style strength " + bounded + "inf"),
                (dict(uploads=[content], upload_scales="x"), "numbers, e.g. 0.8"),
                (dict(extra_paths="/no/such.safetensors"), "no such file or folder")):
            with pytest.raises(AppError, match=message) as caught:
                set_stack(client, **fields)
            assert "\n" not in str(caught.value.message)
        # gradio_client sends no NaN or infinity; plain HTTP does (Python's JSON reads them).
        for content_scale, style_scale, message in ((math.inf, 1.0, "content strength " + bounded + "inf"),
                                                    (1.0, math.nan, "style strength " + bounded + "nan")):
            event, data = raw_call(demo.local_url, "set_stack", ["", None, "", content_scale, style_scale])
            assert event == "error" and re.fullmatch(message, data["error"])
        assert np.array_equal(pixels(call(client).image), pixels(want))  # a refusal keeps the stack
        # Another visitor never had these extra LoRAs: the server's LoRAs alone.
        fresh = call(Client(demo.local_url, verbose=False))
        assert np.array_equal(pixels(fresh.image), pixels(reference(content, style, *SETTINGS[0])[0]))
    finally:
        info = set_stack(client)
    assert "extra LoRA" not in info and "strengths" not in info


# --- each session's own LoRAs ------------------------------------------------------------

def test_each_session_generates_with_its_own_loras(app, reference, demo_sdxl_loras, tiny_sdxl_dir, request):
    """Three sessions (swapped LoRAs; an extra LoRA and a strength; the server's), their requests interleaved:
    each picture is the library's with that session's settings, and each request says it re-attached."""
    from gradio_client import Client

    from klora.fusion import KLoRA
    from klora.pipelines import load_pipeline

    demo, studio, _ = app
    content, style = demo_sdxl_loras
    pipe = load_pipeline(tiny_sdxl_dir, "unet", "cpu")

    def stacked(method, pattern, alpha, beta, steps, guidance, seed, width, height, negative):
        klora = KLoRA(pipe, content, style, pattern=pattern, alpha=alpha, beta=beta, method=method,
                      extra_loras=[(style, 0.5)], content_scale=0.8)
        try:
            return pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                        generator=torch.Generator("cpu").manual_seed(seed)).images[0], klora.selection_log()
        finally:
            klora.detach()

    settings = SETTINGS[:2]
    want = {"swapped": [reference(style, content, *one)[::2] for one in settings],
            "stacked": [stacked(*one) for one in settings],
            "server's": [reference(content, style, *one)[::2] for one in settings]}
    sessions = {name: Client(demo.local_url, verbose=False) for name in want}
    switch(sessions["swapped"], content_upload=style, style_path=content)
    set_stack(sessions["stacked"], f"{style} 0.5", content_scale=0.8)
    loads = request.getfixturevalue("loads")
    for i, one in enumerate(settings):
        for name, client in sessions.items():
            reply = call_with(client, one)
            want_image, want_log = want[name][i]
            assert np.array_equal(pixels(reply.image), pixels(want_image)), (name, one)
            got_log = read_json(reply.selection_log)
            assert got_log["generations"] == want_log["generations"] and got_log["layers"] == want_log["layers"]
            assert re.search(r" steps; this session's LoRAs re-attached first: \d+\.\d\d s\) · ", reply.summary), name
    # Six re-attaches (every request followed another session's), and no file read again for them.
    assert counts(loads) == {"pipelines": 0, "models": 0, "lora reads": 0, "attach": 6, "detach": 6}
    # The settings differ enough to tell the sessions apart.
    images = [pixels(want[name][0][0]) for name in want]
    assert not any(np.array_equal(a, b) for a, b in ((images[0], images[1]), (images[0], images[2]),
                                                     (images[1], images[2])))
    # A session's next request, with nothing in between, does not re-attach.
    again = call_with(sessions["server's"], settings[0])
    assert "re-attached" not in again.summary and loads["attach"].calls == 6
    assert "content LoRA 'demo_content_lora.safetensors', style LoRA 'demo_style_lora.safetensors'" in again.summary


def test_the_library_bounds_strengths_too(tiny_sdxl_dir, demo_sdxl_loras):
    from klora.errors import KLoRAError
    from klora.fusion import KLoRA
    from klora.pipelines import load_pipeline

    content, style = demo_sdxl_loras
    pipe = load_pipeline(tiny_sdxl_dir, "unet", "cpu")
    bounded = r"must be a finite number other than 0, from -100 to 100 \(0 would apply nothing\), got "
    for options, message in ((dict(extra_loras=[(style, 0.5), (content, 1e308)]), r"extra_loras\[1\] scale "),
                             (dict(extra_loras=[(style, math.inf)]), "extra_loras scale "),
                             (dict(content_scale=1e30), "content_scale "), (dict(style_scale=-100.5), "style_scale ")):
        with pytest.raises(KLoRAError, match="^" + message + bounded):
            KLoRA(pipe, content, style, **options)
    KLoRA(pipe, content, style, content_scale=-100, style_scale=100, extra_loras=[(style, 100)]).detach()


# --- queue and cancel --------------------------------------------------------------

@pytest.mark.slow
def test_one_generation_at_a_time_and_cancel_stops_only_the_own_one(app, reference, demo_sdxl_loras,
                                                                   monkeypatch):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from gradio_client.utils import Status

    demo, studio, _ = app
    # Two new sessions, both with the server's LoRAs, attached before the pipeline is wrapped below.
    client, other = Client(demo.local_url, verbose=False), Client(demo.local_url, verbose=False)
    call(client, steps=1)
    runs = []  # (start, end, steps) of every pipeline call

    class Timed:
        def __init__(self, pipe):
            self.pipe = pipe

        def __call__(self, **kwargs):
            start = time.monotonic()
            try:
                return self.pipe(**kwargs)
            finally:
                runs.append((start, time.monotonic(), kwargs["num_inference_steps"]))

    monkeypatch.setattr(studio, "pipe", Timed(studio.pipe))
    long_job = client.submit(**{**FIELDS, "steps": 3000}, api_name="/generate")
    deadline = time.monotonic() + 60
    while not (studio.klora.generations and studio.klora.generations[-1].num_inference_steps == 3000
               and len(studio.klora.generations[-1].steps) >= 3):
        assert time.monotonic() < deadline, "the long generation never started"
        time.sleep(0.05)
    short_job = other.submit(**FIELDS, api_name="/generate")
    time.sleep(1.0)
    assert short_job.status().code == Status.IN_QUEUE  # gradio's queue holds it: one generation at a time
    other.predict(api_name="/cancel")  # that session has nothing running: nothing happens
    time.sleep(0.3)
    assert not long_job.done()

    cancelled_at = time.monotonic()
    client.predict(api_name="/cancel")
    with pytest.raises(AppError, match=r"cancelled after \d+ of 3000 steps"):
        long_job.result(timeout=60)
    short = Reply(*short_job.result(timeout=60))

    (_, long_end, long_steps), (short_start, _, short_steps) = runs
    assert long_steps == 3000 and short_steps == 3
    assert long_end - cancelled_at < 10  # the diffusers loop stopped: 3000 steps take minutes here
    assert long_end <= short_start  # never two generations at once
    want_image, want_map, _ = reference(*demo_sdxl_loras, *SETTINGS[0])
    assert np.array_equal(pixels(short.image), pixels(want_image))  # the other session's job ran in full
    assert np.array_equal(pixels(short.selection_map), pixels(want_map))


# --- serving rules --------------------------------------------------------------------

def test_binds_loopback_and_serves_no_named_path(app, demo_sdxl_loras, tiny_sdxl_dir):
    import os

    import httpx

    demo, _, _ = app
    assert demo.local_url.startswith("http://127.0.0.1:")
    base = demo.local_url.rstrip("/")
    event, outputs = raw_call(base, "generate", list(FIELDS.values()))
    assert event == "complete"
    made = [outputs[0]["path"], outputs[3]["path"]]  # the image and the selection log, as the server has them
    # The generated image and selection log are served from the page's own folder ...
    for path in made:
        assert Path(path).is_relative_to(demo.page_files.outputs)
        assert httpx.get(f"{base}/gradio_api/file={path}").status_code == 200
    # ... the LoRA files, the model folder and the working directory are not.
    for path in (demo_sdxl_loras[0], os.path.join(tiny_sdxl_dir, "model_index.json"),
                 os.path.abspath("pyproject.toml"), "/etc/hostname"):
        assert httpx.get(f"{base}/gradio_api/file={path}").status_code in (403, 404), path


def test_files_the_page_did_not_make_are_not_served(app, tmp_path):
    """Planted files in the system temp folder and in gradio's shared folder, uploads (refused or never used)
    and gradio_client's downloads: all 403. gradio alone served the shared folder and every upload."""
    import tempfile

    import httpx
    from gradio.utils import get_upload_folder

    demo, _, client = app
    base = demo.local_url.rstrip("/")
    planted = []
    for folder in (Path(tempfile.gettempdir()), Path(get_upload_folder()), Path(get_upload_folder()) / "planted"):
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / f"klora-planted-{tmp_path.name}.txt"
        file.write_text("another process's file")
        planted.append(file)
    uploaded = httpx.post(f"{base}/gradio_api/upload", files=[
        ("files", ("page.html", b"<script>alert(1)</script>", "text/html")),
        ("files", ("lora.bin", b"pickle", "application/octet-stream"))]).json()
    assert all(Path(path).is_relative_to(demo.page_files.uploads) for path in uploaded)  # its own folder
    try:
        reply = call(client)  # gradio_client downloads it into gradio's shared folder on this machine
        for path in planted + uploaded + [reply.image]:
            assert Path(path).exists()
            assert httpx.get(f"{base}/gradio_api/file={path}").status_code == 403, path
            assert httpx.head(f"{base}/gradio_api/file={path}").status_code == 403, path
        # A path that leaves the outputs folder through ".." is judged where it leads (the dots are
        # percent-encoded, or httpx would resolve them before sending).
        escape = f"{demo.page_files.outputs}/%2E%2E/%2E%2E/{planted[2].parent.name}/{planted[2].name}"
        assert httpx.get(f"{base}/gradio_api/file={escape}").status_code == 403
    finally:
        for file in planted:
            file.unlink()


def test_the_pages_folder_goes_when_it_closes(tiny_sdxl_dir, demo_sdxl_loras):
    from klora.app import Defaults, Studio
    from klora.pipelines import load_pipeline

    studio = Studio(load_pipeline(tiny_sdxl_dir, device="cpu"), *demo_sdxl_loras,
                    defaults=Defaults(prompt=PROMPT, steps=2, height=64, width=64))
    page = served(studio)
    with page as client:
        folders = [studio._outputs, page.demo.page_files.root]
        call(client, steps=2)
        assert all(folder.is_dir() and any(folder.iterdir()) for folder in folders)
    assert not any(folder.exists() for folder in folders)


def test_serve_defaults(app, monkeypatch):
    from klora.app import Limits, build_app, serve

    _, studio, _ = app
    page = build_app(studio)
    seen = {}
    monkeypatch.setattr(page, "launch", lambda **kwargs: seen.update(kwargs))
    serve(page, Limits(max_upload="5mb", max_sessions=7), prevent_thread_lock=True)
    assert seen["server_name"] == "127.0.0.1" and seen["share"] is False and seen["show_error"] is False
    assert seen["allowed_paths"] == [str(page.page_files.outputs)] and seen["max_file_size"] == "5mb"
    assert seen["state_session_capacity"] == 7
    page.close()
    assert not page.page_files.root.exists()


def test_config_and_info_name_files_not_server_paths(tiny_sdxl_dir, demo_sdxl_loras):
    """/config (the page as the browser gets it), the LoRA info box and the selection log offered for download
    name the model and the LoRAs by file name, not by where they are on the server, under --uploads_only too."""
    import httpx

    from klora.app import Defaults, Studio
    from klora.pipelines import load_pipeline

    content, style = demo_sdxl_loras
    folders = [str(Path(content).parent), str(Path(tiny_sdxl_dir).parent)]
    studio = Studio(load_pipeline(tiny_sdxl_dir, device="cpu"), content, style, extra_loras=[(style, 0.5)],
                    model_label=tiny_sdxl_dir, defaults=Defaults(prompt=PROMPT, steps=2, height=64, width=64))
    page = served(studio, typed_lora_paths=False)
    with page as client:
        config = httpx.get(f"{page.demo.local_url.rstrip('/')}/config").text
        for name in ("`tiny-sdxl`", "content LoRA 'demo_content_lora.safetensors'",
                     "style LoRA 'demo_style_lora.safetensors'", "extra LoRA 1 'demo_style_lora.safetensors'"):
            assert name in config
        log = read_json(call(client, steps=2).selection_log)
        assert log["content"] == "content LoRA 'demo_content_lora.safetensors'"
        info = set_stack(client, uploads=[content], upload_scales="0.5")
        assert "extra LoRA (uploaded 'demo_content_lora.safetensors') at scale 0.5" in info
        for text in (config, json.dumps(log), info):
            assert not any(folder in text for folder in folders)


def test_page_queue_settings(app):
    demo, studio, _ = app
    fns = {fn.api_name: (index, fn) for index, fn in demo.fns.items()}
    generate, switch_loras = fns["generate"][1], fns["switch_loras"][1]
    # Generations and LoRA switches share one slot: the model does one thing at a time.
    assert generate.concurrency_id == switch_loras.concurrency_id
    assert generate.concurrency_limit == switch_loras.concurrency_limit == 1
    assert demo._queue.max_size == studio.limits.max_queue
    assert [fn.cancels for fn in demo.fns.values() if fn.cancels] == [[fns["generate"][0]]]


# --- any family: fields from the pipeline, Qwen-Image, Wan 2.2 clips ------------------


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    """(model folder, content LoRA, style LoRA) of the tiny Qwen-Image."""
    from klora.pipelines import load_pipeline
    from klora.tiny import build_tiny, write_demo_loras

    folder = tmp_path_factory.mktemp("qwen-image")
    model = build_tiny("qwen-image", folder / "model")
    return (model, *write_demo_loras(load_pipeline(model, device="cpu").transformer, folder))


@pytest.fixture(scope="module")
def tiny_wan22(tmp_path_factory):
    """(model folder, content LoRA, style LoRA) of the tiny Wan 2.2 (two experts, 8 steps split 4/4)."""
    from klora.pipelines import load_pipeline
    from klora.tiny_video import build_tiny_video, write_demo_video_loras

    folder = tmp_path_factory.mktemp("wan22")
    model = build_tiny_video("wan22", folder / "model")
    return (model, *write_demo_video_loras(load_pipeline(model, device="cpu").transformer, folder))


class served:
    """``with served(studio) as client``: the page over ``studio`` on 127.0.0.1, closed afterwards."""

    def __init__(self, studio, **page_options):
        self.studio, self.page_options = studio, page_options

    def __enter__(self):
        from gradio_client import Client

        from klora.app import build_app, serve

        self.demo = build_app(self.studio, **self.page_options)
        serve(self.demo, self.studio.limits, prevent_thread_lock=True, quiet=True)
        return Client(self.demo.local_url, verbose=False)

    def __exit__(self, *exc):
        self.demo.close()
        self.studio.close()


def library_call(model, content, style, call, **options):
    """(pipeline output, selection log): ``KLoRA`` on a freshly loaded pipeline, no page code involved."""
    from klora.fusion import KLoRA
    from klora.pipelines import load_pipeline

    pipe = load_pipeline(model, device="cpu")
    klora = KLoRA(pipe, content, style, **options)
    try:
        return pipe(**call), klora.selection_log()
    finally:
        klora.detach()


def test_page_fields_follow_the_pipeline(tiny_sdxl_dir, tiny_flux_dir, tiny_qwen, tiny_wan22, tmp_path):
    """Steps, guidance, sizes and frames are each pipeline's own; the fields are the arguments it takes."""
    from klora.app import Defaults, frame_step, side_multiple
    from klora.pipelines import family_of, load_pipeline
    from klora.tiny import build_tiny

    pipes = {"sdxl": load_pipeline(tiny_sdxl_dir, device="cpu"), "flux": load_pipeline(tiny_flux_dir, device="cpu"),
             "qwen": load_pipeline(tiny_qwen[0], device="cpu"), "wan22": load_pipeline(tiny_wan22[0], device="cpu"),
             "klein": load_pipeline(build_tiny("flux2-klein", tmp_path / "klein"), device="cpu")}
    found = {key: (family_of(pipe).name, side_multiple(family_of(pipe)), Defaults.for_pipeline(pipe))
             for key, pipe in pipes.items()}
    # (family, side multiple, steps, guidance, true CFG) as diffusers 0.42.1 documents each pipeline.
    assert {key: (name, m, d.steps, d.guidance, d.true_cfg) for key, (name, m, d) in found.items()} == {
        "sdxl": ("Stable Diffusion XL", 8, 50, 5.0, None), "flux": ("FLUX.1", 16, 28, 3.5, 1.0),
        "qwen": ("Qwen-Image", 16, 50, None, 4.0), "wan22": ("Wan", 16, 50, 5.0, None),
        "klein": ("FLUX.2", 16, 50, 4.0, None)}
    wan = found["wan22"][2]
    assert (wan.height, wan.width, wan.num_frames, wan.fps, frame_step(pipes["wan22"])) == (480, 832, 81, 16, 4)
    assert found["sdxl"][2].num_frames is None
    # The default size is what the pipeline itself makes when given none (tiny VAEs: 2x, so small).
    for key in ("sdxl", "flux"):
        made = pipes[key](prompt=PROMPT, num_inference_steps=1, output_type="pil").images[0]
        assert made.size == (found[key][2].width, found[key][2].height), key

    from klora.app import Studio

    shown = {}
    for key, (model, content, style) in {"qwen": tiny_qwen, "wan22": tiny_wan22}.items():
        studio = Studio(pipes[key], content, style)
        shown[key] = studio.controls
        studio.close()
    assert shown == {"qwen": {"negative_prompt": True, "guidance": False, "true_cfg": True, "frames": False},
                     "wan22": {"negative_prompt": True, "guidance": True, "true_cfg": False, "frames": True}}


@pytest.mark.slow
def test_flux_page_matches_the_library(tiny_flux_dir, tmp_path):
    from diffusers import FluxTransformer2DModel
    from gradio_client.exceptions import AppError

    from klora import selection_map
    from klora.app import Defaults, Studio
    from klora.pipelines import load_pipeline
    from klora.tiny import write_demo_loras

    content, style = write_demo_loras(
        FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer"), tmp_path)
    pipe = load_pipeline(tiny_flux_dir, "transformer", "cpu")
    with served(Studio(pipe, content, style, defaults=Defaults.for_pipeline(pipe, height=64, width=64))) as client:
        reply = call(client, steps=3, guidance=3.5, seed=5, width=64, height=48)
        with pytest.raises(AppError, match="width must be a multiple of 16"):
            call(client, steps=3, guidance=3.5, seed=5, width=56, height=48)
    output, log = library_call(tiny_flux_dir, content, style, dict(
        prompt=PROMPT, num_inference_steps=3, guidance_scale=3.5, true_cfg_scale=1.0, height=48, width=64,
        generator=torch.Generator("cpu").manual_seed(5)))
    assert np.array_equal(pixels(reply.image), pixels(output.images[0]))
    assert np.array_equal(pixels(reply.selection_map), pixels(selection_map.render(log)))


@pytest.mark.slow
def test_qwen_image_page_with_true_cfg_matches_the_library(tiny_qwen):
    from gradio_client.exceptions import AppError

    from klora import selection_map
    from klora.app import Defaults, Studio
    from klora.pipelines import load_pipeline
    from klora.tiny import TINY_CALL_KWARGS

    model, content, style = tiny_qwen
    extra = TINY_CALL_KWARGS["qwen-image"]
    pipe = load_pipeline(model, device="cpu")
    studio = Studio(pipe, content, style, call_kwargs=extra,
                    defaults=Defaults.for_pipeline(pipe, prompt=PROMPT, steps=3, height=32, width=32))
    with served(studio) as client:
        reply = call(client, negative_prompt="blurry", true_cfg=2.5, steps=3, seed=5, width=48, height=32)
        with pytest.raises(AppError, match="width must be a multiple of 16"):
            call(client, width=40, height=32)

    direct = dict(prompt=PROMPT, num_inference_steps=3, height=32, width=48,
                  generator=torch.Generator("cpu").manual_seed(5), **extra)
    output, log = library_call(model, content, style, {**direct, "negative_prompt": "blurry", "true_cfg_scale": 2.5})
    assert np.array_equal(pixels(reply.image), pixels(output.images[0]))
    assert read_json(reply.selection_log) == named(log)
    assert np.array_equal(pixels(reply.selection_map), pixels(selection_map.render(log)))
    # True CFG really ran: without the negative prompt the image differs.
    direct["generator"] = torch.Generator("cpu").manual_seed(5)
    plain, _ = library_call(model, content, style, direct)
    assert not np.array_equal(pixels(reply.image), pixels(plain.images[0]))


@pytest.mark.slow
def test_wan22_page_serves_the_clip_of_the_library(tiny_wan22, tmp_path):
    from gradio_client.exceptions import AppError

    from klora import selection_map, video
    from klora.app import Defaults, Studio
    from klora.pipelines import load_pipeline
    from klora.tiny_video import TINY_VIDEO_CALL_KWARGS

    model, content, style = tiny_wan22
    extra = TINY_VIDEO_CALL_KWARGS["wan22"]
    pipe = load_pipeline(model, device="cpu")
    studio = Studio(pipe, content, style, call_kwargs=extra,
                    defaults=Defaults.for_pipeline(pipe, prompt=PROMPT, steps=8, height=16, width=16, num_frames=5))
    with served(studio) as client:
        reply = call(client, steps=8, seed=2, width=32, height=16, num_frames=9, fps=12)
        with pytest.raises(AppError, match=r"frames must be 4k \+ 1 \(1, 5, 9, \.\.\.\), from 1 to 257, got 6"):
            call(client, steps=8, width=16, height=16, num_frames=6)
        with pytest.raises(AppError, match="height must be a multiple of 16"):
            call(client, steps=8, width=16, height=24, num_frames=5)

    output, log = library_call(model, content, style, dict(
        prompt=PROMPT, num_inference_steps=8, height=16, width=32, num_frames=9, output_type="np",
        generator=torch.Generator("cpu").manual_seed(2), **extra))
    frames = output.frames[0]
    assert reply.image is None and reply.video.endswith(".mp4")
    clip = decoded(reply.video)
    assert clip.shape == (9, 16, 32, 3)
    import imageio

    with imageio.get_reader(reply.video, format="FFMPEG") as reader:
        assert reader.get_meta_data()["fps"] == 12
    # The MP4 holds the library's frames: written as inference_video.py writes them, they decode
    # to the same pixels, and H.264 keeps them close to the pipeline's own output.
    want = video.write_mp4(video.to_uint8(frames), tmp_path / "direct.mp4", 12, progress=False)
    assert np.array_equal(clip, decoded(want))
    assert np.abs(clip.astype(np.float64) - frames * 255).mean() < 12
    # Both experts ran and are logged, and the JSON is the library's log of the same run.
    got = read_json(reply.selection_log)
    assert got == named(log)
    assert got["denoisers"] == ["transformer", "transformer_2"]
    assert [s["component"] for s in got["generations"][0]["steps"]] == ["transformer"] * 4 + ["transformer_2"] * 4
    assert np.array_equal(pixels(reply.selection_map), pixels(selection_map.render(log)))
    assert "9 frames at 12 fps" in reply.summary and "transformer_2" in reply.summary  # a gamma per expert


def test_high_low_pairs_reach_the_experts_and_a_switch_replaces_both_files(tiny_wan22):
    from klora.app import Studio
    from klora.pipelines import load_pipeline

    model, content, style = tiny_wan22
    studio = Studio(load_pipeline(model, device="cpu"), content, style, content_2=style, style_2=content)
    try:
        content, style = Path(content).name, Path(style).name  # the page names files, not paths
        assert content != style
        labels = studio.klora.labels
        assert (content in labels["content"] and style in labels["content_2"] and style in labels["style"]
                and content in labels["style_2"])
        assert studio.describe_loras().count("second expert") == 2
        setup = studio.switch_loras(content=tiny_wan22[2])  # a new content LoRA goes into both experts
        assert set(setup.files) == {"content", "style", "style_2"} and studio.attached(setup)
        assert set(studio.klora.labels) == {"content", "style", "style_2"}
        assert style in studio.klora.labels["content"]
        assert set(studio.setup.files) == {"content", "content_2", "style", "style_2"}  # the server's stay
    finally:
        studio.close()


def test_switching_and_progress_chosen_at_launch_reach_the_engine(tiny_sdxl_dir, demo_sdxl_loras):
    from klora.app import Defaults, Studio
    from klora.errors import KLoRAError
    from klora.pipelines import load_pipeline

    content, style = demo_sdxl_loras
    studio = Studio(load_pipeline(tiny_sdxl_dir, device="cpu"), content, style, switching="adapters",
                    progress="noise", defaults=Defaults(prompt=PROMPT, steps=3, height=64, width=64))
    try:
        result = studio.generate(PROMPT, seed=4)
        got = read_json(result.selection_log)
        assert "adapters switching, progress by noise" in studio.describe_loras()
    finally:
        studio.close()
    output, log = library_call(tiny_sdxl_dir, content, style, dict(
        prompt=PROMPT, num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
        generator=torch.Generator("cpu").manual_seed(4)), switching="adapters", progress="noise")
    assert np.array_equal(pixels(result.image), pixels(output.images[0]))
    assert got == named(log) and (got["switching"], got["progress"]) == ("adapters", "noise")
    # Progress by noise level is not step / steps here (the scheduler's "leading" timesteps end near t = 1).
    assert [s["progress"] for s in got["generations"][0]["steps"]] != [0, 1 / 3, 2 / 3]
    with pytest.raises(KLoRAError, match="switching must be one of fused, adapters"):
        Studio(load_pipeline(tiny_sdxl_dir, device="cpu"), content, style, switching="merged")

# --- the script's own checks (the full start is in test_browser.py) ------------------

def test_script_usage_error_is_one_line():
    result = run_script("inference_gradio.py", timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --pretrained_model_name_or_path is required (or run --demo to try the tiny built-in model)"]


@pytest.mark.parametrize("args, message", [
    (["--server_port", "70000"], "--server_port 70000: must be from 1 to 65535"),
    (["--max_side", "100"], "--max_side 100: must be a multiple of 16"),
    (["--demo", "--lora_name_or_path_style", "x"], "--demo brings its own model"),
    (["--family", "unet"], "--family unet: no longer needed; the page finds the model family from the model's "
                           "model_index.json"),
    (["--family", "auto"], "--pretrained_model_name_or_path is required"),  # "auto" is what it always does
    (["--max_frames", "0"], "--max_frames 0: must be at least 1"),
    (["--demo_family", "wan22"], "--demo_family picks the tiny model of --demo; add --demo"),
    (["--content_scale", "1e30"], r"--content_scale 1e\+30: must be a finite number other than 0, from -100 to 100"),
    (["--style_scale=-1e38"], r"--style_scale -1e\+38: must be a finite number other than 0, from -100 to 100"),
    (["--content_scale", "inf"], "--content_scale inf: must be a finite number other than 0"),
    (["--extra_lora", "x.safetensors", "--extra_lora_scale", "1e308"],
     r"--extra_lora_scale 1e\+308: must be a finite number other than 0, from -100 to 100$"),
    (["--demo", "--dino_model", "/no/such/dino"],
     r"^--dino_model '/no/such/dino': could not load a ViT and its image processor \([^\n]*\)$"),
])
def test_script_checks_its_arguments_before_loading(args, message):
    import inference_gradio
    from klora.errors import KLoRAError

    with pytest.raises(KLoRAError, match=message):
        inference_gradio.main(args)


def test_script_binds_loopback_by_default():
    import inference_gradio

    args = inference_gradio.build_parser().parse_args([])
    assert args.server_name == "127.0.0.1" and args.share is False and args.server_port is None


def test_script_rejects_unknown_switching_and_progress(capsys):
    import inference_gradio

    for flag in ("--switching", "--progress", "--demo_family"):
        with pytest.raises(SystemExit) as caught:
            inference_gradio.main([flag, "sometimes"])
        assert caught.value.code == 2
        assert "invalid choice: 'sometimes'" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_removes_the_pages_files(tmp_path):
    """``inference_gradio.py --demo`` as a service manager stops it: after SIGTERM nothing the page made is
    left in the temporary folder (its outputs, its selection logs, its served folder, the demo model)."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx
    from conftest import ROOT
    from gradio_client import Client

    temp = tmp_path / "tmp"
    temp.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, TMPDIR=str(temp), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("GRADIO_TEMP_DIR", None)  # gradio's shared folder is then TMPDIR/gradio
    server = subprocess.Popen([sys.executable, str(ROOT / "inference_gradio.py"), "--demo", "--demo_family", "sdxl",
                               "--server_port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, server.communicate()
            try:
                if httpx.get(f"{url}/config").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the page never answered"
            time.sleep(0.5)
        client = Client(url, verbose=False)
        set_stack(client, uploads=[str(next(temp.rglob("demo_style_lora.safetensors")))])  # an upload
        call(client, steps=2, width=64, height=64)
        made = {path.name.split("-")[1] for path in temp.rglob("klora-*") if path.is_dir()}
        assert made == {"gradio", "page"}  # the demo's scratch folder; the page's outputs and served folder
        assert len(list(temp.rglob("klora-page-*"))) == 2
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, err
    left = sorted(str(path.relative_to(temp)) for path in temp.rglob("*"))
    assert not [path for path in left if "klora" in path], left
    assert not [path for path in temp.rglob("*") if path.is_file()], left


@pytest.fixture
def launched(monkeypatch):
    """Runs ``inference_gradio.main`` up to the launch; returns the Studio and serve() arguments it got."""
    import klora.app

    seen = {}
    real_build_app = klora.app.build_app

    def build_app(studio, **kwargs):
        seen["studio"] = studio
        seen["page"] = real_build_app(studio, **kwargs)
        return seen["page"]

    def serve(demo, limits, **kwargs):
        seen["serve"] = kwargs
        result = seen["studio"].generate(seen["studio"].defaults.prompt, seed=1)  # its files go when the page closes
        seen["generated"] = (result, decoded(result.video) if result.video else None,
                             read_json(result.selection_log))

    monkeypatch.setattr(klora.app, "build_app", build_app)
    monkeypatch.setattr(klora.app, "serve", serve)
    return seen


@pytest.mark.slow
def test_script_demo_of_a_video_family_with_launch_options(launched):
    """``--demo --demo_family wan22``: the family, switching, progress and frame flags reach the page."""
    import inference_gradio

    inference_gradio.main(["--demo", "--demo_family", "wan22", "--switching", "adapters", "--progress", "noise",
                           "--num_frames", "9", "--fps", "10"])
    studio = launched["studio"]
    assert studio.family.name == "Wan" and studio.klora.multi and studio.video
    assert (studio.klora.switching, studio.klora.progress_mode) == ("adapters", "noise")
    d = studio.defaults
    assert (d.prompt, d.steps, d.height, d.width, d.num_frames, d.fps) == (inference_gradio.DEMO_PROMPT, 8, 16, 16,
                                                                           9, 10)
    assert launched["serve"]["server_name"] == "127.0.0.1"
    result, clip, log = launched["generated"]
    assert clip.shape == (9, 16, 16, 3) and result.image is None
    assert log["progress"] == "noise" and log["switching"] == "adapters"
    assert studio.klora._detached  # the script closed the page: LoRAs detached


@pytest.mark.parametrize("args, message", [
    (["--demo", "--demo_family", "wan22", "--num_frames", "6"],
     r"--num_frames 6: Wan takes 4k \+ 1 \(1, 5, 9, \.\.\.\) frames"),
    (["--demo", "--demo_family", "wan22", "--fps", "0"], "--fps 0: must be from 1 to 120"),
    (["--demo", "--demo_family", "sdxl", "--num_frames", "5"],
     "--num_frames: Stable Diffusion XL makes images, not videos"),
])
def test_script_checks_video_flags_against_the_model(launched, args, message):
    import inference_gradio
    from klora.errors import KLoRAError

    with pytest.raises(KLoRAError, match=message):
        inference_gradio.main(args)
    assert "studio" not in launched  # refused before any LoRA was attached


def test_script_offers_beta_from_dino_with_dino_model(launched, tiny_dino):
    """``--dino_model`` loads the ViT at start and the page offers EST-LoRA's beta from DINO; without it the
    checkbox is there but off; a video model refuses it."""
    import inference_gradio
    from klora.errors import KLoRAError

    def dino_checkbox(page):
        return next(block for block in page.blocks.values() if getattr(block, "elem_id", None) == "beta-from-dino")

    with pytest.raises(KLoRAError, match=r"^--dino_model: beta from DINO compares two pictures \(EST-LoRA, for image "
                                         r"models\); Wan makes videos \(drop --dino_model\)$"):
        inference_gradio.main(["--demo", "--demo_family", "wan22", "--dino_model", tiny_dino])
    assert "studio" not in launched
    inference_gradio.main(["--demo", "--demo_family", "sdxl", "--dino_model", tiny_dino])
    studio, page = launched["studio"], launched["page"]
    assert studio.embedder.name == tiny_dino and studio.embedder_label == Path(tiny_dino).name
    assert dino_checkbox(page).interactive is True
    inference_gradio.main(["--demo", "--demo_family", "sdxl"])
    assert launched["studio"].embedder is None and dino_checkbox(launched["page"]).interactive is False


@pytest.mark.slow
def test_every_demo_family_generates_through_the_page(tmp_path):
    """``--demo --demo_family FAMILY`` for every tiny model: the page's Studio makes an image of the asked size or a
    clip of the asked frames, with one logged K-LoRA step per denoising step."""
    import inference_gradio
    from klora.app import Defaults, Studio

    for family in inference_gradio.DEMO_IMAGE + inference_gradio.DEMO_VIDEO:
        args = inference_gradio.build_parser().parse_args(["--demo", "--demo_family", family])
        pipe, initial, call_kwargs = inference_gradio._prepare_demo(args, tmp_path / family)
        defaults = Defaults.for_pipeline(pipe, **initial)
        studio = Studio(pipe, args.lora_name_or_path_content, args.lora_name_or_path_style, call_kwargs=call_kwargs,
                        defaults=defaults)
        try:
            result = studio.generate(PROMPT, "blurry", steps=2, seed=1)
            if studio.video:
                assert result.frames.shape == (defaults.num_frames, defaults.height, defaults.width, 3), family
                assert decoded(result.video).shape == result.frames.shape, family
            else:
                assert result.image.size == (defaults.width, defaults.height), family
            assert len(read_json(result.selection_log)["generations"][0]["steps"]) == 2, family
        finally:
            studio.close()
