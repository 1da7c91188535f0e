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
import time
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
]
# Every field of the /generate endpoint (the same for every family; fields a pipeline does not take are ignored).
FIELDS = dict(prompt=PROMPT, negative_prompt="", method="klora", pattern="s*", alpha=1.5, beta=None, steps=3,
              guidance=5.0, true_cfg=1.0, seed=3, random_seed=False, width=64, height=64, num_frames=1, fps=16)


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
    """``reference(content, style, *settings) -> (image, selection map or None, selection log or None)``
    by the library alone."""
    from klora import selection_map
    from klora.fusion import KLoRA
    from klora.pipelines import load_pipeline

    pipe = load_pipeline(tiny_sdxl_dir, "unet", "cpu")

    def run(content, style, method, pattern, alpha, beta, steps, guidance, seed, width, height, negative):
        klora = KLoRA(pipe, content, style, pattern=pattern, alpha=alpha, beta=beta, method=method)
        try:
            kwargs = {"negative_prompt": negative} if negative else {}
            image = pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=height,
                         width=width, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images[0]
            if method != "klora":
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
        if method == "klora":
            assert np.array_equal(pixels(reply.selection_map), pixels(want_map)), settings
            # The JSON offered for download is the library's own log of the same run.
            assert read_json(reply.selection_log) == want_log, settings
        else:
            # No K-LoRA choices were made: no map and no log, not stale ones.
            assert reply.selection_map is None and reply.selection_log is None
        assert reply.seed == seed
        assert reply.summary.startswith("Generated in ") and f"{steps} of {steps} steps" in reply.summary

    assert counts(loads) == {"pipelines": 0, "models": 0, "lora reads": 0, "attach": 0, "detach": 0}
    assert studio.klora is klora_before and studio.pipe.unet is unet_before
    # The settings really changed between calls (otherwise the images above prove little).
    assert not np.array_equal(pixels(expected[0][0]), pixels(expected[2][0]))
    assert not np.array_equal(pixels(expected[0][1]), pixels(expected[1][1]))
    assert expected[0][2]["generations"] != expected[1][2]["generations"]


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
    ({"alpha": 0}, "less than minimum"),
    ({"seed": -1}, "less than minimum"),
])
def test_out_of_range_inputs_give_a_visible_error(app, change, message):
    from gradio_client.exceptions import AppError

    _, _, client = app
    with pytest.raises(AppError, match=message):
        call(client, **change)


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


@pytest.mark.parametrize("field, value, message", [
    ("alpha", math.nan, "alpha must be in"), ("alpha", 11.0, "alpha must be in"), ("beta", math.inf, "beta must be in"),
    ("guidance", -1.0, "guidance must be in"), ("steps", 2.5, "steps must be a whole number"),
    ("seed", 2**32, "seed must be a whole number"), ("height", 264, "height must be a multiple of 8 from 8 to 256"),
])
def test_studio_checks_what_the_page_cannot(app, field, value, message):
    """Direct callers of ``Studio.generate`` (and API values the widgets let through) get the same checks."""
    from klora.errors import KLoRAError

    _, studio, _ = app
    with pytest.raises(KLoRAError, match=message):
        studio.generate(PROMPT, **{field: value})


# --- switching LoRAs in the page -------------------------------------------------

