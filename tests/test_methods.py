"""NP-LoRA, EST-LoRA and LoRA Switch on a pipeline, each rule recomputed here from the LoRA files.

NP-LoRA's merged weights come from a dense SVD of the style delta (the engine uses a QR); EST-LoRA's
choices from the energies of the written tensors; Switch's schedule from the step index, read off
the model at every denoiser call (a hook after K-LoRA's), not off its log.
"""

import math
import warnings

import pytest
import torch

from applied import applied_delta, base_weights
from klora import lora_switch, methods
from klora.errors import KLoRAError
from klora.fusion import KLoRA
from lora_files import attention_linears, delta, random_layers, write_kohya, write_peft


@pytest.fixture
def lora_pair(pipe, tmp_path):
    """Content rank 4 on every attention layer, style rank 6 on the first 40 of them."""
    paths = attention_linears(pipe.unet)
    content = random_layers(pipe.unet, paths, rank=4, alpha=lambda i: [2.0, 4.0, 8.0][i % 3], seed=21,
                            scale=0.05)
    style = random_layers(pipe.unet, paths[:40], rank=6, alpha=3.0, seed=22, scale=0.06)
    write_kohya(tmp_path / "content.safetensors", content)
    write_peft(tmp_path / "style.safetensors", style)
    return tmp_path / "content.safetensors", tmp_path / "style.safetensors", content, style


def _generate(pipe, steps=4, seed=0):
    return pipe("a sbu dog in szn style", num_inference_steps=steps, height=64, width=64, output_type="np",
                guidance_scale=5.0, generator=torch.Generator().manual_seed(seed)).images


def total_applied(denoiser, path, before):
    """Everything layer ``path`` adds now: the written weight's change plus every active PEFT adapter."""
    module = dict(denoiser.named_modules())[path]
    total = applied_delta(denoiser, path, before)
    for name in getattr(module, "active_adapters", []) if hasattr(module, "lora_A") else []:
        total = total + applied_delta(denoiser, path, before, name)
    return total


def np_merge(dc, ds, mu):
    """NP-LoRA from a dense SVD: ds + dc (I - c V V^T), V = all right singular vectors of ds."""
    _, singular, right = torch.linalg.svd(ds, full_matrices=False)
    V = right[singular > 1e-9 * singular[0]].T
    c = 1.0 if math.isinf(mu) else mu / (1 + mu)
    return ds + dc @ (torch.eye(dc.shape[1], dtype=dc.dtype) - c * V @ V.T)


@pytest.mark.parametrize("switching", ["fused", "adapters"])
@pytest.mark.parametrize("mu", [0.5, math.inf])
def test_np_applies_the_projected_merge_recomputed_by_svd(pipe, lora_pair, switching, mu):
    content_path, style_path, content, style = lora_pair
    before = base_weights(pipe.unet)
    klora = KLoRA(pipe, content_path, style_path, method="np", np_mu=mu, switching=switching)
    for path in content:
        dc = delta(content[path])
        expected = np_merge(dc, delta(style[path]), mu) if path in style else dc
        got = total_applied(pipe.unet, path, before)
        assert torch.allclose(got, expected, rtol=1e-4, atol=2e-7), path
        if path in style:  # the projection did something: not the plain merge
            assert not torch.allclose(got, dc + delta(style[path]), rtol=1e-3, atol=1e-5)
    if math.isinf(mu):  # the hard projection: the content part is orthogonal to the style's input space
        path = next(iter(style))
        content_part = total_applied(pipe.unet, path, before) - delta(style[path])
        _, _, right = torch.linalg.svd(delta(style[path]), full_matrices=False)
        assert (content_part @ right[:6].T).abs().max() < 1e-6
    assert klora.selection_log()["np_mu"] == mu
    klora.detach()
    assert all(torch.equal(before[p], w) for p, w in base_weights(pipe.unet).items())


def test_np_at_mu_zero_is_the_merge_and_one_picture_costs_nothing_per_step(pipe, lora_pair):
    content_path, style_path, content, style = lora_pair
    klora = KLoRA(pipe, content_path, style_path, method="np", np_mu=0.0)
    np_image = _generate(pipe)
    assert klora.generations == []  # a static merge: no per-step work, nothing logged
    klora.set_method("merge")
    assert abs(_generate(pipe) - np_image).max() < 1e-5
    klora.detach()


