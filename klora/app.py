"""The gradio page: one pipeline of any family, K-LoRA attached to it, one generation at a time.

``Studio`` holds the loaded pipeline and the attached ``KLoRA`` and does the
work (checks, generation, switching LoRAs); it knows nothing of gradio, so a
test can call it as a reference. ``build_app`` lays the page out over a
``Studio`` and turns its ``KLoRAError``\\ s into visible ``gr.Error``\\ s;
``serve`` launches it with the serving rules of ``inference_gradio.py``.

The page adapts to the pipeline it is given, never to a family name typed by
the user: the family is ``klora.pipelines.family_of(pipe)``, the fields are the
arguments the pipeline's ``__call__`` takes (a negative prompt where it has one,
true CFG where it has ``true_cfg_scale``, frames and frame rate for video
families), and their initial values are the pipeline's own defaults.

Changing pattern, alpha, beta, method or LoRA Switch's block calls
``KLoRA.set_schedule`` / ``set_method`` / ``set_switch_every`` on the attached LoRAs:
nothing is reloaded. NP-LoRA's mu is fixed once attached (its correction adapter is
built from it), so a request for NP-LoRA with another mu re-attaches first. EST-LoRA's
beta can come from DINO (``klora.dino``) when the page has an ``Embedder``. The LoRAs,
extra (always-on) LoRAs and strengths are each page session's own ``Setup``: choosing
them reads and checks the new files, then attaches them; a rejected file leaves
the previous ones in place. One model serves every session, so a request whose
setup is not the attached one re-attaches first (docs/gradio.md says what that costs).
"""

import contextlib
import inspect
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import dino, loras, methods, rule, selection_map, video
from .cli import method_tag
from .errors import KLoRAError, LoRAError
from .fusion import MAX_STRENGTH, METHODS, PROGRESS, SWITCHING, KLoRA, _strength
from .pipelines import Family, family_of

MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 30.0
MAX_ALPHA = 10.0
MAX_BETA = 10.0  # beta is >= 0 (klora.methods.check_beta)
MAX_FPS = 120
# The method radio's labels; its info line is klora.methods.SUMMARY of the chosen one.
METHOD_LABELS = {"klora": "K-LoRA", "est": "EST-LoRA", "switch": "LoRA Switch", "np": "NP-LoRA",
                 "merge": "merge (both LoRAs)", "content": "content LoRA only", "style": "style LoRA only"}
# How a run of merge, content or style is described under its picture (the others: ``describe_method``).
METHOD_NOTES = {"merge": "direct merge (both LoRAs in every layer)", "content": "content LoRA only",
                "style": "style LoRA only"}

