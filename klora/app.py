"""The gradio page: one pipeline, one K-LoRA, one generation at a time.

``Studio`` holds the loaded pipeline and the attached ``KLoRA`` and does the
work (checks, generation, switching LoRAs); it knows nothing of gradio, so a
test can call it as a reference. ``build_app`` lays the page out over a
``Studio`` and turns its ``KLoRAError``\\ s into visible ``gr.Error``\\ s;
``serve`` launches it with the serving rules of ``inference_gradio.py``.

Changing pattern, alpha, beta or method calls ``KLoRA.set_schedule`` /
``set_method`` on the attached LoRAs: nothing is reloaded. Switching LoRAs
reads and checks the new files first, then detaches the old K-LoRA and
attaches a new one; a rejected file leaves the previous LoRAs in place.
"""

import math
import secrets
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import loras, rule, selection_map
from .errors import KLoRAError
from .fusion import METHODS, KLoRA
from .loras import LoRAError

MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 30.0
MAX_ALPHA = 10.0
MAX_ABS_BETA = 10.0
METHOD_NOTES = {"klora": "K-LoRA", "merge": "direct merge (both LoRAs in every layer)",
                "content": "content LoRA only", "style": "style LoRA only"}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, so that one user cannot exhaust the machine."""

    max_steps: int = 100
    max_side: int = 2048
    max_prompt_chars: int = 1000
    max_queue: int = 16  # requests waiting; more are refused with "queue full"
    max_upload: str = "2gb"  # per uploaded LoRA file (rank-128 SDXL LoRAs are ~0.9 GB)


@dataclass(frozen=True)
class Defaults:
    """Initial values of the page's fields."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 50
    guidance: float = 5.0
    size: int = 1024

    @classmethod
    def for_family(cls, family: str, **overrides):
        base = cls() if family == "unet" else cls(steps=28, guidance=3.5)  # FLUX.1-dev's usual settings
        return cls(**{**base.__dict__, **overrides})


@dataclass
class Result:
    image: object  # PIL image (partly denoised when stopped)
    selection_map: object | None  # PIL image for method "klora", else None
    seed: int
    seconds: float
    steps_done: int
    stopped: bool
    summary: str = ""


@dataclass
class _StopRequests:
    """Per page session: a cancel stops that session's running generation, not someone else's."""

    running: set = field(default_factory=set)
    stop: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, session: str) -> None:
        with self.lock:
            self.running.add(session)

    def request(self, session: str) -> bool:
        with self.lock:
            if session in self.running:
                self.stop.add(session)
                return True
            return False

    def wanted(self, session: str) -> bool:
        return session in self.stop

    def done(self, session: str) -> None:
        with self.lock:
            self.running.discard(session)
            self.stop.discard(session)


