"""The gradio page over HTTP: what the page returns equals a direct library call.

The app is built in-process on the tiny SDXL (``klora.app``), launched on
127.0.0.1 and called with ``gradio_client`` like any API user. Every image and
selection map is compared with ``KLoRA`` attached afresh to a separately loaded
pipeline with the same settings and seed. ``tests/test_browser.py`` runs the
real ``inference_gradio.py`` script.
"""

import math
import time

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


def pixels(image_or_path) -> np.ndarray:
    image = Image.open(image_or_path) if isinstance(image_or_path, str) else image_or_path
    return np.asarray(image.convert("RGB"))


# --- the app and an independent reference ---------------------------------------


@pytest.fixture(scope="module")
def app(tiny_sdxl_dir, demo_sdxl_loras):
    from gradio_client import Client

    from klora.app import Defaults, Limits, Studio, build_app, serve
    from klora.pipelines import load_pipeline

    content, style = demo_sdxl_loras
    studio = Studio(load_pipeline(tiny_sdxl_dir, "unet", "cpu"), content, style,
                    limits=Limits(max_steps=3000, max_side=256, max_prompt_chars=200),
                    defaults=Defaults(prompt=PROMPT, steps=3, size=64))
    demo = build_app(studio)
    serve(demo, studio.limits, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, studio, Client(demo.local_url, verbose=False)
    finally:
        demo.close()
        studio.close()


@pytest.fixture(scope="module")
def reference(tiny_sdxl_dir):
    """``reference(content, style, *settings) -> (image, selection map or None)`` by the library alone."""
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
            drawn = selection_map.render(klora.selection_log()) if method == "klora" else None
            return image, drawn
        finally:
            klora.detach()

    return run


def call(client, method="klora", pattern="s*", alpha=1.5, beta=None, steps=3, guidance=5.0, seed=3, width=64,
         height=64, negative="", prompt=PROMPT, random_seed=False):
    return client.predict(prompt, negative, method, pattern, alpha, beta, steps, guidance, seed, random_seed,
                          width, height, api_name="/generate")


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

    for settings, (want_image, want_map) in zip(SETTINGS, expected):
        method, pattern, alpha, beta, steps, guidance, seed, width, height, negative = settings
        image, drawn, used_seed, summary = call(client, method, pattern, alpha, beta, steps, guidance, seed,
                                                width, height, negative)
        assert np.array_equal(pixels(image), pixels(want_image)), settings
        if method == "klora":
            assert np.array_equal(pixels(drawn), pixels(want_map)), settings
        else:
            assert drawn is None  # no K-LoRA choices were made: no map, not a stale one
        assert used_seed == seed
        assert summary.startswith("Generated in ") and f"{steps} of {steps} steps" in summary

    assert counts(loads) == {"pipelines": 0, "models": 0, "lora reads": 0, "attach": 0, "detach": 0}
    assert studio.klora is klora_before and studio.pipe.unet is unet_before
    # The settings really changed between calls (otherwise the images above prove little).
    assert not np.array_equal(pixels(expected[0][0]), pixels(expected[2][0]))
    assert not np.array_equal(pixels(expected[0][1]), pixels(expected[1][1]))


def test_random_seed_is_reported_and_reproducible(app, reference, demo_sdxl_loras):
    _, _, client = app
    first = call(client, seed=0, random_seed=True)
    second = call(client, seed=0, random_seed=True)
    assert first[2] != second[2]  # two draws from 2**32 seeds
    want, _ = reference(*demo_sdxl_loras, "klora", "s*", 1.5, None, 3, 5.0, first[2], 64, 64, "")
    assert np.array_equal(pixels(first[0]), pixels(want))
    assert f"seed {first[2]}" in first[3]


# --- bad inputs: a visible error, and the app keeps serving -----------------------

@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "less than minimum"),
    ({"steps": 3001}, "greater than maximum"),
    ({"width": 60}, "width must be a multiple of 8"),
    ({"height": 512}, "greater than maximum"),
    ({"prompt": "x" * 201}, "at most 200"),
    ({"prompt": "   "}, "type a prompt"),
    ({"negative": "x" * 201}, "negative prompt is 201 characters"),
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
    image, drawn, _, _ = call(client)
    want_image, want_map = reference(*demo_sdxl_loras, *SETTINGS[0])
    assert np.array_equal(pixels(image), pixels(want_image))
    assert np.array_equal(pixels(drawn), pixels(want_map))


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
    want_image, want_map = reference(*demo_sdxl_loras, *SETTINGS[0])
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
    image, drawn, _, _ = call(client)
    assert np.array_equal(pixels(image), pixels(want_image))
    assert np.array_equal(pixels(drawn), pixels(want_map))


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
    want_image, want_map = reference(content, style, *SETTINGS[0])
    image, drawn, _, _ = call(client)
    assert np.array_equal(pixels(image), pixels(want_image))
    assert np.array_equal(pixels(drawn), pixels(want_map))


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
        for settings, (want_image, want_map) in zip(SETTINGS[:2], swapped):
            image, drawn, _, _ = call(client, *settings[:6], settings[6], *settings[7:])
            assert np.array_equal(pixels(image), pixels(want_image)), settings
            assert np.array_equal(pixels(drawn), pixels(want_map)), settings
        # One role only: the other LoRA stays.
        info = switch(client, style_path=style)
        assert "content LoRA (uploaded 'demo_style_lora.safetensors')" in info
        assert f"style LoRA '{style}'" in info
    finally:
        switch(client, content_path=content, style_path=style)
    image, _, _, _ = call(client)
    assert np.array_equal(pixels(image), pixels(reference(content, style, *SETTINGS[0])[0]))


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
    long_job = client.submit(PROMPT, "", "klora", "s*", 1.5, None, 3000, 5.0, 3, False, 64, 64, api_name="/generate")
    deadline = time.monotonic() + 60
    while not (studio.klora.generations and studio.klora.generations[-1].num_inference_steps == 3000
               and len(studio.klora.generations[-1].steps) >= 3):
        assert time.monotonic() < deadline, "the long generation never started"
        time.sleep(0.05)
    short_job = other.submit(PROMPT, "", "klora", "s*", 1.5, None, 3, 5.0, 3, False, 64, 64, api_name="/generate")
    time.sleep(1.0)
    assert short_job.status().code == Status.IN_QUEUE  # gradio's queue holds it: one generation at a time
    other.predict(api_name="/cancel")  # that session has nothing running: nothing happens
    time.sleep(0.3)
    assert not long_job.done()

    cancelled_at = time.monotonic()
    client.predict(api_name="/cancel")
    with pytest.raises(AppError, match=r"cancelled after \d+ of 3000 steps"):
        long_job.result(timeout=60)
    image, drawn, _, _ = short_job.result(timeout=60)

    (_, long_end, long_steps), (short_start, _, short_steps) = runs
    assert long_steps == 3000 and short_steps == 3
    assert long_end - cancelled_at < 10  # the diffusers loop stopped: 3000 steps take minutes here
    assert long_end <= short_start  # never two generations at once
    want_image, want_map = reference(*demo_sdxl_loras, *SETTINGS[0])
    assert np.array_equal(pixels(image), pixels(want_image))  # the other session's job ran in full
    assert np.array_equal(pixels(drawn), pixels(want_map))


