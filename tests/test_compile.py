"""``KLoRA(..., compile=...)`` on the tiny SDXL, CPU: compiled once, never again.

Fused switching rewrites weights in place, and parameters are graph inputs whose guards
check metadata, not values; the per-step choice runs in a forward pre-hook on the
denoiser, outside the compiled region (``compile_repeated_blocks``, or the forward
alone). So after the first generation, switches, other seeds, another method and
another schedule must compile nothing, and the images must equal the uncompiled run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klora.fusion import KLoRA
from klora.tiny import write_demo_loras

STEPS = 6


@pytest.fixture(scope="module")
def loras(tiny_sdxl_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    return write_demo_loras(unet, tmp_path_factory.mktemp("compile-loras"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts and ends with empty compile caches and counters."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def _load(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, seed, steps=STEPS, callback=None):
    return pipe("a sbu dog", num_inference_steps=steps, height=32, width=32, guidance_scale=5.0,
                output_type="latent", generator=torch.Generator().manual_seed(seed),
                callback_on_step_end=callback).images


# What every compiled run below does after its first generation: another seed, a method
# that switches every layer, a schedule whose choices differ, another step count.
def _later_runs(klora, pipe, callback=None) -> list:
    images = [_generate(pipe, 1, callback=callback)]
    klora.set_method("merge")
    images.append(_generate(pipe, 2, callback=callback))
    klora.set_method("content")
    images.append(_generate(pipe, 2, callback=callback))
    klora.set_method("klora")
    klora.set_schedule("s", alpha=2.5)
    images.append(_generate(pipe, 3, steps=STEPS + 2, callback=callback))
    return images


@pytest.fixture(scope="module")
def uncompiled(tiny_sdxl_dir, loras):
    """The same runs without compiling: (first image, later images, selection log)."""
    pipe = _load(tiny_sdxl_dir)
    klora = KLoRA(pipe, *loras)
    first = _generate(pipe, 0)
    later = _later_runs(klora, pipe)
    log = klora.selection_log()
    klora.detach()
    return first, later, log


class CountingBackend:
    """A torch.compile backend that records every graph it is handed, then runs ``inner``."""

    def __init__(self, inner="aot_eager"):
        from torch._dynamo.backends.registry import lookup_backend

        self.inner = lookup_backend(inner)
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return self.inner(graph_module, example_inputs)


def _check_compiled_runs(pipe, klora, uncompiled, compiled_graphs, atol):
    """First generation compiles; everything after compiles nothing; images and choices equal
    the uncompiled run; the choosing pre-hook runs eagerly on every denoiser call."""
    first_expected, later_expected, log_expected = uncompiled
    hook_calls, steps = [], []
    before_forward = klora._before_forward

    def counting_before_forward(*args):
        hook_calls.append(1)
        return before_forward(*args)

    klora._before_forward = counting_before_forward  # looked up on every call by the registered hook

    def count_steps(p, step, timestep, callback_kwargs):
        steps.append(step)
        return {}

    first = _generate(pipe, 0, callback=count_steps)
    compiled_once = compiled_graphs()
    assert compiled_once > 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        later = _later_runs(klora, pipe, callback=count_steps)
    assert compiled_graphs() == compiled_once  # zero recompiles

    # One denoiser call per step (CFG runs as one batch of 2), each chose in eager Python.
    assert len(steps) == STEPS * 4 + STEPS + 2
    assert len(hook_calls) == len(steps)
    assert klora.selection_log()["generations"] == log_expected["generations"]
    for got, expected in zip([first, *later], [first_expected, *later_expected]):
        assert (got - expected).abs().max() <= atol
    # The switches reached the compiled graph: merge, content and klora give other latents.
    assert (later[1] - later[2]).abs().max() > 100 * atol + 1e-4
    return first, later


def test_regional_compile_never_recompiles_after_the_first_generation(tiny_sdxl_dir, loras, uncompiled):
    pipe = _load(tiny_sdxl_dir)
    before = {name: t.clone() for name, t in pipe.unet.state_dict().items()}
    backend = CountingBackend()
    klora = KLoRA(pipe, *loras, compile={"backend": backend})
    assert klora.switching == "fused"
    compiled = [m for m in pipe.unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled and {type(m).__name__ for m in compiled} == {"BasicTransformerBlock"}

    _check_compiled_runs(pipe, klora, uncompiled, lambda: len(backend.graphs), atol=1e-5)
    klora.detach()
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(p.requires_grad for p in pipe.unet.parameters())  # as from_pretrained left them


@pytest.mark.slow
def test_whole_forward_compile_for_a_denoiser_without_repeated_blocks(tiny_sdxl_dir, loras, uncompiled):
    """Models that name no repeated blocks get their forward compiled; the hook, registered on
    the module, still runs outside the graph. (About 13 s, most of it compiling.)"""
    pipe = _load(tiny_sdxl_dir)
    pipe.unet._repeated_blocks = ()
    backend = CountingBackend()
    klora = KLoRA(pipe, *loras, compile={"backend": backend})
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in pipe.unet.modules())
    _check_compiled_runs(pipe, klora, uncompiled, lambda: len(backend.graphs), atol=1e-5)
    klora.detach()


@pytest.mark.slow
def test_default_inductor_compile_never_recompiles(tiny_sdxl_dir, loras, uncompiled):
    """compile=True: inductor (C++ on the CPU). About 40 s on 2 cores with a cold inductor cache, most of it
    compiling; seconds with a warm one."""
    from torch._dynamo.utils import counters

    pipe = _load(tiny_sdxl_dir)
    klora = KLoRA(pipe, *loras, compile=True)
    _check_compiled_runs(pipe, klora, uncompiled, lambda: counters["stats"]["unique_graphs"], atol=1e-4)
    klora.detach()


def test_compile_with_adapter_switching_warns(tiny_sdxl_dir, loras):
    pipe = _load(tiny_sdxl_dir)
    with pytest.warns(UserWarning, match="recompiles at every switch; switching='fused' does not"):
        klora = KLoRA(pipe, *loras, switching="adapters", compile={"backend": "eager"})
    klora.detach()
    assert np.isfinite(_generate(pipe, 0, steps=1).numpy()).all()