def _energies(content, style):
    """{path: (E_c, E_s)} and K-LoRA's gamma (trimmed mean of L1 ratios), from the files."""
    energies, ratios = {}, []
    for path in content:
        if path in style:
            dc, ds = delta(content[path]), delta(style[path])
            energies[path] = (float(dc.square().sum()), float(ds.square().sum()))
            ratios.append(float(dc.abs().sum() / ds.abs().sum()))
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return energies, sum(kept) / len(kept)


@pytest.mark.parametrize("switching", ["fused", "adapters"])
@pytest.mark.parametrize("pattern", ["s", "s*"])
def test_est_choices_equal_the_energy_rule_recomputed_from_the_files(pipe, lora_pair, switching, pattern):
    content_path, style_path, content, style = lora_pair
    energies, gamma = _energies(content, style)
    ratios = sorted((ec / gamma) / es for ec, es in energies.values())
    alpha = 1.5
    beta = max(0.0, ratios[len(ratios) // 2] - 0.7) if pattern == "s" else 0.9  # choices that change mid-run
    klora = KLoRA(pipe, content_path, style_path, method="est", pattern=pattern, alpha=alpha, beta=beta,
                  switching=switching)
    _generate(pipe, steps=6)
    log = klora.selection_log()
    assert log["method"] == "est" and log["gamma"] == pytest.approx(gamma, rel=1e-5)
    for path, (ec, es) in energies.items():
        assert log["layers"][path]["content_energy"] == pytest.approx(ec, rel=1e-5)
        assert log["layers"][path]["style_energy"] == pytest.approx(es, rel=1e-5)
    seen, differs_from_klora = set(), False
    for entry in log["generations"][-1]["steps"]:
        p = entry["step"] / 6
        scale = (alpha * p + beta) % alpha if pattern == "s*" else alpha * p + beta
        assert all(abs(ec / gamma - es * scale) > 1e-6 * es * scale for ec, es in energies.values()), "a near tie"
        expected = {path: "content" if ec / gamma > es * scale else "style" for path, (ec, es) in energies.items()}
        assert entry["choices"] == expected, entry["step"]
        seen |= set(expected.values())
        topk = {path: ("content" if s["content_topk_sum"] / gamma > s["style_topk_sum"] * scale else "style")
                for path, s in log["layers"].items()}
        differs_from_klora = differs_from_klora or topk != expected
    assert seen == {"content", "style"}
    assert differs_from_klora  # the statistic matters: K-LoRA's top-K sums would have chosen otherwise
    klora.detach()


def code_schedule(steps: int, tau: int) -> list[bool]:
    """LoRA Switch as its code runs it (``callbacks.make_callback``): LoRA 1 (content) active from the start,
    and after every step ``i > 0`` with ``i % tau == 0`` the step-end callback sets the other one."""
    active, uses = "content", []
    for i in range(steps):
        uses.append(active == "content")
        if i > 0 and i % tau == 0:
            active = "style" if active == "content" else "content"
    return uses


def _watch(pipe, paths, before, record):
    """A forward pre-hook registered after K-LoRA's: what each layer applies at each UNet call."""
    def hook(module, args, kwargs):
        record.append({p: total_applied(pipe.unet, p, before) for p in paths})

    return pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("switching", ["fused", "adapters"])
def test_switch_turns_the_whole_other_lora_off_every_n_steps(pipe, lora_pair, switching):
    content_path, style_path, content, style = lora_pair
    shared, content_only = next(iter(style)), list(content)[-1]
    assert content_only not in style
    before = base_weights(pipe.unet)
    klora = KLoRA(pipe, content_path, style_path, method="switch", switch_every=2, switching=switching)
    record = []
    handle = _watch(pipe, [shared, content_only], before, record)
    _generate(pipe, steps=7)
    handle.remove()
    assert len(record) == 7  # one UNet call per step (classifier-free guidance is batched)
    schedule = code_schedule(7, 2)
    assert schedule == [True, True, True, False, False, True, True]  # steps 0-2 content, 3-4 style, 5-6 content
    for step, applied in enumerate(record):
        content_block = schedule[step]
        want_shared = delta(content[shared]) if content_block else delta(style[shared])
        assert torch.allclose(applied[shared], want_shared, rtol=1e-4, atol=2e-7), step
        want_only = delta(content[content_only]) if content_block else torch.zeros_like(applied[content_only])
        assert torch.allclose(applied[content_only], want_only, rtol=1e-4, atol=2e-7), step
    log = klora.selection_log()
    assert log["switch_every"] == 2
    for entry in log["generations"][-1]["steps"]:
        assert set(entry["choices"].values()) == {"content" if schedule[entry["step"]] else "style"}
    klora.detach()
    assert all(torch.equal(before[p], w) for p, w in base_weights(pipe.unet).items())


def test_switch_schedule_is_the_codes_callback():
    for tau in (1, 2, 5, 7):
        assert [lora_switch.uses_content(s, tau) for s in range(60)] == code_schedule(60, tau)
    # ... which differs from the paper's formula, i(t) = floor(((t - 1) mod k tau) / tau) + 1, only by the
    # first block's extra step: every later block is one step later.
    formula = [((t - 1) % 10) // 5 + 1 == 1 for t in range(1, 51)]
    assert formula[:5] == [True] * 5 and code_schedule(50, 5)[:6] == [True] * 6
    assert code_schedule(50, 5)[1:] == formula[:-1]


@pytest.mark.parametrize("bad, message", [
    (dict(method="nope"), "method must be one of klora, est, switch, np"),
    (dict(np_mu=-0.5), "np_mu must be a number >= 0"),
    (dict(np_mu=float("nan")), "np_mu must be a number >= 0"),
    (dict(switch_every=0), "switch_every must be a whole number"),
    (dict(switch_every=2.5), "switch_every must be a whole number"),
    (dict(beta=-0.5), "beta must be a finite number >= 0"),
])
def test_bad_knobs_are_refused_in_one_line(pipe, lora_pair, bad, message):
    content_path, style_path, _, _ = lora_pair
    with pytest.raises(KLoRAError, match=message) as info:
        KLoRA(pipe, content_path, style_path, **bad)
    assert "\n" not in str(info.value)
    assert not getattr(pipe.unet, "peft_config", None) and not hasattr(pipe.unet, "_klora_attached")


def test_every_method_is_offered_and_static_ones_do_nothing_per_step(pipe, lora_pair):
    content_path, style_path, _, _ = lora_pair
    klora = KLoRA(pipe, content_path, style_path)
    for method in methods.METHODS:
        klora.set_method(method)
        before = len(klora.generations)
        _generate(pipe, steps=2)
        assert (len(klora.generations) > before) == (method in methods.PER_STEP), method
    klora.detach()


# --- Wan 2.2: two experts share one schedule ---------------------------------------------------------


def test_wan22_switch_counts_steps_across_the_experts_and_np_merges_both(video_dir, tmp_path):
    from test_video_families import family_pair, generate, load

    pipe = load(video_dir, "wan22")
    experts = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    (c_path, s_path), (content, style) = family_pair("wan22", pipe, tmp_path)
    before = {c: base_weights(d) for c, d in experts.items()}
    shared = next(p for p in content if p in style)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        klora = KLoRA(pipe, c_path, s_path, method="switch", switch_every=3)
    record = []
    handles = []
    for component, denoiser in experts.items():
        def hook(module, args, kwargs, component=component, denoiser=denoiser):
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
            record.append((component, float(torch.as_tensor(timestep).flatten()[0]),
                           total_applied(denoiser, shared, before[component])))
        handles.append(denoiser.register_forward_pre_hook(hook, with_kwargs=True))
    generate(pipe, "wan22", 8)
    for handle in handles:
        handle.remove()
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    assert {c for c, _, _ in record} == set(experts)  # both experts ran
    for component, t, applied in record:
        step = timesteps.index(t)
        want = content[shared] if code_schedule(8, 3)[step] else style[shared]
        assert torch.allclose(applied, delta(want), rtol=1e-4, atol=2e-7), (component, step)
    log = klora.selection_log()
    logged = {(e["component"], e["step"]) for e in log["generations"][-1]["steps"]}
    assert sorted(step for _, step in logged) == list(range(8))

    klora.set_method("np")
    for component, denoiser in experts.items():
        assert set(style) - set(content)  # a layer only the style adapts keeps the style as it is
        for path in set(content) | set(style):
            if path in content and path in style:
                expected = np_merge(delta(content[path]), delta(style[path]), 0.5)
            else:
                expected = delta(content[path] if path in content else style[path])
            assert torch.allclose(total_applied(denoiser, path, before[component]), expected,
                                  rtol=1e-4, atol=2e-7), (component, path)
    klora.detach()


@pytest.mark.parametrize("switching", ["fused", "adapters"])
def test_np_projects_convolution_loras_in_their_flattened_input_space(pipe, tmp_path, switching):
    """A LoCon-style LoRA (lora_A: r x in x 3 x 3, lora_B: out x r x 1 x 1) on the UNet's convolutions."""
    from safetensors.torch import save_file

    convs = [p for p, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
             and ".resnets." in p][:4]
    modules = dict(pipe.unet.named_modules())
    gen = torch.Generator().manual_seed(5)
    factors = {}
    for role, rank in (("content", 3), ("style", 2)):
        tensors, factors[role] = {}, {}
        for path in convs:
            conv = modules[path]
            A = torch.randn(rank, conv.in_channels, 3, 3, generator=gen) * 0.05
            B = torch.randn(conv.out_channels, rank, 1, 1, generator=gen) * 0.05
            tensors[f"unet.{path}.lora_A.weight"], tensors[f"unet.{path}.lora_B.weight"] = A, B
            factors[role][path] = (A.flatten(1), B.flatten(1), float(rank))  # no alpha: alpha = rank
        save_file(tensors, str(tmp_path / f"{role}.safetensors"))
    before = base_weights(pipe.unet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no alpha in the file": alpha = rank, scale 1, as written above
        klora = KLoRA(pipe, tmp_path / "content.safetensors", tmp_path / "style.safetensors", method="np",
                      switching=switching)
    for path in convs:
        expected = np_merge(delta(factors["content"][path]), delta(factors["style"][path]), 0.5)
        assert torch.allclose(total_applied(pipe.unet, path, before), expected, rtol=1e-4, atol=2e-7), path
    klora.detach()

    # The same merge exported as one file (kohya names, per-layer alpha) and read by diffusers alone.
    from klora.export import export_lora

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_lora(pipe, tmp_path / "content.safetensors", tmp_path / "style.safetensors",
                    tmp_path / "np.safetensors", method="np")
    pipe.load_lora_weights(str(tmp_path / "np.safetensors"), adapter_name="exported")
    for path in convs:
        expected = np_merge(delta(factors["content"][path]), delta(factors["style"][path]), 0.5)
        got = applied_delta(pipe.unet, path, before, "exported")
        assert torch.allclose(got, expected, rtol=1e-4, atol=2e-7), path
    pipe.unload_lora_weights()


def test_exported_flux_lora_pads_ranks_and_diffusers_reads_it_exactly(tiny_flux_dir, tmp_path):
    """Transformers get diffusers' PEFT names with every layer padded to one rank (no alpha in the file):
    shared layers have rank 4 + 2, content-only ones 4, and each must still apply exactly its own delta."""
    from diffusers import FluxPipeline

    from klora.export import export_lora

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    paths = [p for p, m in pipe.transformer.named_modules()
             if isinstance(m, torch.nn.Linear) and p.endswith((".to_q", ".to_k", ".to_v"))]
    content = random_layers(pipe.transformer, paths, rank=4, alpha=2.0, seed=31, scale=0.05)
    style = random_layers(pipe.transformer, paths[::2], rank=2, alpha=4.0, seed=32, scale=0.06)
    write_peft(tmp_path / "content.safetensors", content, prefix="transformer")
    write_peft(tmp_path / "style.safetensors", style, prefix="transformer")
    before = base_weights(pipe.transformer)
    for mu in (0.5, math.inf):
        out = tmp_path / f"np-{mu}.safetensors"
        export_lora(pipe, tmp_path / "content.safetensors", tmp_path / "style.safetensors", out, method="np", np_mu=mu)
        pipe.load_lora_weights(str(out), adapter_name="exported")
        for path in paths:
            dc = delta(content[path])
            expected = np_merge(dc, delta(style[path]), mu) if path in style else dc
            got = applied_delta(pipe.transformer, path, before, "exported")
            assert torch.allclose(got, expected, rtol=1e-4, atol=2e-7), (mu, path)
        pipe.unload_lora_weights()


def test_the_same_file_as_content_and_style_is_named_once(pipe, lora_pair):
    content_path, _, _, _ = lora_pair
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        klora = KLoRA(pipe, content_path, content_path)
    same = [str(w.message) for w in caught if "same file" in str(w.message)]
    assert same == [f"K-LoRA: the content and style LoRAs are the same file (content LoRA '{content_path}'): both "
                    "sides hold the same update, so there is nothing to fuse; give the style LoRA as the style"]
    klora.detach()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        KLoRA(pipe, *lora_pair[:2]).detach()
    assert not [w for w in caught if "same file" in str(w.message)]