# Image (and frame) sides are multiples of the VAE's downscale times the denoiser's
# patch: 8 for the SD UNets, 16 for most DiTs (8x VAE, 2x2 patches), 32 where the VAE
# downscales 32x. The rows are the real models'; the tiny test models divide them.
SIDE_MULTIPLES = {"Sana": 32, "Sana Video": 32, "LTX-Video": 32, "LTX-2": 32}
# An H.264 MP4 is written in 16-pixel macroblocks; other sides would be padded.
VIDEO_SIDE_MULTIPLE = video.MACRO_BLOCK


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, so that one user cannot exhaust the machine."""

    max_steps: int = 100
    max_side: int = 2048
    max_frames: int = 257  # LTX-Video's longest clip; Wan makes 81, HunyuanVideo 129
    max_prompt_chars: int = 1000
    max_queue: int = 16  # requests waiting; more are refused with "queue full"
    max_upload: str = "2gb"  # per uploaded LoRA file (rank-128 SDXL LoRAs are ~0.9 GB)
    # Page sessions gradio keeps (each with its own LoRAs in memory); beyond it the least recently
    # used session forgets its LoRAs and goes back to the server's.
    max_sessions: int = 64


@dataclass(frozen=True)
class Defaults:
    """Initial values of the page's fields; ``for_pipeline`` reads them off the pipeline."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 50
    guidance: float | None = 5.0  # None: the pipeline has no default guidance_scale (Qwen-Image)
    true_cfg: float | None = None  # None: the pipeline takes no true_cfg_scale
    height: int = 1024
    width: int = 1024
    num_frames: int | None = None  # video families only
    fps: int | None = None

    @classmethod
    def for_pipeline(cls, pipe, limits: "Limits | None" = None, **overrides) -> "Defaults":
        """The pipeline's own ``__call__`` defaults (steps, guidance, true CFG, size, frames),
        fitted to the page's rules and ``limits``; ``overrides`` replace any of them."""
        limits = limits or Limits()
        family = family_of(pipe)
        own = {name: p.default for name, p in inspect.signature(pipe.__call__).parameters.items()}
        multiple = side_multiple(family)
        height, width = _default_sides(pipe, family, own)
        values = dict(
            steps=_fit_int(own.get("num_inference_steps"), 50, 1, limits.max_steps),
            guidance=_float_or_none(own.get("guidance_scale")),
            true_cfg=_float_or_none(own.get("true_cfg_scale")),
            height=_fit_side(height, multiple, limits.max_side),
            width=_fit_side(width, multiple, limits.max_side))
        if family.output == "video":
            step = frame_step(pipe)
            frames = own.get("num_frames")
            if not _whole(frames):
                frames = _config_of(pipe, family).get("sample_frames") or 49
            values["num_frames"] = max(1, (min(int(frames), most_frames(pipe, limits)) - 1) // step * step + 1)
            values["fps"] = video.default_fps(pipe, family.name)
        return cls(**{**values, **overrides})


def side_multiple(family: Family) -> int:
    """What image (or frame) heights and widths must be a multiple of, for this family."""
    multiple = SIDE_MULTIPLES.get(family.name, 8 if family.denoisers[0] == "unet" else 16)
    return math.lcm(multiple, VIDEO_SIDE_MULTIPLE) if family.output == "video" else multiple


def frame_step(pipe) -> int:
    """Clips have ``k * step + 1`` frames (``klora.video.FRAME_STEP``: Wan 4, LTX-Video 8);
    1 means any count (AnimateDiff)."""
    return video.FRAME_STEP.get(family_of(pipe).name, 1)


def most_frames(pipe, limits: "Limits") -> int:
    """The page's frame limit, lowered to what the model can take (AnimateDiff's motion modules)."""
    return min(limits.max_frames, video.max_frames(pipe) or limits.max_frames)


def frames_rule(step: int) -> str:
    return "any number" if step == 1 else f"{step}k + 1 (1, {step + 1}, {2 * step + 1}, ...)"


@dataclass
class Result:
    image: object | None  # PIL image for image families (partly denoised when stopped), else None
    video: str | None  # MP4 path for video families, else None
    frames: object | None  # the clip's frames as the pipeline returned them (numpy, F x H x W x 3 in [0, 1])
    selection_map: object | None  # PIL image for the per-step methods (klora, est, switch), else None
    selection_log: str | None  # JSON path of ``KLoRA.selection_log()`` for the per-step methods, else None
    seed: int
    seconds: float
    steps_done: int
    stopped: bool
    summary: str = ""
    attach_seconds: float = 0.0  # spent re-attaching first (another session's LoRAs, or another NP-LoRA mu)


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


@dataclass(frozen=True, eq=False)
class Setup:
    """The LoRAs one page session generates with: files by role, extra LoRAs, strengths.

    Files are read once and shared between setups. ``key`` tells whether two setups attach
    the same K-LoRA (the same file objects at the same scales), so that a request
    re-attaches only when its session's setup is not the one attached.
    """

    files: dict  # role (content, style, content_2, style_2) -> loras.LoRAFile
    extra_loras: tuple = ()  # ((LoRAFile, scale), ...), on in every expert ...
    extra_loras_2: tuple | None = None  # ... unless the second expert has its own
    content_scale: float = 1.0
    style_scale: float = 1.0
    warnings: tuple = ()  # what attaching these files warned about (shown when they were chosen)

    @property
    def key(self) -> tuple:
        def scaled(pairs):
            return None if pairs is None else tuple((id(lora), scale) for lora, scale in pairs)

        return (tuple((role, id(lora)) for role, lora in sorted(self.files.items())), scaled(self.extra_loras),
                scaled(self.extra_loras_2), self.content_scale, self.style_scale)

    def klora_arguments(self) -> dict:
        files, second = self.files, self.extra_loras_2
        return dict(content=files["content"], style=files["style"], content_2=files.get("content_2"),
                    style_2=files.get("style_2"), extra_loras=list(self.extra_loras),
                    extra_loras_2=None if second is None else list(second), content_scale=self.content_scale,
                    style_scale=self.style_scale)

    def short(self) -> str:
        """The LoRAs in a few words, for the line under a picture."""
        text = ", ".join(self.files[role].label for role in ("content", "style"))
        extras = len(self.extra_loras) + len(self.extra_loras_2 or ())
        if extras:
            text += f" + {extras} extra"
        if (self.content_scale, self.style_scale) != (1.0, 1.0):
            text += f" (strengths {self.content_scale:g}, {self.style_scale:g})"
        return text


class Studio:
    """A pipeline with K-LoRA attached, driven by the page (or by a test, directly).

    ``content_2`` / ``style_2``: separate LoRAs for the second expert of a two-denoiser
    pipeline (Wan 2.2 HIGH/LOW pairs); switching a role's LoRA on the page replaces
    both of its files. ``extra_loras`` / ``extra_loras_2`` / ``content_scale`` /
    ``style_scale``, ``switching`` / ``progress``: as ``KLoRA``. ``call_kwargs``:
    fixed arguments added to every pipeline call (``max_sequence_length``, ...).

    These LoRAs are ``setup``, what every session starts with. ``switch_loras`` and
    ``set_stack`` return a new ``Setup`` for one session; ``generate(setup=...)``
    re-attaches K-LoRA first when that setup is not the attached one, or when NP-LoRA
    is asked with another mu than the attached one's. ``embedder``: a
    ``klora.dino.Embedder`` for EST-LoRA's beta from DINO (``generate(beta_auto=True)``);
    without one the page offers no such option.
    """

    KEPT_OUTPUTS = 8  # generations whose MP4 and JSON files stay on disk (gradio copies them to its cache)

    def __init__(self, pipe, content, style, *, content_2=None, style_2=None, content_weight_name=None,
                 style_weight_name=None, content_2_weight_name=None, style_2_weight_name=None, extra_loras=(),
                 extra_loras_2=None, content_scale=1.0, style_scale=1.0,
                 text_encoder_lora=False, switching="fused", progress="steps",
                 call_kwargs: dict | None = None, limits: Limits | None = None, defaults: Defaults | None = None,
                 model_label: str = "", embedder: "dino.Embedder | None" = None):
        for name, value, allowed in (("switching", switching, SWITCHING), ("progress", progress, PROGRESS)):
            if value not in allowed:
                raise KLoRAError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        self.pipe = pipe
        self.family = family_of(pipe)
        self.video = self.family.output == "video"
        self.takes = set(inspect.signature(pipe.__call__).parameters)
        self.size_multiple = side_multiple(self.family)
        self.frame_step = frame_step(pipe) if self.video else None
        self.limits = limits or Limits()
        self.max_frames = most_frames(pipe, self.limits) if self.video else None
        self.defaults = defaults or Defaults.for_pipeline(pipe, self.limits)
        self.model_label = _public_name(model_label) if model_label else type(pipe).__name__
        self.text_encoder_lora = text_encoder_lora
        self.switching, self.progress = switching, progress
        self.call_kwargs = dict(call_kwargs or {})
        self.embedder = embedder
        self.embedder_label = _public_name(embedder.name) if embedder is not None else None
        self._lock = threading.Lock()  # one generation or attach at a time, whatever the caller
        files = {"content": _lora_file(content, content_weight_name, "content LoRA"),
                 "style": _lora_file(style, style_weight_name, "style LoRA")}
        for role, source, weight_name in (("content_2", content_2, content_2_weight_name),
                                          ("style_2", style_2, style_2_weight_name)):
            if source is not None:
                files[role] = _lora_file(source, weight_name, f"{role[:-2]} LoRA (second expert)")
        setup = Setup(files, self._extra_files(extra_loras, ""),
                      self._extra_files(extra_loras_2, " (second expert)") or None,
                      _strength(content_scale, "content_scale"), _strength(style_scale, "style_scale"))
        self._outputs = Path(tempfile.mkdtemp(prefix="klora-page-"))
        # Removed by close(), or when this Studio is collected or the interpreter exits (a SIGTERM turned
        # into KeyboardInterrupt by ``interrupt_on_sigterm`` while it loads).
        self._remove_outputs = weakref.finalize(self, shutil.rmtree, str(self._outputs), True)
        self._generation = 0
        self.klora: KLoRA | None = None
        self._attached: Setup | None = None
        self.np_mu = methods.DEFAULT_NP_MU  # NP-LoRA's mu of the attached K-LoRA
        self.attach_seconds = 0.0  # what the last attach took: the wait a re-attach adds to a request
        self.setup = replace(setup, warnings=tuple(self._attach(setup, methods.DEFAULT_NP_MU)))
        self.denoisers = dict(self.klora.denoisers)

    @property
    def warnings(self) -> tuple:
        """What attaching the server's own LoRAs warned about."""
        return self.setup.warnings

    # --- what the page offers ------------------------------------------------

    @property
    def controls(self) -> dict[str, bool]:
        """Which optional fields apply to this pipeline."""
        return {"negative_prompt": "negative_prompt" in self.takes,
                "guidance": "guidance_scale" in self.takes and self.defaults.guidance is not None,
                "true_cfg": "true_cfg_scale" in self.takes,
                "frames": self.video}

    # --- LoRAs ---------------------------------------------------------------

    @staticmethod
    def _extra_files(entries, where: str) -> tuple[tuple[loras.LoRAFile, float], ...]:
        """((LoRAFile, scale), ...) of ``[source, (source, scale), ...]``, read and checked now."""
        out = []
        for i, entry in enumerate(entries or (), start=1):
            source, scale = entry if isinstance(entry, tuple) else (entry, 1.0)
            scale = _strength(scale, f"extra LoRA {i}{where} scale")
            out.append((_lora_file(source, None, f"extra LoRA {i}{where}"), scale))
        return tuple(out)

    def _attach(self, setup: Setup, np_mu: float) -> list[str]:
        """Attach K-LoRA with ``setup`` and NP-LoRA's ``np_mu`` (nothing may be attached); returns what it
        warned about."""
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # One logged generation is all the page shows; keep no history.
            self.klora = KLoRA(self.pipe, text_encoder_lora=self.text_encoder_lora, switching=self.switching,
                               progress=self.progress, max_logged_generations=1, np_mu=np_mu,
                               **setup.klora_arguments())
        self._attached, self.np_mu = setup, self.klora.np_mu
        self.attach_seconds = time.perf_counter() - start
        return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]

    def _use(self, setup: Setup, np_mu: float | None = None) -> tuple[float, list[str]]:
        """Make ``setup`` the attached one, with NP-LoRA's ``np_mu`` (None: the attached one's), the caller
        holding the lock: (seconds it took, warnings).

        Nothing happens when both are attached already. If attaching fails, the previous setup and mu
        come back and the error is raised.
        """
        np_mu = self.np_mu if np_mu is None else np_mu
        if setup.key == self._attached.key and np_mu == self.np_mu:
            return 0.0, []
        start = time.perf_counter()
        previous, previous_mu = self._attached, self.np_mu
        self.klora.detach()
        try:
            warned = self._attach(setup, np_mu)
        except BaseException:
            self._attach(previous, previous_mu)
            raise
        return time.perf_counter() - start, warned

    def attached(self, setup: Setup | None = None) -> bool:
        """Whether ``setup`` (default: the server's) is the one attached now."""
        return (setup or self.setup).key == self._attached.key

    def switch_loras(self, content=None, style=None, *, content_weight_name=None, style_weight_name=None,
                     setup: Setup | None = None) -> Setup:
        """``setup`` (default: the server's) with one or both LoRAs replaced (path, hub id or ``LoRAFile``;
        None keeps that one), attached now.

        New files are read and checked against every denoiser before the attached K-LoRA
        is touched; if attaching still fails, the previous LoRAs come back.
        """
        sources = {"content": (content, content_weight_name), "style": (style, style_weight_name)}
        if all(source is None for source, _ in sources.values()):
            raise LoRAError("no LoRA given: type a path or hub id, or upload a .safetensors file")
        setup = setup or self.setup
        files = dict(setup.files)
        for role, (source, weight_name) in sources.items():
            if source is None:
                continue
            files[role] = _lora_file(source, weight_name, f"{role} LoRA")
            files.pop(f"{role}_2", None)  # the new LoRA goes into every expert
            checked = set()
            for denoiser in self.denoisers.values():
                if type(denoiser) in checked:
                    continue
                adapter = loras.to_denoiser_adapter(files[role], denoiser, self.family)
                loras.check_fits(adapter, denoiser, files[role].label, self.family, files[role])
                checked.add(type(denoiser))
        new = replace(setup, files=files, warnings=())
        with self._lock:
            _, warned = self._use(new)
        return replace(new, warnings=tuple(warned))

    def set_stack(self, extra_loras=None, *, content_scale=None, style_scale=None,
                  setup: Setup | None = None) -> Setup:
        """``setup`` (default: the server's) with other extra (always-on) LoRAs (``[source or LoRAFile,
        (source, scale), ...]``; None keeps them, ``[]`` removes them, in every expert) and/or strengths,
        attached now. The new files are read and checked first; if attaching fails, the previous ones come
        back."""
        setup = setup or self.setup
        changes = {}
        for name, value in (("content_scale", content_scale), ("style_scale", style_scale)):
            if value is not None:
                changes[name] = _strength(value, name.replace("_scale", " strength"))
        if extra_loras is not None:
            changes.update(extra_loras=self._extra_files(extra_loras, ""), extra_loras_2=None)
        new = replace(setup, **changes, warnings=())
        with self._lock:
            _, warned = self._use(new)
        return replace(new, warnings=tuple(warned))

    def describe_loras(self, setup: Setup | None = None) -> str:
        """``setup``'s LoRAs (default: the server's), by file name only, and what K-LoRA does with them."""
        setup = setup or self.setup
        labels = "  \n".join([f.label for f in setup.files.values()]
                              + [f"{f.label} at scale {scale:g}" for f, scale in
                                 setup.extra_loras + (setup.extra_loras_2 or ())])
        if (setup.content_scale, setup.style_scale) != (1.0, 1.0):
            labels += f"  \nstrengths: content {setup.content_scale:g}, style {setup.style_scale:g}"
        k = self.klora
        if not self.attached(setup):  # its statistics are known once it is attached
            return f"{labels}  \n{k.switching} switching, progress by {self.progress}"
        return (f"{labels}  \nK-LoRA chooses per step in {len(k.paths)} layers ({len(k.only)} more use one "
                f"LoRA only); gamma {gamma_text(k.gamma)}; {k.switching} switching, progress by {self.progress}")

    # --- generation ----------------------------------------------------------

    def check(self, *, prompt, negative_prompt="", method="klora", pattern="s*", alpha=rule.DEFAULT_ALPHA,
              beta=None, steps, guidance=None, true_cfg=None, seed=0, height, width, num_frames=None,
              fps=None, np_mu=methods.DEFAULT_NP_MU, switch_every=methods.DEFAULT_SWITCH_EVERY,
              beta_auto=False) -> None:
        """Refuse out-of-range requests with a one-line ``KLoRAError`` before anything runs. Every knob is
        checked, also those the method does not use (the page keeps their values when the method changes)."""
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
        if beta is not None and (not _number(beta) or not 0 <= beta <= MAX_BETA):
            raise KLoRAError(f"beta must be in [0, {MAX_BETA:g}], got {beta}")
        if not (_number(np_mu) or np_mu == math.inf) or np_mu < 0:
            raise KLoRAError(f"NP-LoRA's mu must be a number >= 0, or inf (the hard projection), got {np_mu}")
        if not _whole(switch_every) or not 1 <= switch_every <= lim.max_steps:
            raise KLoRAError(f"LoRA Switch's block must be a whole number of steps from 1 to {lim.max_steps}, "
                             f"got {switch_every}")
        if not isinstance(beta_auto, bool):
            raise KLoRAError(f"beta from DINO must be true or false, got {beta_auto!r}")
        if beta_auto and method == "est":
            if self.embedder is None:
                raise KLoRAError("beta from DINO needs a DINO model: start the page with --dino_model NAME_OR_FOLDER")
            if self.video:
                raise KLoRAError("beta from DINO compares two pictures (EST-LoRA, for image models); give video "
                                 "models a beta")
        if not _whole(steps) or not 1 <= steps <= lim.max_steps:
            raise KLoRAError(f"steps must be a whole number from 1 to {lim.max_steps}, got {steps}")
        for name, value in (("guidance", guidance), ("true CFG scale", true_cfg)):
            if value is not None and (not _number(value) or not 0 <= value <= MAX_GUIDANCE):
                raise KLoRAError(f"{name} must be in [0, {MAX_GUIDANCE:g}], got {value}")
        if seed is not None and (not _whole(seed) or not 0 <= seed <= MAX_SEED):
            raise KLoRAError(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed}")
        m = self.size_multiple
        for name, side in (("height", height), ("width", width)):
            if not _whole(side) or side < m or side % m or side > lim.max_side:
                raise KLoRAError(f"{name} must be a multiple of {m} from {m} to {lim.max_side}, got {side}")
        if self.video:
            step, most = self.frame_step, self.max_frames
            if not _whole(num_frames) or not 1 <= num_frames <= most or (num_frames - 1) % step:
                raise KLoRAError(f"frames must be {frames_rule(step)}, from 1 to {most}, got {num_frames}")
            if not _whole(fps) or not 1 <= fps <= MAX_FPS:
                raise KLoRAError(f"fps must be a whole number from 1 to {MAX_FPS}, got {fps}")

    def generate(self, prompt, negative_prompt="", *, method="klora", pattern="s*", alpha=rule.DEFAULT_ALPHA,
                 beta=None, steps=None, guidance=None, true_cfg=None, seed=0, height=None, width=None,
                 num_frames=None, fps=None, np_mu=methods.DEFAULT_NP_MU, switch_every=methods.DEFAULT_SWITCH_EVERY,
                 beta_auto=False, should_stop=None, on_step=None, on_phase=None, setup: Setup | None = None,
                 on_reattach=None) -> Result:
        """One image (or clip) with ``setup``'s LoRAs (default: the server's); ``seed=None`` draws a random seed.

        Fields left at None take ``self.defaults``. Each knob is used by its method only:
        ``pattern`` / ``alpha`` / ``beta`` by klora and est, ``np_mu`` by np (another mu than
        the attached one's re-attaches first), ``switch_every`` by switch, ``beta_auto`` by est
        (with ``self.embedder``: ``klora.dino.auto_beta`` renders a content-only and a
        style-only picture of the same prompt, seed and settings first, and its beta replaces
        ``beta``). ``should_stop()`` is asked after every step; True ends the denoising loop
        (diffusers' ``_interrupt``). ``on_step(done, total)`` reports progress, ``on_phase(text)``
        what the steps that follow are for. When K-LoRA must be re-attached first,
        ``on_reattach(seconds the last attach took, why)`` is told so.
        """
        d = self.defaults
        steps = d.steps if steps is None else steps
        guidance = d.guidance if guidance is None else guidance
        true_cfg = d.true_cfg if true_cfg is None else true_cfg
        height = d.height if height is None else height
        width = d.width if width is None else width
        if self.video:
            num_frames = d.num_frames if num_frames is None else num_frames
            fps = d.fps if fps is None else fps
        self.check(prompt=prompt, negative_prompt=negative_prompt, method=method, pattern=pattern, alpha=alpha,
                   beta=beta, steps=steps, guidance=guidance, true_cfg=true_cfg, seed=seed, height=height,
                   width=width, num_frames=num_frames, fps=fps, np_mu=np_mu, switch_every=switch_every,
                   beta_auto=beta_auto)
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

        kwargs = dict(prompt=prompt, num_inference_steps=steps, height=height, width=width,
                      generator=torch.Generator("cpu").manual_seed(seed))
        if guidance is not None and "guidance_scale" in self.takes:
            kwargs["guidance_scale"] = float(guidance)
        if true_cfg is not None and "true_cfg_scale" in self.takes:
            kwargs["true_cfg_scale"] = float(true_cfg)
        if negative_prompt and "negative_prompt" in self.takes:
            kwargs["negative_prompt"] = negative_prompt
        if self.video:
            num_frames, fps = int(num_frames), int(fps)
            kwargs.update(num_frames=num_frames, output_type="np")
            for name in video.FPS_ARGUMENTS:  # LTX conditions on the frame rate
                if name in self.takes:
                    kwargs[name] = fps
        if "callback_on_step_end" in self.takes:
            kwargs["callback_on_step_end"] = after_step
        kwargs.update(self.call_kwargs)
        setup = setup or self.setup
        np_mu = float(np_mu) if method == "np" else None  # the other methods run with any mu attached
        with self._lock:
            other_loras, other_mu = not self.attached(setup), np_mu is not None and np_mu != self.np_mu
            attach_seconds = 0.0
            if other_loras or other_mu:
                notice, waited = _reattach_reason(other_loras, np_mu if other_mu else None)
                if on_reattach is not None:
                    on_reattach(self.attach_seconds, notice)
                attach_seconds, _ = self._use(setup, np_mu)
            k = self.klora
            k.beta_auto = None  # set again below when this request asks for it
            k.set_switch_every(int(switch_every))
            k.set_schedule(pattern, float(alpha), None if beta is None else float(beta))
            k.set_method(method)
            dino_seconds = None
            if beta_auto and method == "est":
                if on_phase is not None:
                    on_phase("beta from DINO: a content-only and a style-only picture")
                start = time.perf_counter()
                found = dino.auto_beta(self.pipe, k, self.embedder, prompt, seed,
                                       **{n: v for n, v in kwargs.items() if n not in ("prompt", "generator")})
                # auto_beta sets beta alone: the visitor's pattern and alpha stay.
                k.set_schedule(pattern, float(alpha), found)
                k.beta_auto = {**k.beta_auto, "dino_model": self.embedder_label}  # its name, not the server's path
                dino_seconds = time.perf_counter() - start
                if on_phase is not None:
                    on_phase("denoising")
            start = time.perf_counter()
            output = self.pipe(**kwargs)
            seconds = time.perf_counter() - start
            folder = self._output_folder()
            tag = f"{method_tag(method, pattern)}_seed{seed}"
            image = frames = clip = None
            if self.video:
                frames = output.frames[0]
                clip = str(folder / f"{tag}.mp4")
                video.write_mp4(video.to_uint8(frames), clip, fps, progress=False)
            else:
                image = output.images[0]
            drawn = log_path = None
            if method in methods.PER_STEP and not stopped[0]:
                drawn = selection_map.render(k.selection_log())
                log_path = str(folder / f"{tag}_selection_log.json")
                k.save_selection_log(log_path)
            how = describe_method(k, dino_seconds)
        size = f"{width}×{height}" + (f" · {num_frames} frames at {fps} fps" if self.video else "")
        waited = f"; {waited}: {attach_seconds:.2f} s" if other_loras or other_mu else ""
        summary = (f"{'Stopped after' if stopped[0] else 'Generated in'} {seconds:.2f} s "
                   f"({done[0]} of {steps} steps{waited}) · seed {seed} · {size} · {how} · {setup.short()}")
        return Result(image=image, video=clip, frames=frames, selection_map=drawn, selection_log=log_path,
                      seed=seed, seconds=seconds, steps_done=done[0], stopped=stopped[0], summary=summary,
                      attach_seconds=attach_seconds)

    def _output_folder(self) -> Path:
        """A fresh folder for one generation's files; the oldest beyond ``KEPT_OUTPUTS`` go."""
        self._generation += 1
        folder = self._outputs / f"{self._generation:06d}"
        folder.mkdir()
        for old in sorted(self._outputs.iterdir())[:-self.KEPT_OUTPUTS]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def close(self) -> None:
        self.klora.detach()
        self._remove_outputs()


