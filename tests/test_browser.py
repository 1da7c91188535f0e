"""``inference_gradio.py --demo`` as a user runs it, checked over HTTP and in headless Chromium.

Two scripts are started once for this module, side by side: ``--demo`` (the
trained world, an image page) and ``--demo --demo_family wan22`` (tiny Wan 2.2, a video page). The
browser tests need Debian's ``chromium`` (``.ci/run`` installs it) and the
``playwright`` Python package, which drives that browser instead of
downloading its own.

``KLORA_UPDATE_SCREENSHOT=1 python -m pytest tests/test_browser.py`` also
writes the page's screenshot to ``pictures/gradio_demo.png`` for the README.
"""

import functools
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
# As root on a machine without network: no sandbox, and no background connections to Google.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]
DEMO_PROMPT = "a sbu toy in szn style"  # klora.world.FUSED_PROMPT
DEMO_STEPS = 50  # klora.world_eval.STEPS: the world demo's step count
SCREENSHOT = ROOT / "pictures" / "gradio_demo.png"
# Every field of the page's /generate endpoint, at the world demo's values.
FIELDS = dict(prompt=DEMO_PROMPT, negative_prompt="", method="klora", pattern="s*", alpha=1.5, beta=None, steps=4,
              guidance=5.0, true_cfg=1.0, seed=5, random_seed=False, width=32, height=32, num_frames=1, fps=16,
              np_mu=0.5, hard_projection=False, switch_every=5, beta_from_dino=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_demo(family: str, log) -> tuple[subprocess.Popen, int]:
    """``python inference_gradio.py --demo --demo_family FAMILY --server_port N``, output to ``log``; no wait."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False",
               OMP_NUM_THREADS="1")
    with open(log, "w") as out:
        family_flags = ["--demo_family", family] if family != "world" else []  # the world: plain --demo
        process = subprocess.Popen([sys.executable, str(ROOT / "inference_gradio.py"), "--demo", *family_flags,
                                    "--server_port", str(port)], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    return process, port


def wait_until_serving(process, port: int, log, family: str) -> None:
    deadline = time.monotonic() + 240
    while True:
        if process.poll() is not None:
            pytest.fail(f"inference_gradio.py --demo --demo_family {family} exited with {process.returncode}:\n"
                        f"{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            if "Running on local URL" in log.read_text():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"inference_gradio.py --demo --demo_family {family} did not serve within 240 s:\n"
                        f"{log.read_text()}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def demo_servers(tmp_path_factory):
    """The image and the video demo, started together; {family: (url, port, log path)}."""
    folder = tmp_path_factory.mktemp("gradio")
    started = {family: (*start_demo(family, folder / f"{family}.log"), folder / f"{family}.log")
               for family in ("world", "wan22")}
    try:
        for family, (process, port, log) in started.items():
            wait_until_serving(process, port, log, family)
        yield {family: (f"http://127.0.0.1:{port}/", port, log) for family, (_, port, log) in started.items()}
    finally:
        for process, _, _ in started.values():
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def demo_server(demo_servers):
    return demo_servers["world"]


@pytest.fixture(scope="module")
def video_server(demo_servers):
    return demo_servers["wan22"]


@pytest.fixture(scope="module")
def demo_reference():
    """The demo's image by the library alone, from the shipped world and its two LoRAs."""
    from klora import world_eval
    from klora.fusion import KLoRA
    from klora.pipelines import load_pipeline

    pipe = load_pipeline(str(world_eval.MODEL), "unet", "cpu")

    @functools.cache
    def run(steps, seed, pattern="s*", size=32, method="klora", switch_every=5):
        """(image, selection log) of the demo's settings."""
        klora = KLoRA(pipe, str(world_eval.SUBJECT_LORA), str(world_eval.STYLE_LORA), pattern=pattern, method=method,
                      switch_every=switch_every)
        try:
            image = pipe(prompt=DEMO_PROMPT, num_inference_steps=steps, guidance_scale=5.0, height=size, width=size,
                         generator=torch.Generator("cpu").manual_seed(seed)).images[0]
            return image, klora.selection_log()
        finally:
            klora.detach()

    return run


@pytest.fixture(scope="module")
def video_reference(tmp_path_factory):
    """``--demo --demo_family wan22``'s clip by the library alone: the same tiny Wan 2.2 and LoRAs (same seeds),
    its frames written as inference_video.py writes them. ``run(seed) -> (MP4 path, selection log)``."""
    from klora import video
    from klora.fusion import KLoRA
    from klora.pipelines import load_pipeline
    from klora.tiny_video import TINY_VIDEO_CALL_KWARGS, TINY_VIDEO_SIZES, build_tiny_video, write_demo_video_loras

    folder = tmp_path_factory.mktemp("wan22-reference")
    pipe = load_pipeline(build_tiny_video("wan22", folder / "model"), device="cpu")
    loras = write_demo_video_loras(pipe.transformer, folder)
    height, width, frames = TINY_VIDEO_SIZES["wan22"]

    def run(seed):
        with KLoRA(pipe, *loras) as klora:
            clip = pipe(prompt=DEMO_PROMPT, num_inference_steps=8, guidance_scale=5.0, height=height, width=width,
                        num_frames=frames, output_type="np", generator=torch.Generator("cpu").manual_seed(seed),
                        **TINY_VIDEO_CALL_KWARGS["wan22"]).frames[0]
            path = video.write_mp4(video.to_uint8(clip), folder / f"seed{seed}.mp4", 16, progress=False)
            return str(path), klora.selection_log()

    return run


def decoded(mp4) -> np.ndarray:
    import imageio

    with imageio.get_reader(mp4, format="FFMPEG") as reader:
        return np.stack([frame for frame in reader])


def same_log(got: dict, want: dict) -> bool:
    """Equal selection logs, except the LoRA labels: they name the files, and each process wrote its own."""
    def strip(log):
        return {key: value for key, value in log.items() if key not in ("content", "style")}

    return strip(got) == strip(want) and all(os.path.basename(want[role].strip("'")) in got[role]
                                             for role in ("content", "style"))


def same_pixels(got: Image.Image, want: Image.Image) -> bool:
    """Exactly equal: the page's process and this one run the same code on the same CPU."""
    return np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want.convert("RGB")))


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (Linux /proc)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            rows = f.read().splitlines()[1:]
        for line in rows:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]) if len(address) == 8
                          else address)
    return found


