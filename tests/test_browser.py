"""``inference_gradio.py --demo`` as a user runs it, checked over HTTP and in headless Chromium.

The script is started once for this module. The browser test needs Debian's
``chromium`` (``.ci/run`` installs it) and the ``playwright`` Python package,
which drives that browser instead of downloading its own.

``KLORA_UPDATE_SCREENSHOT=1 python -m pytest tests/test_browser.py`` also
writes the page's screenshot to ``pictures/gradio_demo.png`` for the README.
"""

import functools
import io
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
DEMO_PROMPT = "a sbu dog in szn style"  # inference_gradio.DEMO_PROMPT
SCREENSHOT = ROOT / "pictures" / "gradio_demo.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """``python inference_gradio.py --demo --server_port N``; yields (url, port, log path)."""
    log = tmp_path_factory.mktemp("gradio") / "server.log"
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False",
               OMP_NUM_THREADS="1")
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "inference_gradio.py"), "--demo",
                                    "--server_port", str(port)], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"inference_gradio.py --demo exited with {process.returncode}:\n{log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
                if "Running on local URL" in log.read_text():
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"inference_gradio.py --demo did not serve within 240 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield url, port, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def demo_reference(tiny_sdxl_dir, demo_sdxl_loras):
    """The demo's image by the library alone: the conftest builds the same tiny model and LoRAs (same seeds)."""
    from klora.fusion import KLoRA
    from klora.pipelines import load_pipeline

    pipe = load_pipeline(tiny_sdxl_dir, "unet", "cpu")

    @functools.cache
    def run(steps, seed, pattern="s*", size=64):
        klora = KLoRA(pipe, *demo_sdxl_loras, pattern=pattern)
        try:
            return pipe(prompt=DEMO_PROMPT, num_inference_steps=steps, guidance_scale=5.0, height=size, width=size,
                        generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        finally:
            klora.detach()

    return run


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
    image, drawn, seed, summary = Client(url, verbose=False).predict(
        DEMO_PROMPT, "", "klora", "s*", 1.5, None, 4, 5.0, 5, False, 64, 64, api_name="/generate")
    assert seed == 5 and summary.startswith("Generated in")
    assert same_pixels(Image.open(image), demo_reference(4, 5))
    assert Image.open(drawn).size[0] >= 460  # a selection map, not an empty placeholder


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

            # Type a prompt and a seed, generate with the demo's other defaults (20 steps, 64x64).
            page.locator("#prompt textarea").fill(DEMO_PROMPT)
            page.locator("#seed input").fill("5")
            page.click("#generate")
            expect(page.locator("#summary")).to_contain_text("Generated in", timeout=120_000)
            expect(page.locator("#summary")).to_contain_text("20 of 20 steps")
            expect(page.locator("#summary")).to_contain_text("seed 5")
            shown = page.locator("#image img")
            expect(shown).to_be_visible()
            expect(page.locator("#selection img")).to_be_visible()
            png = page.request.get(shown.get_attribute("src")).body()
            assert same_pixels(Image.open(io.BytesIO(png)), demo_reference(20, 5))
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
            assert same_pixels(Image.open(io.BytesIO(png)), demo_reference(3, 5, pattern="s"))

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