def gamma_text(gamma) -> str:
    """One gamma, or one per expert ("transformer 1.37, transformer_2 1.41")."""
    if isinstance(gamma, dict):
        return ", ".join(f"{component} {value:.4g}" for component, value in gamma.items())
    return f"{gamma:.4g}"


def describe_method(klora: KLoRA, dino_seconds: float | None = None) -> str:
    """How the picture was made, for the line under it: the method of ``klora`` and the knobs it used
    (``dino_seconds``: what DINO's two pictures took, when beta came from them)."""
    k, method = klora, klora.method
    if method in methods.CHOOSING:
        beta = f"beta {k.beta:g}"
        if k.beta_auto:
            beta += (f" from DINO ({k.beta_auto['dino_model']}: 1 - cosine {k.beta_auto['cosine']:.4g} of a "
                     f"content-only and a style-only picture, made in {dino_seconds or 0:.2f} s)")
        schedule = f"pattern {k.pattern}, alpha {k.alpha:g}, {beta}, gamma {gamma_text(k.gamma)}"
        return f"K-LoRA ({schedule})" if method == "klora" else f"EST-LoRA on the energies ({schedule})"
    if method == "switch":
        return f"LoRA Switch (content first, then style, switching every {k.switch_every} steps)"
    if method == "np":
        mu = {0.0: "0: the direct merge", math.inf: "inf: the hard projection"}.get(k.np_mu, f"{k.np_mu:g}")
        return f"NP-LoRA (mu {mu})"
    return METHOD_NOTES[method]