@pytest.mark.slow
def test_demo_script_starts_and_serves_the_library_image(demo_server, demo_reference):
    from gradio_client import Client

    url, port, _ = demo_server
    if sys.platform.startswith("linux"):
        assert listening_addresses(port) == {"127.0.0.1"}  # loopback only by default
    image, video, drawn, log, seed, summary = Client(url, verbose=False).predict(**FIELDS, api_name="/generate")
    assert seed == 5 and summary.startswith("Generated in") and video is None
    want_image, want_log = demo_reference(4, 5)
    assert same_pixels(Image.open(image), want_image)
    assert Image.open(drawn).size[0] >= 460  # a selection map, not an empty placeholder
    with open(log) as f:
        assert same_log(json.load(f), want_log)


@pytest.mark.slow
def test_video_demo_serves_the_library_clip(video_server, video_reference):
    from gradio_client import Client

    url, port, _ = video_server
    if sys.platform.startswith("linux"):
        assert listening_addresses(port) == {"127.0.0.1"}
    image, video, drawn, log, seed, summary = Client(url, verbose=False).predict(
        **{**FIELDS, "steps": 8, "seed": 3, "width": 16, "height": 16, "num_frames": 5}, api_name="/generate")
    assert image is None and "5 frames at 16 fps" in summary
    want_video, want_log = video_reference(3)
    clip = decoded(video)
    assert clip.shape == (5, 16, 16, 3) and np.array_equal(clip, decoded(want_video))
    with open(log) as f:
        assert same_log(json.load(f), want_log)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; "
                                              ".ci/run does it)")