# --- serving rules --------------------------------------------------------------------

def test_binds_loopback_and_serves_no_named_path(app, demo_sdxl_loras, tiny_sdxl_dir):
    import os

    import httpx

    demo, _, client = app
    assert demo.local_url.startswith("http://127.0.0.1:")
    image, _, _, _ = call(client)
    base = demo.local_url.rstrip("/")
    # The generated image is served from gradio's cache ...
    assert httpx.get(f"{base}/gradio_api/file={image}").status_code == 200
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


# --- FLUX, lightly ---------------------------------------------------------------------

@pytest.mark.slow
def test_flux_page_matches_the_library(tiny_flux_dir, tmp_path):
    from diffusers import FluxTransformer2DModel
    from gradio_client import Client

    from klora import selection_map
    from klora.app import Defaults, Studio, build_app, serve
    from klora.fusion import KLoRA
    from klora.pipelines import load_pipeline
    from klora.tiny import write_demo_loras

    content, style = write_demo_loras(
        FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer"), tmp_path)
    studio = Studio(load_pipeline(tiny_flux_dir, "transformer", "cpu"), content, style,
                    defaults=Defaults.for_family("transformer", size=64))
    demo = build_app(studio)
    serve(demo, studio.limits, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        image, drawn, _, _ = client.predict(PROMPT, "", "klora", "s*", 1.5, None, 3, 3.5, 5, False, 64, 48,
                                            api_name="/generate")
        from gradio_client.exceptions import AppError

        with pytest.raises(AppError, match="width must be a multiple of 16"):
            client.predict(PROMPT, "", "klora", "s*", 1.5, None, 3, 3.5, 5, False, 56, 48, api_name="/generate")
    finally:
        demo.close()
        studio.close()
    pipe = load_pipeline(tiny_flux_dir, "transformer", "cpu")
    klora = KLoRA(pipe, content, style)
    want = pipe(prompt=PROMPT, num_inference_steps=3, guidance_scale=3.5, height=48, width=64,
                generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert np.array_equal(pixels(image), pixels(want))
    assert np.array_equal(pixels(drawn), pixels(selection_map.render(klora.selection_log())))


def test_model_family_from_model_index(tiny_sdxl_dir, tiny_flux_dir, tmp_path):
    from klora.app import model_family
    from klora.errors import KLoRAError

    assert model_family(tiny_sdxl_dir) == "unet"
    assert model_family(tiny_flux_dir) == "transformer"
    with pytest.raises(KLoRAError, match="no model_index.json"):
        model_family(str(tmp_path))


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