def _reattach_reason(other_loras: bool, np_mu: float | None) -> tuple[str, str]:
    """(what the visitor is told while it happens, what the line under the picture says) of a re-attach for
    another session's LoRAs and/or NP-LoRA's ``np_mu`` (None: the mu did not change)."""
    mu = None if np_mu is None else f"NP-LoRA's mu {np_mu:g}"
    if not other_loras:
        return (f"Re-attaching the LoRAs first for {mu} (NP-LoRA's correction is built from mu)",
                f"re-attached first for {mu}")
    if mu is None:
        return ("Re-attaching your LoRAs first (another session used other ones)",
                "this session's LoRAs re-attached first")
    return (f"Re-attaching your LoRAs first, with {mu} (another session used other ones)",
            f"this session's LoRAs re-attached first, with {mu}")


def _lora_file(source, weight_name, role) -> loras.LoRAFile:
    """A typed path or hub id, read now and labelled by file name: the page never shows the server's paths."""
    if isinstance(source, loras.LoRAFile):
        return source
    typed = str(source).strip()
    if "\0" in typed:
        raise LoRAError(f"{role}: {typed!r} is not a path or hub id")
    if os.path.exists(typed) and not (os.path.isfile(typed) or os.path.isdir(typed)):
        raise LoRAError(f"{role} '{typed}': not a file or folder (a device, pipe or socket); type a .safetensors "
                        "file, a folder or a hub id")
    if weight_name and os.path.isfile(typed):
        raise LoRAError(f"{role} '{typed}': is a file; a weight name picks a file inside a folder or hub repo "
                        "(clear the weight name)")
    lora = loras.load_file(typed, weight_name or None, role)
    lora.label = f"{role} '{_public_name(typed, lora.path)}'"
    return lora