def switch(client, content_path="", content_upload=None, style_path="", style_upload=None):
    from gradio_client import handle_file

    return client.predict(content_path, handle_file(content_upload) if content_upload else None, "",
                          style_path, handle_file(style_upload) if style_upload else None, "",
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
        attempts.append(args[1].label)
        if len(attempts) == 1:
            raise LoRAError("content LoRA 'x': could not be loaded (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(klora.app, "KLoRA", fails_once)
    with pytest.raises(AppError, match="simulated"):
        switch(client, content_path=style)
    assert len(attempts) == 2 and style in attempts[0] and content in attempts[1]
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
        assert f"style LoRA '{content}'" in info
        assert counts(loads) == {"pipelines": 0, "models": 0, "lora reads": 2, "attach": 1, "detach": 1}
        for settings, (want_image, want_map, _) in zip(SETTINGS[:2], swapped):
            reply = call_with(client, settings)
            assert np.array_equal(pixels(reply.image), pixels(want_image)), settings
            assert np.array_equal(pixels(reply.selection_map), pixels(want_map)), settings
        # One role only: the other LoRA stays.
        info = switch(client, style_path=style)
        assert "content LoRA (uploaded 'demo_style_lora.safetensors')" in info
        assert f"style LoRA '{style}'" in info
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
        switch_handler(demo_sdxl_loras[1], None, "", "", None, "")
    assert studio.klora is klora_before


# --- extra LoRAs and strengths ---------------------------------------------------------

def set_stack(client, extra_paths="", uploads=None, upload_scales="", content_scale=1.0, style_scale=1.0):
    from gradio_client import handle_file

    return client.predict(extra_paths, [handle_file(u) for u in uploads] if uploads else None, upload_scales,
                          content_scale, style_scale, api_name="/set_stack")


def test_extra_loras_and_strengths_on_the_page_match_the_library(app, demo_sdxl_loras, tiny_sdxl_dir):
    from gradio_client.exceptions import AppError

    from klora.fusion import KLoRA
    from klora.pipelines import load_pipeline

    _, studio, client = app
    content, style = demo_sdxl_loras
    pipe = load_pipeline(tiny_sdxl_dir, "unet", "cpu")
    klora = KLoRA(pipe, content, style, extra_loras=[(style, 0.5), (content, -0.25)], content_scale=0.8)
    want = pipe(prompt=PROMPT, num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                generator=torch.Generator("cpu").manual_seed(3)).images[0]
    want_log = klora.selection_log()
    klora.detach()
    try:
        info = set_stack(client, f"{style} 0.5", uploads=[content], upload_scales="-0.25", content_scale=0.8)
        assert f"extra LoRA 1 '{style}' at scale 0.5" in info
        assert "extra LoRA (uploaded 'demo_content_lora.safetensors') at scale -0.25" in info
        assert "strengths: content 0.8, style 1" in info
        reply = call(client)
        assert np.array_equal(pixels(reply.image), pixels(want))
        log = read_json(reply.selection_log)
        assert log["generations"] == want_log["generations"] and log["layers"] == want_log["layers"]
        for fields, message in ((dict(extra_paths=f"{style} 0"), "finite number other than 0"),
                                (dict(uploads=[content], upload_scales="x"), "numbers, e.g. 0.8"),
                                (dict(extra_paths="/no/such.safetensors"), "no such file or folder"),
                                (dict(content_scale=0), "content scale must be a number other than 0")):
            with pytest.raises(AppError, match=message) as caught:
                set_stack(client, **fields)
            assert "\n" not in str(caught.value.message)
        assert np.array_equal(pixels(call(client).image), pixels(want))  # a refusal keeps the stack
    finally:
        info = set_stack(client)
    assert "extra LoRA" not in info and "strengths" not in info


# --- queue and cancel --------------------------------------------------------------

@pytest.mark.slow
def test_one_generation_at_a_time_and_cancel_stops_only_the_own_one(app, reference, demo_sdxl_loras,
                                                                   monkeypatch):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from gradio_client.utils import Status

    demo, studio, client = app
    other = Client(demo.local_url, verbose=False)
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

    demo, _, client = app
    assert demo.local_url.startswith("http://127.0.0.1:")
    reply = call(client)
    base = demo.local_url.rstrip("/")
    # The generated image and selection log are served from gradio's cache ...
    for path in (reply.image, reply.selection_log):
        assert httpx.get(f"{base}/gradio_api/file={path}").status_code == 200
    # ... the LoRA files, the model folder and the working directory are not.
    for path in (demo_sdxl_loras[0], os.path.join(tiny_sdxl_dir, "model_index.json"),
                 os.path.abspath("pyproject.toml"), "/etc/hostname"):
        assert httpx.get(f"{base}/gradio_api/file={path}").status_code in (403, 404), path


def test_serve_defaults(monkeypatch):
    from klora.app import Limits, serve

    seen = {}

    class FakeBlocks:
        def launch(self, **kwargs):
            seen.update(kwargs)

    serve(FakeBlocks(), Limits(max_upload="5mb"))
    assert seen["server_name"] == "127.0.0.1" and seen["share"] is False
    assert seen["allowed_paths"] == [] and seen["max_file_size"] == "5mb"


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

    def __init__(self, studio):
        self.studio = studio

    def __enter__(self):
        from gradio_client import Client

        from klora.app import build_app, serve

        self.demo = build_app(self.studio)
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
    assert read_json(reply.selection_log) == log
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
    assert got == log
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
        labels = studio.klora.labels
        assert (content in labels["content"] and style in labels["content_2"] and style in labels["style"]
                and content in labels["style_2"])
        assert studio.describe_loras().count("second expert") == 2
        studio.switch_loras(content=style)  # a new content LoRA goes into both experts
        assert set(studio.files) == {"content", "style", "style_2"}
        assert set(studio.klora.labels) == {"content", "style", "style_2"}
        assert style in studio.klora.labels["content"]
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
    assert got == log and (got["switching"], got["progress"]) == ("adapters", "noise")
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


@pytest.fixture
def launched(monkeypatch):
    """Runs ``inference_gradio.main`` up to the launch; returns the Studio and serve() arguments it got."""
    import klora.app

    seen = {}
    real_build_app = klora.app.build_app

    def build_app(studio, **kwargs):
        seen["studio"] = studio
        return real_build_app(studio, **kwargs)

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
    (["--demo", "--num_frames", "5"], "--num_frames: Stable Diffusion XL makes images, not videos"),
])
def test_script_checks_video_flags_against_the_model(launched, args, message):
    import inference_gradio
    from klora.errors import KLoRAError

    with pytest.raises(KLoRAError, match=message):
        inference_gradio.main(args)
    assert "studio" not in launched  # refused before any LoRA was attached


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