class Studio:
    """A pipeline with K-LoRA attached, driven by the page (or by a test, directly)."""

    def __init__(self, pipe, content, style, *, content_weight_name=None, style_weight_name=None,
                 text_encoder_lora=False, limits: Limits | None = None, defaults: Defaults | None = None,
                 model_label: str = ""):
        self.pipe = pipe
        self.family = "unet" if isinstance(getattr(pipe, "unet", None), torch.nn.Module) else "transformer"
        # FLUX packs 2x2 latent patches: its sides must be multiples of 16.
        self.size_multiple = 8 if self.family == "unet" else 16
        self.limits = limits or Limits()
        self.defaults = defaults or Defaults.for_family(self.family)
        self.model_label = model_label or type(pipe).__name__
        self.text_encoder_lora = text_encoder_lora
        self._lock = threading.Lock()  # one generation or LoRA switch at a time, whatever the caller
        self.files = {"content": _lora_file(content, content_weight_name, "content LoRA"),
                      "style": _lora_file(style, style_weight_name, "style LoRA")}
        self.warnings: list[str] = []
        self.klora = self._attach(self.files)

    # --- LoRAs ---------------------------------------------------------------

    def _attach(self, files: dict) -> KLoRA:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # One logged generation is all the page shows; keep no history.
            klora = KLoRA(self.pipe, files["content"], files["style"], text_encoder_lora=self.text_encoder_lora,
                          max_logged_generations=1)
        self.warnings = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        return klora

    def switch_loras(self, content=None, style=None, *, content_weight_name=None, style_weight_name=None) -> KLoRA:
        """Replace one or both LoRAs (path, hub id or ``LoRAFile``; None keeps the current one).

        New files are read and checked against the denoiser before the current
        K-LoRA is touched; if attaching still fails, the previous LoRAs come back.
        """
        sources = {"content": (content, content_weight_name), "style": (style, style_weight_name)}
        if all(source is None for source, _ in sources.values()):
            raise LoRAError("no LoRA given: type a path or hub id, or upload a .safetensors file")
        with self._lock:
            new = dict(self.files)
            for role, (source, weight_name) in sources.items():
                if source is not None:
                    new[role] = _lora_file(source, weight_name, f"{role} LoRA")
                    adapter = loras.to_denoiser_adapter(new[role], self.klora.denoiser)
                    loras.check_fits(adapter, self.klora.denoiser, new[role].label)
            self.klora.detach()
            try:
                self.klora = self._attach(new)
            except BaseException:
                self.klora = self._attach(self.files)
                raise
            self.files = new
            return self.klora

    def describe_loras(self) -> str:
        k = self.klora
        return (f"{self.files['content'].label}  \n{self.files['style'].label}  \n"
                f"K-LoRA chooses per step in {len(k.paths)} layers ({len(k.only)} more use one LoRA only); "
                f"gamma {k.gamma:.4g}")

    # --- generation ----------------------------------------------------------

    def check(self, prompt, negative_prompt, method, pattern, alpha, beta, steps, guidance, seed, height, width):
        """Refuse out-of-range requests with a one-line ``KLoRAError`` before anything runs."""
        lim = self.limits
        if not isinstance(prompt, str) or not prompt.strip():
            raise KLoRAError("type a prompt (with both LoRAs' trigger words)")
        for name, text in (("prompt", prompt), ("negative prompt", negative_prompt or "")):
            if len(text) > lim.max_prompt_chars:
                raise KLoRAError(f"{name} is {len(text)} characters; at most {lim.max_prompt_chars}")
        if method not in METHODS:
            raise KLoRAError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if pattern not in rule.PATTERNS:
            raise KLoRAError(f"pattern must be 's' or 's*', got {pattern!r}")
        if not _number(alpha) or not 0 < alpha <= MAX_ALPHA:
            raise KLoRAError(f"alpha must be in (0, {MAX_ALPHA:g}], got {alpha}")
        if beta is not None and (not _number(beta) or abs(beta) > MAX_ABS_BETA):
            raise KLoRAError(f"beta must be in [-{MAX_ABS_BETA:g}, {MAX_ABS_BETA:g}], got {beta}")
        if not _whole(steps) or not 1 <= steps <= lim.max_steps:
            raise KLoRAError(f"steps must be a whole number from 1 to {lim.max_steps}, got {steps}")
        if not _number(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
            raise KLoRAError(f"guidance must be in [0, {MAX_GUIDANCE:g}], got {guidance}")
        if seed is not None and (not _whole(seed) or not 0 <= seed <= MAX_SEED):
            raise KLoRAError(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed}")
        m = self.size_multiple
        for name, side in (("height", height), ("width", width)):
            if not _whole(side) or side < m or side % m or side > lim.max_side:
                raise KLoRAError(f"{name} must be a multiple of {m} from {m} to {lim.max_side}, got {side}")

    def generate(self, prompt, negative_prompt="", *, method="klora", pattern="s*", alpha=rule.DEFAULT_ALPHA,
                 beta=None, steps=None, guidance=None, seed=0, height=None, width=None,
                 should_stop=None, on_step=None) -> Result:
        """One image with the current LoRAs; ``seed=None`` draws a random seed.

        ``should_stop()`` is asked after every step; True ends the denoising loop
        (diffusers' ``_interrupt``). ``on_step(done, total)`` reports progress.
        """
        d = self.defaults
        steps = d.steps if steps is None else steps
        guidance = d.guidance if guidance is None else guidance
        height = d.size if height is None else height
        width = d.size if width is None else width
        self.check(prompt, negative_prompt, method, pattern, alpha, beta, steps, guidance, seed, height, width)
        steps, height, width = int(steps), int(height), int(width)
        seed = secrets.randbelow(MAX_SEED + 1) if seed is None else int(seed)
        done = [0]
        stopped = [False]

        def after_step(pipe, index, timestep, tensors):
            done[0] = index + 1
            if on_step is not None:
                on_step(done[0], steps)
            if should_stop is not None and should_stop():
                stopped[0] = True
                pipe._interrupt = True  # diffusers skips the remaining steps of its loop
            return tensors

        kwargs = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=float(guidance), height=height,
                      width=width, generator=torch.Generator("cpu").manual_seed(seed),
                      callback_on_step_end=after_step)
        if negative_prompt and self.family == "unet":  # FLUX.1 takes no negative prompt without true CFG
            kwargs["negative_prompt"] = negative_prompt
        with self._lock:
            self.klora.set_schedule(pattern, float(alpha), None if beta is None else float(beta))
            self.klora.set_method(method)
            start = time.perf_counter()
            image = self.pipe(**kwargs).images[0]
            seconds = time.perf_counter() - start
            drawn = None
            if method == "klora" and not stopped[0]:
                drawn = selection_map.render(self.klora.selection_log())
            k = self.klora
            schedule = f"pattern {k.pattern}, alpha {k.alpha:g}, beta {k.beta:g}, gamma {k.gamma:.4g}"
        how = f"K-LoRA ({schedule})" if method == "klora" else METHOD_NOTES[method]
        summary = (f"{'Stopped after' if stopped[0] else 'Generated in'} {seconds:.2f} s "
                   f"({done[0]} of {steps} steps) · seed {seed} · {width}×{height} · {how}")
        return Result(image=image, selection_map=drawn, seed=seed, seconds=seconds, steps_done=done[0],
                      stopped=stopped[0], summary=summary)

    def close(self) -> None:
        self.klora.detach()