def _public_name(typed: str, file: Path | None = None) -> str:
    """How the page names a model or LoRA: a local file by its name, a local folder by its own name (and
    the file read from it), a hub id as typed (and the file read from it)."""
    if os.path.isfile(typed):
        return Path(typed).name
    name = Path(os.path.realpath(typed)).name if os.path.isdir(typed) else typed
    return name if file is None else f"{name}/{file.name}"


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


def _says_inf(value) -> bool:
    """"inf", as an API client sends NP-LoRA's hard projection (JSON has no infinity)."""
    return isinstance(value, str) and value.strip().lower() in ("inf", "infinity")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value) -> bool:
    return _number(value) and float(value).is_integer()


def _float_or_none(value) -> float | None:
    return float(value) if _number(value) else None


def _fit_int(value, fallback: int, low: int, high: int) -> int:
    return min(max(int(value) if _whole(value) else fallback, low), high)


def _fit_side(side: int, multiple: int, max_side: int) -> int:
    return max(multiple, min(int(side), max_side) // multiple * multiple)


def _config_of(pipe, family: Family) -> dict:
    return dict(getattr(getattr(pipe, family.denoisers[0], None), "config", None) or {})


def _default_sides(pipe, family: Family, own: dict) -> tuple[int, int]:
    """(height, width) the pipeline makes when none is given, as its ``__call__`` computes them."""
    if _whole(own.get("height")) and _whole(own.get("width")):
        return int(own["height"]), int(own["width"])
    config = _config_of(pipe, family)
    scale = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None)
    sample = getattr(pipe, "default_sample_size", None) or config.get("sample_size")
    if _whole(scale) and _whole(sample):
        return int(sample * scale), int(sample * scale)
    if _whole(scale) and _whole(config.get("sample_height")) and _whole(config.get("sample_width")):
        return int(config["sample_height"] * scale), int(config["sample_width"] * scale)
    return 1024, 1024


# --- the page ----------------------------------------------------------------

