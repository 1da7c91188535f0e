"""A real ComfyUI server for the tests, with this repository installed as a node pack.

``Server(base)`` lays out a base directory as ComfyUI's ``--base-directory`` wants it: the
repository linked into ``custom_nodes/`` (as users install the pack), the test-only nodes of
``tests/comfy_test_nodes`` beside it, and empty ``models/``, ``input/``, ``output/``, ``user/`` and
``temp/`` folders. ``start()`` runs the checkout's own ``main.py --cpu`` on 127.0.0.1 and a free port;
``run(prompt)`` submits an API-format workflow with ``POST /prompt`` and polls ``/history/<id>``
until it completes. Nothing is ever written into the checkout (``PYTHONDONTWRITEBYTECODE`` too).

Also: ``write_wan_file``, a tiny Wan 2.1/2.2 T2V file that ``UNETLoader`` detects (dim 128 gives
one head; Wan's text context is 4096 wide), and ``checkout_state`` to prove the checkout unchanged.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import comfy_models as cm

ROOT = Path(__file__).resolve().parent.parent
TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes"
PACK_NAME = "ComfyUI-K-LoRA"  # the folder name users clone into custom_nodes/
# Wan 2.1/2.2 T2V as UNETLoader detects it from a file: heads = dim // 128, freq_dim 256, text_dim 4096.
WAN_FILE = dict(dim=128, ffn_dim=256, freq_dim=256, text_dim=4096, num_heads=1, num_layers=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkout_state(path) -> dict:
    """{relative path: (size, mtime)} of every file of the ComfyUI checkout."""
    root = Path(path)
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def write_wan_file(path, seed: int = 0):
    """A tiny Wan T2V diffusion-model file (ComfyUI's own WAN21_T2V class, seeded weights) for UNETLoader."""
    tiny = cm.build("wan21", seed=seed, unet_overrides=WAN_FILE)
    from safetensors.torch import save_file

    state = {k.removeprefix("diffusion_model."): v.contiguous()
             for k, v in tiny.model.state_dict().items() if k.startswith("diffusion_model.")}
    save_file(state, str(path))
    return tiny


class Server:
    """ComfyUI's ``main.py`` with this repository in ``custom_nodes/``; output goes to ``log``."""

    def __init__(self, base, pack=ROOT, test_nodes: bool = True):
        self.base = Path(base)
        self.comfyui = cm.checkout()
        for folder in ("custom_nodes", "models/loras", "models/diffusion_models", "input", "output", "user",
                       "temp"):
            (self.base / folder).mkdir(parents=True, exist_ok=True)
        (self.base / "custom_nodes" / PACK_NAME).symlink_to(Path(pack).resolve(), target_is_directory=True)
        if test_nodes:
            (self.base / "custom_nodes" / "klora_test_nodes").symlink_to(TEST_NODES, target_is_directory=True)
        self.log = self.base / "server.log"
        self.port = None
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def loras(self) -> Path:
        return self.base / "models" / "loras"

    @property
    def diffusion_models(self) -> Path:
        return self.base / "models" / "diffusion_models"

    @property
    def output(self) -> Path:
        return self.base / "output"

    def start(self, timeout: float = 300):
        self.port = free_port()
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   **{cm.ENV: str(self.comfyui)})
        command = [sys.executable, str(self.comfyui / "main.py"), "--cpu", "--listen", "127.0.0.1",
                   "--port", str(self.port), "--base-directory", str(self.base), "--disable-api-nodes",
                   "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(command, cwd=self.base, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            try:
                self.get("/object_info/KSampler")
                return self
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log_text()[-4000:]}")
            time.sleep(0.5)

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    # --- HTTP ---

    def get(self, path: str, raw: bool = False):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            body = response.read()
        return body if raw else json.loads(body)

    def post(self, path: str, payload: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:  # a prompt that fails validation: 400 with the reasons
            raise PromptRejected(error.read().decode(errors="replace")) from None

    def submit(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The ``/history`` entry of a prompt once ComfyUI has finished it (successfully or not)."""
        deadline = time.monotonic() + timeout
        while True:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry is not None and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log_text()[-3000:]}")
            time.sleep(0.2)

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Submit ``prompt`` and return its history entry; raises ``PromptFailed`` unless it succeeded."""
        entry = self.wait(self.submit(prompt), timeout)
        if entry["status"]["status_str"] != "success":
            raise PromptFailed(error_of(entry) or entry["status"])
        return entry

    def view(self, image: dict) -> bytes:
        """A saved file as the page fetches it (``GET /view``), from an ``outputs`` entry of the history."""
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        return self.get(f"/view?{query}", raw=True)


class PromptRejected(Exception):
    """``POST /prompt`` answered 400: the workflow did not validate."""


class PromptFailed(Exception):
    """A prompt ran and ended in an error."""


def error_of(entry: dict) -> dict | None:
    """The ``execution_error`` message of a history entry, or None."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return data
    return None