def _lora_file(source, weight_name, role) -> loras.LoRAFile:
    if isinstance(source, loras.LoRAFile):
        return source
    return loras.load_file(source, weight_name or None, role)


def read_upload(path, role: str) -> loras.LoRAFile:
    """An uploaded file, read only as safetensors; messages name the upload, not the server's cache path."""
    path = Path(path)
    label = f"{role} (uploaded '{path.name}')"
    if path.suffix.lower() != ".safetensors":
        raise LoRAError(f"{label}: only .safetensors files are accepted")
    try:
        lora = loras.read(path, role)
    except LoRAError as exc:
        raise LoRAError(str(exc).replace(f"{role} '{path}'", label)) from None
    lora.label = label
    return lora


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value) -> bool:
    return _number(value) and float(value).is_integer()


def model_family(name_or_path: str) -> str:
    """'unet' or 'transformer', from the pipeline's model_index.json (a small file, no weights)."""
    from diffusers import DiffusionPipeline

    text = str(name_or_path)
    path = Path(text).expanduser()
    try:
        index = DiffusionPipeline.load_config(str(path) if path.exists() else text)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise KLoRAError(f"--pretrained_model_name_or_path '{name_or_path}': no model_index.json "
                         f"({type(exc).__name__}: {first})") from None
    if "transformer" in index and "unet" not in index:
        return "transformer"
    return "unet"


# --- the page ----------------------------------------------------------------