def build_app(studio: Studio, *, typed_lora_paths: bool = True, title: str = "K-LoRA"):
    """The gradio Blocks page over ``studio``; queued, one generation at a time.

    The ``/generate`` endpoint has the same inputs and outputs for every family;
    fields a pipeline does not take are hidden on the page and ignored, and so are
    the knobs the chosen method does not use (checked all the same). Each page
    session keeps its own ``Setup`` (LoRAs, extra LoRAs, strengths) in a ``gr.State``;
    the page's files live in a folder of its own (``PageFiles``), removed when the
    page closes.
    """
    import gradio as gr

    lim, d, shows = studio.limits, studio.defaults, studio.controls
    stops = _StopRequests()
    m = studio.size_multiple
    is_video = studio.video
    files = PageFiles()

    def visible_error(exc: Exception):
        return gr.Error(str(exc), print_exception=False)

    def generate(prompt, negative_prompt, method, pattern, alpha, beta, steps, guidance, true_cfg, seed,
                 random_seed, width, height, num_frames, fps, np_mu, hard_projection, switch_every, beta_from_dino,
                 setup, request: gr.Request, progress=gr.Progress()):
        session = getattr(request, "session_hash", None) or ""
        phase = ["denoising"]

        def on_reattach(seconds, notice):
            gr.Info(f"{notice}: about {seconds:.1f} s")
            progress(None, desc="re-attaching the LoRAs")

        def on_phase(text):
            phase[0] = text
            progress(None, desc=text)

        stops.begin(session)
        try:
            result = studio.generate(
                prompt, negative_prompt if shows["negative_prompt"] else "", method=method, pattern=pattern,
                alpha=alpha, beta=beta, steps=steps, guidance=guidance if shows["guidance"] else None,
                true_cfg=true_cfg if shows["true_cfg"] else None, seed=None if random_seed else seed,
                height=height, width=width, num_frames=num_frames if is_video else None, fps=fps if is_video else None,
                np_mu=math.inf if hard_projection is True or _says_inf(np_mu) else np_mu, switch_every=switch_every,
                beta_auto=beta_from_dino, should_stop=lambda: stops.wanted(session),
                on_step=lambda i, n: progress((i, n), desc=phase[0], unit="steps"), on_phase=on_phase, setup=setup,
                on_reattach=on_reattach)
        except KLoRAError as exc:
            raise visible_error(exc) from None
        except torch.cuda.OutOfMemoryError:
            raise gr.Error("out of GPU memory: try a smaller size" + (" or fewer frames" if is_video else ""),
                           print_exception=False) from None
        finally:
            stops.done(session)
        if result.stopped:
            print(f"generation cancelled after {result.steps_done} of {int(steps)} steps", file=sys.stderr, flush=True)
            raise gr.Error(f"cancelled after {result.steps_done} of {int(steps)} steps", print_exception=False)
        return (result.image, result.video, result.selection_map, result.selection_log, result.seed,
                result.summary)

    def cancel(request: gr.Request):
        stops.request(getattr(request, "session_hash", None) or "")

    def switch(content_path, content_upload, content_weight, style_path, style_upload, style_weight, setup):
        try:
            chosen, weight_names = {}, {}
            for role, typed, upload, weight in (("content", content_path, content_upload, content_weight),
                                                ("style", style_path, style_upload, style_weight)):
                typed, weight = (typed or "").strip(), (weight or "").strip()
                if upload:
                    if weight:
                        raise LoRAError(f"{role} LoRA: a weight name picks a file inside a typed folder or hub repo; "
                                        "an uploaded file is used as it is (clear the weight name)")
                    chosen[role] = read_upload(upload, f"{role} LoRA")
                elif typed:
                    if not typed_lora_paths:
                        raise KLoRAError("this server accepts uploaded .safetensors files only")
                    chosen[role], weight_names[role] = typed, weight or None
                elif weight:
                    raise LoRAError(f"{role} LoRA: a weight name without a path or hub id to pick it from")
            setup = studio.switch_loras(chosen.get("content"), chosen.get("style"), setup=setup,
                                        content_weight_name=weight_names.get("content"),
                                        style_weight_name=weight_names.get("style"))
        except KLoRAError as exc:
            raise visible_error(exc) from None
        for message in setup.warnings:
            gr.Warning(message)
        return studio.describe_loras(setup), setup

    def set_stack(extra_paths, extra_uploads, upload_scales, content_scale, style_scale, setup):
        try:
            extras = [parse_extra_line(line) for line in (extra_paths or "").splitlines() if line.strip()]
            if extras and not typed_lora_paths:
                raise KLoRAError("this server accepts uploaded .safetensors files only")
            try:
                scales = [float(x) for x in (upload_scales or "").replace(",", " ").split()]
            except ValueError:
                raise KLoRAError(f"scales of the uploaded extra LoRAs: numbers, e.g. 0.8, 1.0 (got "
                                 f"{upload_scales!r})") from None
            uploads = list(extra_uploads or [])
            if len(scales) > len(uploads):
                raise KLoRAError(f"{len(scales)} scales for {len(uploads)} uploaded extra LoRAs")
            for i, upload in enumerate(uploads):
                scale = _strength(scales[i], f"scale {i + 1} of the uploaded extra LoRAs") if i < len(scales) else 1.0
                extras.append((read_upload(upload, "extra LoRA"), scale))
            setup = studio.set_stack(extras, content_scale=content_scale, style_scale=style_scale, setup=setup)
        except KLoRAError as exc:
            raise visible_error(exc) from None
        for message in setup.warnings:
            gr.Warning(message)
        return studio.describe_loras(setup), setup

    def default_beta(pattern, alpha):
        try:
            return round(rule.default_beta(pattern, float(alpha)), 4)
        except (TypeError, ValueError):
            return gr.skip()

    has_dino = studio.embedder is not None

    def knobs(method, auto):
        """Show the knobs of ``method`` only; with beta from DINO on, the beta box is not used."""
        return (gr.update(info=methods.SUMMARY.get(method, "")), gr.update(visible=method in methods.CHOOSING),
                gr.update(interactive=not (has_dino and auto and method == "est")),
                gr.update(visible=method == "est" and not is_video), gr.update(visible=method == "np"),
                gr.update(visible=method == "switch"))

    family = studio.family
    kind = f"{family.name} {family.output} model, {type(studio.pipe).__name__}"
    frame_step_ = studio.frame_step or 1
    # Generated files are copied to the page's own folder; clear what is older than an hour.
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        # This session's Setup; None: the server's. gradio keeps it per browser tab (or API client).
        session_setup = gr.State(None)
        gr.Markdown(f"## K-LoRA: a subject LoRA in a style LoRA's style\nBase model: `{studio.model_label}` "
                    f"({kind})", elem_id="model-info")
        lora_info = gr.Markdown(studio.describe_loras(), elem_id="lora-info")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(d.prompt, label="Prompt (include both LoRAs' trigger words)", lines=2,
                                    max_length=lim.max_prompt_chars, elem_id="prompt")
                negative = gr.Textbox(d.negative_prompt, label="Negative prompt", lines=1,
                                      max_length=lim.max_prompt_chars, visible=shows["negative_prompt"],
                                      elem_id="negative-prompt")
                method = gr.Radio([(METHOD_LABELS[m], m) for m in METHODS], value="klora",
                                  label="Method (K-LoRA, the other fusion rules, and the baselines)",
                                  info=methods.SUMMARY["klora"], elem_id="method")
                # The Number fields have no minimum, maximum or precision of gradio's: it compares and
                # rounds before our checks, and a string or NaN there fails inside gradio with no message.
                # Studio.check bounds them with a visible one-line error instead.
                with gr.Row(elem_id="schedule") as schedule:  # K-LoRA's and EST-LoRA's s(p)
                    pattern = gr.Radio(list(rule.PATTERNS), value="s*", label="Pattern", elem_id="pattern")
                    alpha = gr.Number(rule.DEFAULT_ALPHA, label=f"alpha (0 to {MAX_ALPHA:g})", step=0.05,
                                      elem_id="alpha")
                    beta = gr.Number(round(rule.default_beta("s*"), 4), label=f"beta (0 to {MAX_BETA:g})", step=0.05,
                                     elem_id="beta")
                dino_note = (f"1 - DINO cosine of a content-only and a style-only picture of this prompt, seed and "
                             f"settings, made first ({studio.embedder_label})" if has_dino else
                             "off on this page: start inference_gradio.py with --dino_model NAME_OR_FOLDER")
                beta_from_dino = gr.Checkbox(False, label="beta from DINO (EST-LoRA)", info=dino_note,
                                             interactive=has_dino, visible=False, elem_id="beta-from-dino")
                with gr.Row(visible=False, elem_id="np-knobs") as np_knobs:
                    np_mu = gr.Number(methods.DEFAULT_NP_MU, label="NP-LoRA's mu (>= 0; 0 is the direct merge; "
                                      "a new mu re-attaches the LoRAs)", step=0.1, elem_id="np-mu")
                    hard_projection = gr.Checkbox(False, label="hard projection (mu = inf)", elem_id="hard-projection")
                with gr.Row(visible=False, elem_id="switch-knobs") as switch_knobs:
                    switch_every = gr.Number(methods.DEFAULT_SWITCH_EVERY, step=1, elem_id="switch-every",
                                             label=f"LoRA Switch: steps per LoRA, content first (1 to {lim.max_steps})")
                with gr.Row():
                    steps = gr.Slider(1, lim.max_steps, value=min(d.steps, lim.max_steps), step=1, label="Steps",
                                      elem_id="steps")
                    guidance = gr.Slider(0, MAX_GUIDANCE, value=d.guidance or 0.0, step=0.1, label="Guidance",
                                         visible=shows["guidance"], elem_id="guidance")
                    true_cfg = gr.Slider(0, MAX_GUIDANCE, value=d.true_cfg or 1.0, step=0.1,
                                         label="True CFG scale (above 1, with a negative prompt: two passes a step)",
                                         visible=shows["true_cfg"], elem_id="true-cfg")
                with gr.Row():
                    width = gr.Slider(m, lim.max_side, value=min(d.width, lim.max_side), step=m, label="Width",
                                      elem_id="width")
                    height = gr.Slider(m, lim.max_side, value=min(d.height, lim.max_side), step=m, label="Height",
                                       elem_id="height")
                with gr.Row(visible=is_video):
                    num_frames = gr.Slider(1, studio.max_frames or lim.max_frames, value=d.num_frames or 1,
                                           step=frame_step_,
                                           label=f"Frames ({frames_rule(frame_step_)})", elem_id="num-frames")
                    fps = gr.Slider(1, MAX_FPS, value=d.fps or video.FALLBACK_FPS, step=1, label="Frames per second",
                                    elem_id="fps")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", step=1, elem_id="seed")
                    random_seed = gr.Checkbox(False, label="Random seed", elem_id="random-seed")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                with gr.Accordion("Switch LoRAs", open=False, elem_id="switch-loras"):
                    paths_note = ("Type a .safetensors file, a folder or a hub id, or upload a .safetensors "
                                  "file; an empty row keeps the current LoRA. The LoRAs you choose are yours: "
                                  "other visitors keep theirs.")
                    if not typed_lora_paths:
                        paths_note = ("Upload .safetensors files (typed paths are off on this server). The LoRAs "
                                      "you choose are yours: other visitors keep theirs.")
                    gr.Markdown(paths_note)
                    with gr.Row():
                        content_path = gr.Textbox(label="Content LoRA: path or hub id", visible=typed_lora_paths,
                                                  elem_id="content-path")
                        content_weight = gr.Textbox(label="weight name (optional: a file in that folder or repo)",
                                                    visible=typed_lora_paths, elem_id="content-weight")
                    content_upload = gr.File(label="or upload the content LoRA", file_types=[".safetensors"],
                                             type="filepath", elem_id="content-upload")
                    with gr.Row():
                        style_path = gr.Textbox(label="Style LoRA: path or hub id", visible=typed_lora_paths,
                                                elem_id="style-path")
                        style_weight = gr.Textbox(label="weight name (optional: a file in that folder or repo)",
                                                  visible=typed_lora_paths, elem_id="style-weight")
                    style_upload = gr.File(label="or upload the style LoRA", file_types=[".safetensors"],
                                           type="filepath", elem_id="style-upload")
                    load = gr.Button("Load LoRAs", elem_id="load-loras")
                with gr.Accordion("Extra LoRAs and strengths", open=False, elem_id="stack"):
                    gr.Markdown("Extra LoRAs (a speed or detail LoRA) are on at every step, at their scale, and "
                                "take no part in K-LoRA's choice. A strength multiplies what its LoRA applies; "
                                "the choice does not change with it. Applying replaces the extra LoRAs (empty: "
                                f"none). Strengths and scales: from -{MAX_STRENGTH:g} to {MAX_STRENGTH:g}, not 0.")
                    extra_paths = gr.Textbox(label="Extra LoRAs: one per line, path or hub id, then a scale "
                                             "(default 1.0), e.g. lightx2v.safetensors 0.8", lines=2,
                                             visible=typed_lora_paths, elem_id="extra-paths")
                    with gr.Row():
                        extra_uploads = gr.File(label="or upload extra LoRAs", file_types=[".safetensors"],
                                                file_count="multiple", type="filepath", elem_id="extra-uploads")
                        upload_scales = gr.Textbox(label="their scales, in order (default 1.0)",
                                                   elem_id="extra-upload-scales")
                    with gr.Row():
                        content_scale = gr.Number(studio.setup.content_scale, label="Content strength",
                                                  elem_id="content-scale")
                        style_scale = gr.Number(studio.setup.style_scale, label="Style strength",
                                                elem_id="style-scale")
                    apply_stack = gr.Button("Apply", elem_id="apply-stack")
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="pil", format="png", interactive=False, height=512,
                                 visible=not is_video, elem_id="image")
                clip = gr.Video(label="Video", format="mp4", interactive=False, height=512, loop=True,
                                visible=is_video, elem_id="video")
                summary = gr.Markdown(elem_id="summary")
                experts = " (one panel per expert)" if studio.klora.multi else ""
                gr.Markdown(f"**Selection map** of the last {'clip' if is_video else 'image'} made with a per-step "
                            f"method (K-LoRA, EST-LoRA, LoRA Switch){experts}: one row per layer both LoRAs adapt, "
                            "one column per step; orange = content LoRA, blue = style LoRA. The selection log below "
                            "has every layer's statistics and every step's choices.")
                selection = gr.Image(label="Selection map", show_label=False, type="pil", format="png",
                                     interactive=False, height=420, elem_id="selection")
                log_file = gr.File(label="Selection log (JSON)", interactive=False, elem_id="selection-log")

        pattern.change(default_beta, [pattern, alpha], beta, queue=False, api_visibility="private")
        for toggle in (method, beta_from_dino):
            toggle.change(knobs, [method, beta_from_dino], [method, schedule, beta, beta_from_dino, np_knobs,
                                                            switch_knobs], queue=False, api_visibility="private")
        hard_projection.change(lambda hard: gr.update(interactive=not hard), hard_projection, np_mu, queue=False,
                               api_visibility="private")
        event = run.click(generate, [prompt, negative, method, pattern, alpha, beta, steps, guidance, true_cfg, seed,
                                     random_seed, width, height, num_frames, fps, np_mu, hard_projection,
                                     switch_every, beta_from_dino, session_setup],
                          [image, clip, selection, log_file, seed, summary],
                          api_name="generate", concurrency_id="model", concurrency_limit=1)
        stop.click(cancel, None, None, cancels=[event], queue=False, api_name="cancel")
        load.click(switch, [content_path, content_upload, content_weight, style_path, style_upload, style_weight,
                            session_setup],
                   [lora_info, session_setup], api_name="switch_loras", concurrency_id="model", concurrency_limit=1)
        apply_stack.click(set_stack, [extra_paths, extra_uploads, upload_scales, content_scale, style_scale,
                                      session_setup],
                          [lora_info, session_setup], api_name="set_stack", concurrency_id="model",
                          concurrency_limit=1)
    demo.queue(default_concurrency_limit=1, max_size=lim.max_queue)
    files.adopt(demo, outputs=[image, clip, selection, log_file])
    return demo