def test_page_in_headless_chromium(demo_server, demo_reference, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, _, log = demo_server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#generate")
            expect(page.locator("#pattern input[value='s*']")).to_be_checked()  # the default pattern
            expect(page.locator("#method input[value='klora']")).to_be_checked()

            # Type a prompt and a seed, generate with the demo's other defaults (the world's steps, 32x32).
            page.locator("#prompt textarea").fill(DEMO_PROMPT)
            page.locator("#seed input").fill("5")
            page.click("#generate")
            expect(page.locator("#summary")).to_contain_text("Generated in", timeout=120_000)
            expect(page.locator("#summary")).to_contain_text(f"{DEMO_STEPS} of {DEMO_STEPS} steps")
            expect(page.locator("#summary")).to_contain_text("seed 5")
            shown = page.locator("#image img")
            expect(shown).to_be_visible()
            expect(page.locator("#selection img")).to_be_visible()
            png = page.request.get(shown.get_attribute("src")).body()
            want_image, want_log = demo_reference(DEMO_STEPS, 5)
            assert same_pixels(Image.open(io.BytesIO(png)), want_image)
            assert same_log(download_json(page), want_log)
            shot = tmp_path / "gradio_demo.png"
            page.screenshot(path=str(shot), full_page=True)
            assert Image.open(shot).size[0] == 1280
            if os.environ.get("KLORA_UPDATE_SCREENSHOT"):
                shutil.copyfile(shot, SCREENSHOT)

            # A rejected LoRA: the one-line message shows, and the page keeps working.
            page.get_by_text("Switch LoRAs").click()
            page.locator("#content-path textarea, #content-path input").first.fill("/no/such/lora.safetensors")
            page.click("#load-loras")
            expect(page.get_by_text("no such file or folder").first).to_be_visible(timeout=30_000)
            page.locator("#pattern input[value='s']").check()
            expect(page.locator("#beta input")).to_have_value("0.5")  # the pattern's own default beta
            set_number(page, "steps", 3)
            page.click("#generate")
            expect(page.locator("#summary")).to_contain_text("3 of 3 steps", timeout=60_000)
            expect(page.locator("#summary")).to_contain_text("pattern s, alpha 1.5, beta 0.5")
            png = page.request.get(page.locator("#image img").get_attribute("src")).body()
            assert same_pixels(Image.open(io.BytesIO(png)), demo_reference(3, 5, pattern="s")[0])

            # Each method shows its own knobs: NP-LoRA's mu, LoRA Switch's block, EST-LoRA's schedule (its beta
            # from DINO is off: this demo has no --dino_model).
            knobs = {"#schedule": "klora est", "#np-knobs": "np", "#switch-knobs": "switch", "#beta-from-dino": "est"}
            for method in ("np", "est", "switch"):
                page.locator(f"#method input[value='{method}']").check()
                for knob, methods in knobs.items():
                    if method in methods.split():
                        expect(page.locator(knob)).to_be_visible()
                    else:
                        expect(page.locator(knob)).to_be_hidden()
                if method == "est":
                    expect(page.locator("#beta-from-dino input")).to_be_disabled()
                    expect(page.locator("#beta-from-dino")).to_contain_text("--dino_model")
            expect(page.locator("#method")).to_contain_text("LoRA Switch: the content LoRA for steps 0-N")
            page.locator("#switch-every input").fill("2")
            page.click("#generate")
            expect(page.locator("#summary")).to_contain_text("switching every 2 steps", timeout=60_000)
            expect(page.locator("#selection img")).to_be_visible()  # a per-step method: its map
            png = page.request.get(page.locator("#image img").get_attribute("src")).body()
            want_image, want_log = demo_reference(3, 5, pattern="s", method="switch", switch_every=2)
            assert same_pixels(Image.open(io.BytesIO(png)), want_image)
            assert same_log(download_json(page), want_log)
            page.locator("#method input[value='klora']").check()

            # Cancel a long generation: the diffusers loop stops, the next one runs at once.
            set_number(page, "steps", 100)
            set_number(page, "width", 128)
            set_number(page, "height", 128)
            page.click("#generate")
            expect(page.locator("#image")).to_contain_text("denoising", timeout=60_000)
            page.click("#cancel")
            deadline = time.monotonic() + 60
            while "generation cancelled after" not in log.read_text():
                assert time.monotonic() < deadline, "the server never stopped the generation"
                time.sleep(0.2)
            set_number(page, "steps", 2)
            set_number(page, "width", 64)
            set_number(page, "height", 64)
            page.click("#generate")
            expect(page.locator("#summary")).to_contain_text("2 of 2 steps", timeout=60_000)
            assert "100/100" not in log.read_text()  # the long run never finished its loop
        finally:
            browser.close()


def set_number(page, elem_id: str, value: int) -> None:
    """Type into a slider's number box, as a user does."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    from playwright.sync_api import expect

    expect(page.locator(f"#{elem_id} input[type=range]")).to_have_value(str(value))


def download_json(page) -> dict:
    """Click the selection log's download link, as a user does; the downloaded file's JSON."""
    with page.expect_download() as download:
        page.locator("#selection-log a[download]").first.click()
    with open(download.value.path()) as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; "
                                              ".ci/run does it)")
def test_video_page_in_headless_chromium(video_server, video_reference):
    from playwright.sync_api import expect, sync_playwright

    url, _, _ = video_server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#generate")
            expect(page.locator("#model-info")).to_contain_text("Wan video model, WanPipeline")
            expect(page.locator("#image")).to_be_hidden()  # a video family: no image field
            expect(page.locator("#num-frames input[type=number]")).to_have_value("5")  # the demo's 4k + 1 frames
            page.locator("#prompt textarea").fill(DEMO_PROMPT)
            page.locator("#seed input").fill("7")
            page.click("#generate")
            expect(page.locator("#summary")).to_contain_text("Generated in", timeout=120_000)
            expect(page.locator("#summary")).to_contain_text("8 of 8 steps")
            expect(page.locator("#summary")).to_contain_text("5 frames at 16 fps")
            video = page.locator("#video video")
            expect(video).to_be_visible()
            source = video.get_attribute("src")
            assert source and source.endswith(".mp4")
            # Chromium itself decodes it: its metadata arrives and the duration is 5 frames at 16 fps.
            page.wait_for_function("el => el.readyState >= 1", arg=video.element_handle(), timeout=30_000)
            assert abs(video.evaluate("el => el.duration") - 5 / 16) < 0.05
            expect(page.locator("#selection img")).to_be_visible()
            want_video, want_log = video_reference(7)
            mp4 = page.request.get(source).body()
            assert mp4 == open(want_video, "rb").read()  # the same frames, encoded the same way
            assert same_log(download_json(page), want_log)
            if os.environ.get("KLORA_VIDEO_SCREENSHOT"):  # a path: where to keep a look at the video page
                page.screenshot(path=os.environ["KLORA_VIDEO_SCREENSHOT"], full_page=True)
        finally:
            browser.close()