def build_app(studio: Studio, *, typed_lora_paths: bool = True, title: str = "K-LoRA"):
    """The gradio Blocks page over ``studio``; queued, one generation at a time."""
    import gradio as gr

    lim, d = studio.limits, studio.defaults
    stops = _StopRequests()
    m = studio.size_multiple

    def visible_error(exc: Exception):
        return gr.Error(str(exc), print_exception=False)

    def generate(prompt, negative_prompt, method, pattern, alpha, beta, steps, guidance, seed, random_seed,
                 width, height, request: gr.Request, progress=gr.Progress()):
        session = getattr(request, "session_hash", None) or ""
        stops.begin(session)
        try:
            result = studio.generate(
                prompt, negative_prompt, method=method, pattern=pattern, alpha=alpha, beta=beta, steps=steps,
                guidance=guidance, seed=None if random_seed else seed, height=height, width=width,
                should_stop=lambda: stops.wanted(session),
                on_step=lambda i, n: progress((i, n), desc="denoising", unit="steps"))
        except KLoRAError as exc:
            raise visible_error(exc) from None
        except torch.cuda.OutOfMemoryError:
            raise gr.Error("out of GPU memory: try a smaller size", print_exception=False) from None
        finally:
            stops.done(session)
        if result.stopped:
            print(f"generation cancelled after {result.steps_done} of {int(steps)} steps", file=sys.stderr, flush=True)
            raise gr.Error(f"cancelled after {result.steps_done} of {int(steps)} steps", print_exception=False)
        return result.image, result.selection_map, result.seed, result.summary

    def cancel(request: gr.Request):
        stops.request(getattr(request, "session_hash", None) or "")

    def switch(content_path, content_upload, content_weight, style_path, style_upload, style_weight):
        chosen = {}
        for role, typed, upload in (("content", content_path, content_upload), ("style", style_path, style_upload)):
            typed = (typed or "").strip()
            if upload:
                chosen[role] = read_upload_visible(upload, role)
            elif typed:
                if not typed_lora_paths:
                    raise gr.Error("this server accepts uploaded .safetensors files only", print_exception=False)
                chosen[role] = typed
        try:
            studio.switch_loras(chosen.get("content"), chosen.get("style"),
                                content_weight_name=(content_weight or "").strip() or None,
                                style_weight_name=(style_weight or "").strip() or None)
        except KLoRAError as exc:
            raise visible_error(exc) from None
        for message in studio.warnings:
            gr.Warning(message)
        return studio.describe_loras()

    def read_upload_visible(upload, role):
        try:
            return read_upload(upload, f"{role} LoRA")
        except KLoRAError as exc:
            raise visible_error(exc) from None

    def default_beta(pattern, alpha):
        try:
            return round(rule.default_beta(pattern, float(alpha)), 4)
        except (TypeError, ValueError):
            return gr.skip()

    # Generated images and uploads live in gradio's cache; clear what is older than an hour.
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(f"## K-LoRA: a subject LoRA in a style LoRA's style\nBase model: `{studio.model_label}` "
                    f"({'Stable Diffusion UNet' if studio.family == 'unet' else 'FLUX transformer'})")
        lora_info = gr.Markdown(studio.describe_loras(), elem_id="lora-info")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(d.prompt, label="Prompt (include both LoRAs' trigger words)", lines=2,
                                    max_length=lim.max_prompt_chars, elem_id="prompt")
                negative = gr.Textbox(d.negative_prompt, label="Negative prompt", lines=1,
                                      max_length=lim.max_prompt_chars, visible=studio.family == "unet",
                                      elem_id="negative-prompt")
                method = gr.Radio(list(METHODS), value="klora", label="Method (compare K-LoRA with its baselines)",
                                  elem_id="method")
                with gr.Row():
                    pattern = gr.Radio(list(rule.PATTERNS), value="s*", label="Pattern", elem_id="pattern")
                    alpha = gr.Number(rule.DEFAULT_ALPHA, label="alpha", minimum=0.01, maximum=MAX_ALPHA,
                                      step=0.05, elem_id="alpha")
                    beta = gr.Number(round(rule.default_beta("s*"), 4), label="beta", minimum=-MAX_ABS_BETA,
                                     maximum=MAX_ABS_BETA, step=0.05, elem_id="beta")
                with gr.Row():
                    steps = gr.Slider(1, lim.max_steps, value=min(d.steps, lim.max_steps), step=1, label="Steps",
                                      elem_id="steps")
                    guidance = gr.Slider(0, MAX_GUIDANCE, value=d.guidance, step=0.1, label="Guidance",
                                         elem_id="guidance")
                with gr.Row():
                    width = gr.Slider(m, lim.max_side, value=min(d.size, lim.max_side), step=m, label="Width",
                                      elem_id="width")
                    height = gr.Slider(m, lim.max_side, value=min(d.size, lim.max_side), step=m, label="Height",
                                       elem_id="height")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", minimum=0, maximum=MAX_SEED, precision=0, elem_id="seed")
                    random_seed = gr.Checkbox(False, label="Random seed", elem_id="random-seed")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                with gr.Accordion("Switch LoRAs", open=False, elem_id="switch-loras"):
                    paths_note = ("Type a .safetensors file, a folder or a hub id, or upload a .safetensors "
                                  "file; an empty row keeps the current LoRA.")
                    if not typed_lora_paths:
                        paths_note = "Upload .safetensors files (typed paths are off on this server)."
                    gr.Markdown(paths_note)
                    with gr.Row():
                        content_path = gr.Textbox(label="Content LoRA: path or hub id", visible=typed_lora_paths,
                                                  elem_id="content-path")
                        content_weight = gr.Textbox(label="weight name (optional)", visible=typed_lora_paths,
                                                    elem_id="content-weight")
                    content_upload = gr.File(label="or upload the content LoRA", file_types=[".safetensors"],
                                             type="filepath", elem_id="content-upload")
                    with gr.Row():
                        style_path = gr.Textbox(label="Style LoRA: path or hub id", visible=typed_lora_paths,
                                                elem_id="style-path")
                        style_weight = gr.Textbox(label="weight name (optional)", visible=typed_lora_paths,
                                                  elem_id="style-weight")
                    style_upload = gr.File(label="or upload the style LoRA", file_types=[".safetensors"],
                                           type="filepath", elem_id="style-upload")
                    load = gr.Button("Load LoRAs", elem_id="load-loras")
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="pil", format="png", interactive=False, height=512,
                                 elem_id="image")
                summary = gr.Markdown(elem_id="summary")
                gr.Markdown("**Selection map** of the last K-LoRA image: one row per layer both LoRAs adapt, "
                            "one column per step; orange = content LoRA, blue = style LoRA.")
                selection = gr.Image(label="Selection map", show_label=False, type="pil", format="png",
                                     interactive=False, height=420, elem_id="selection")

        pattern.change(default_beta, [pattern, alpha], beta, queue=False, api_visibility="private")
        event = run.click(generate, [prompt, negative, method, pattern, alpha, beta, steps, guidance, seed,
                                     random_seed, width, height], [image, selection, seed, summary],
                          api_name="generate", concurrency_id="model", concurrency_limit=1)
        stop.click(cancel, None, None, cancels=[event], queue=False, api_name="cancel")
        load.click(switch, [content_path, content_upload, content_weight, style_path, style_upload, style_weight],
                   lora_info, api_name="switch_loras",
                   concurrency_id="model", concurrency_limit=1)
    demo.queue(default_concurrency_limit=1, max_size=lim.max_queue)
    return demo


def serve(demo, limits: Limits | None = None, *, server_name: str = "127.0.0.1", server_port: int | None = None,
          share: bool = False, prevent_thread_lock: bool = False, quiet: bool = False):
    """Launch with this project's serving rules: loopback unless asked, no extra paths served."""
    limits = limits or Limits()
    return demo.launch(server_name=server_name, server_port=server_port, share=share,
                       prevent_thread_lock=prevent_thread_lock, quiet=quiet,
                       allowed_paths=[],  # nothing but gradio's own cache of generated images and uploads
                       max_file_size=limits.max_upload, show_error=False, ssr_mode=False,
                       mcp_server=False, footer_links=["api"])