def parse_extra_line(line: str) -> tuple[str, float]:
    """"path [scale]" (the page's extra LoRA field) -> (path, scale); a path may contain spaces."""
    text = line.strip()
    head, _, last = text.rpartition(" ")
    if head:
        try:
            return head.strip(), float(last)
        except ValueError:
            pass
    return text, 1.0


class PageFiles:
    """A page's own temporary folder: ``outputs`` holds what the page made (the only files it
    serves), ``uploads`` what visitors uploaded (read by the page, never served back).

    gradio takes an upload only from inside its upload folder (``gradio.utils.get_upload_folder()``,
    shared by every gradio process of this user), so the folder is made there; gradio's cache
    folder of each component and the server's upload folder are pointed at it (``adopt``,
    ``lifespan``). It is removed when the page closes, at exit, and after SIGTERM (``serve``).
    """

    def __init__(self):
        from gradio.utils import get_upload_folder

        shared = Path(get_upload_folder())
        shared.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="klora-page-", dir=shared))
        self.outputs, self.uploads = self.root / "outputs", self.root / "uploads"
        self.outputs.mkdir()
        self.uploads.mkdir()
        self.remove = weakref.finalize(self, shutil.rmtree, str(self.root), True)  # also runs at exit

    def adopt(self, demo, outputs) -> None:
        """Point the components of ``demo`` at this folder and remove it when ``demo`` closes."""
        for block in demo.blocks.values():
            block.GRADIO_CACHE = str(self.outputs if block in outputs else self.uploads)
        demo.GRADIO_CACHE = str(self.uploads)
        demo.page_files = self
        close = demo.close

        def close_and_remove(*args, **kwargs):
            try:
                return close(*args, **kwargs)
            finally:
                self.remove()

        demo.close = close_and_remove

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """The server's uploads go here; set as the server starts, before any request."""
        app.uploaded_file_dir = str(self.uploads)
        yield


class _OwnFilesOnly:
    """ASGI middleware: gradio's file route (``/gradio_api/file=PATH``) answers for the page's
    outputs folder only; anything else (gradio's shared folder, uploads, other files in an
    allowed folder) gets 403 before gradio's own, broader rule sees it."""

    def __init__(self, app, folder: Path):
        self.app, self.folder = app, Path(os.path.realpath(folder))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "/file=" in scope["path"]:
            asked = Path(os.path.realpath(scope["path"].split("/file=", 1)[1]))
            if not asked.is_relative_to(self.folder):
                from starlette.responses import PlainTextResponse

                await PlainTextResponse("File not allowed", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def serve(demo, limits: Limits | None = None, *, server_name: str = "127.0.0.1", server_port: int | None = None,
          share: bool = False, prevent_thread_lock: bool = False, quiet: bool = False):
    """Launch a page of ``build_app`` with this project's serving rules: loopback unless asked, only
    the page's own outputs served, its folder removed when it stops. Blocking (the script), SIGTERM
    stops it as Ctrl+C does, so that the folder goes; with ``prevent_thread_lock``, ``demo.close()``
    removes it."""
    from starlette.middleware import Middleware

    limits = limits or Limits()
    files = demo.page_files
    options = dict(server_name=server_name, server_port=server_port, share=share, quiet=quiet,
                   allowed_paths=[str(files.outputs)], max_file_size=limits.max_upload, show_error=False,
                   ssr_mode=False, mcp_server=False, footer_links=["api"],
                   state_session_capacity=limits.max_sessions,
                   app_kwargs={"middleware": [Middleware(_OwnFilesOnly, folder=files.outputs)],
                               "lifespan": files.lifespan})
    if prevent_thread_lock:
        return demo.launch(prevent_thread_lock=True, **options)
    try:
        with interrupt_on_sigterm():
            return demo.launch(**options)
    finally:
        demo.close()


@contextlib.contextmanager
def interrupt_on_sigterm():
    """Within it, SIGTERM (a service manager's stop) raises KeyboardInterrupt in the main thread, as Ctrl+C
    does: gradio closes the server and the ``finally`` blocks up the stack run, so temporary folders go."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
