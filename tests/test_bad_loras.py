"""Broken LoRA files through inference_sd.py, as a user runs it (issue 12).

Every broken file is a valid demo LoRA for the tiny SDXL with one thing changed
(``bad_lora_files``); the other LoRA is the valid demo style LoRA. A refusal is
exit 2, one ``error:`` line naming the file and the layer or source, no
traceback, no output file. A warning is exit 0, images written, one
``warning:`` line. Expected messages are built from what the test put in the
file; gamma, ratios and choices are recomputed from the files in float64.

The last part loads every format the project reads (SDXL and FLUX, fp32, fp16,
bf16) and checks, layer by layer, that the update applied is alpha / rank * B @ A
as written, in both switching modes.
"""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch

import bad_lora_files as bad
import flux_lora_files
import inference_flux
import inference_sd
import lora_files
from applied import applied_delta, base_weights
from conftest import run_script
from klora import cli
from klora.fusion import ADAPTER_NAMES, KLoRA

# The layer the broken files break: a cross-attention key projection, 64 -> 48 in the tiny SDXL, rank 8.
L = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
IN, OUT, RANK = 64, 48, 8


# --- running the command line --------------------------------------------------------------

def run_cli(argv, capfd, monkeypatch, main=inference_sd.main):
    """``cli.run(main, argv)`` in this process: (exit code, stdout, stderr at the file-descriptor level)."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # cli.run replaces it; undo after
    with warnings.catch_warnings():
        interpreter_filters()
        code = cli.run(main, [str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def interpreter_filters() -> None:
    """The warning filters of a fresh ``python script.py`` (pytest's own show every DeprecationWarning)."""
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    warnings.simplefilter("default", append=True)


def messages(err: str) -> list[str]:
    """stderr without progress bars: every line a user would read as a message."""
    lines = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err).replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and not re.search(r"\|\s*\d+/\d+ \[", line)]


def argv_for(model, content, style, out, steps=2):
    return ["--pretrained_model_name_or_path", model, "--lora_name_or_path_content", content,
            "--lora_name_or_path_style", style, "--prompt", "a sbu dog in szn style",
            "--num_inference_steps", steps, "--height", 64, "--width", 64, "--device", "cpu",
            "--output_folder", out, "--selection_log", out / "log.json"]


def run_as_user(*argvs):
    """inference_sd.py in its own processes, side by side, in a user's environment (conftest's quieting
    variables removed): one CompletedProcess per argv."""
    from concurrent.futures import ThreadPoolExecutor

    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(len(argvs)) as pool:
        for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
            patch.delenv(name, raising=False)
        return list(pool.map(lambda argv: run_script("inference_sd.py", *map(str, argv)), argvs))


def written(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def assert_refused(code, out, err, role, path, fragments, folder):
    lines = messages(err)
    assert code == 2, err
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {role} '{path}': "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in err and "wrote" not in out
    assert written(folder) == []


def assert_ran(code, out, err, folder, method_tag="klora-sstar"):
    assert code == 0, err
    assert "Traceback" not in err
    assert {f"{method_tag}_seed0.png", f"{method_tag}_seed0_selection.png", "log.json"} <= set(written(folder))
    return messages(err)


# --- the broken files ----------------------------------------------------------------------

# name -> (maker of the broken file from the valid one, fragments the error line must hold)
REFUSED = {
    # pairs
    "lora_A_missing": (lambda f: bad.change_factors(f, L, drop_A=True),
                       [f"layer 'unet.{L}'", f"lora_B ({OUT}x{RANK})", "no lora_A"]),
    "lora_B_missing": (lambda f: bad.change_factors(f, L, drop_B=True),
                       [f"layer 'unet.{L}'", f"lora_A ({RANK}x{IN})", "no lora_B"]),
    "ranks_disagree": (lambda f: bad.change_factors(f, L, A=lambda A: A[:4]),
                       [f"layer 'unet.{L}'", "ranks disagree", f"lora_A 4x{IN}", f"lora_B {OUT}x{RANK}"]),
    "rank_0_factors": (lambda f: bad.change_factors(f, L, A=lambda A: A[:0], B=lambda B: B[:, :0]),
                       [f"layer 'unet.{L}'", "rank 0", f"lora_A 0x{IN}", f"lora_B {OUT}x0"]),
    "factor_1d": (lambda f: bad.change_factors(f, L, A=lambda A: A.flatten()),
                  [f"layer 'unet.{L}'", f"lora_A is 1-D ({RANK * IN})"]),
    "factors_3d_on_linear": (lambda f: bad.change_factors(f, L, A=lambda A: A[..., None], B=lambda B: B[..., None]),
                             [f"layer '{L}'", "3 and 3 dimensions", "Linear takes 2"]),
    "factors_4d_on_linear": (lambda f: bad.change_factors(f, L, A=lambda A: A[..., None, None],
                                                          B=lambda B: B[..., None, None]),
                             [f"layer '{L}'", "4 and 4 dimensions", "Linear takes 2"]),
    "factor_int": (lambda f: bad.change_factors(f, L, A=lambda A: (A * 100).to(torch.int32)),
                   [f"layer 'unet.{L}'", "lora_A is int32, not floating point"]),
    "factor_bool": (lambda f: bad.change_factors(f, L, B=lambda B: B > 0),
                    [f"layer 'unet.{L}'", "lora_B is bool, not floating point"]),
    "in_features_differ": (lambda f: bad.change_factors(f, L, A=lambda A: A[:, :48]),
                           [f"layer '{L}'", f"is {IN}->{OUT} in this UNet2DConditionModel", f"48->{OUT} in the LoRA"]),
    "out_features_differ": (lambda f: bad.change_factors(f, L, B=lambda B: torch.cat([B, B[:2]])),
                            [f"layer '{L}'", f"is {IN}->{OUT} in this", f"{IN}->{OUT + 2} in the LoRA"]),
    # rank and alpha in the metadata
    "metadata_rank_0": (lambda f: bad.with_config(f, r=0), ["'lora_adapter_metadata' 'unet.r' is 0", "rank must"]),
    "metadata_rank_negative": (lambda f: bad.with_config(f, r=-8), ["'unet.r' is -8", "rank must be a positive"]),
    "metadata_alpha_0": (lambda f: bad.with_config(f, lora_alpha=0),
                         ["'lora_adapter_metadata' 'unet.lora_alpha' is 0", "alpha must be a positive"]),
    "metadata_alpha_negative": (lambda f: bad.with_config(f, lora_alpha=-8),
                                ["'unet.lora_alpha' is -8", "alpha must be a positive"]),
    "metadata_alpha_missing": (lambda f: bad.with_config(f, lora_alpha=None),
                               ["'lora_adapter_metadata' has no 'unet.lora_alpha'", "default alpha 8"]),
    "metadata_not_json": (lambda f: bad.with_metadata(f, lora_adapter_metadata='{"unet.r": 8, "unet.lora_alpha": 8'),
                          ["metadata 'lora_adapter_metadata' is not valid JSON"]),
    "metadata_alpha_string": (lambda f: bad.with_config(f, lora_alpha="eight"),
                              ["'unet.lora_alpha' is \"eight\", not a number"]),
    "metadata_rank_string": (lambda f: bad.with_config(f, r="8"), ["'unet.r' is \"8\", not a number"]),
    "metadata_rank_contradicts_tensors": (lambda f: bad.with_config(f, r=4),
                                          [f"has rank {RANK} (lora_A {RANK}x", "'unet.r' says 4"]),
    "metadata_rank_pattern_contradicts_tensors": (
        lambda f: bad.with_config(f, rank_pattern={L: 4}),
        [f"layer 'unet.{L}' has rank {RANK} (lora_A {RANK}x{IN})", f"'unet.rank_pattern'['{L}'] says 4"]),
    "metadata_alpha_contradicts_alpha_key": (lambda f: bad.with_alpha_keys(f, 4.0, [L]),
                                             [f"layer 'unet.{L}'", ".alpha key says 4",
                                              "'unet.lora_alpha' says 8"]),
    "alpha_key_0": (lambda f: bad.with_alpha_keys(f, 0.0, [L]), [f"layer 'unet.{L}' has alpha 0 (its .alpha key)"]),
    "alpha_key_negative": (lambda f: bad.with_alpha_keys(f, -8.0, [L]),
                           [f"layer 'unet.{L}' has alpha -8 (its .alpha key)", "must be positive"]),
    # kohya's metadata is a source too
    "kohya_dim_0": (lambda f: bad.with_metadata(f, ss_network_dim="0"), ["ss_network_dim says 0"]),
    "kohya_alpha_negative": (lambda f: bad.with_metadata(f, ss_network_alpha="-4"), ["ss_network_alpha says -4"]),
    "kohya_dim_contradicts_tensors": (lambda f: bad.with_metadata(f, ss_network_dim="4"),
                                      [f"has rank {RANK}", "ss_network_dim says 4"]),
    "kohya_alpha_contradicts_alpha_key": (
        lambda f: bad.with_metadata(bad.with_alpha_keys(f, 4.0), lora_adapter_metadata=None, ss_network_alpha="2"),
        [".alpha key says 4", "ss_network_alpha says 2"]),
    # other algorithms and containers
    "dora_scale": (lambda f: bad.replace(f, **{f"unet.{L}.dora_scale": torch.ones(OUT, 1)}), ["DoRA", "dora_scale"]),
    "nan_weight": (lambda f: bad.with_value(f, L, float("nan")), [f"'unet.{L}.lora_A.weight' contains NaN or Inf"]),
    "inf_weight": (lambda f: bad.with_value(f, L, float("inf")), [f"'unet.{L}.lora_A.weight' contains NaN or Inf"]),
    "no_lora_keys": (lambda f: ({"conv_in.weight": torch.ones(4, 4)}, {}), ["not a LoRA", "'conv_in.weight'"]),
    "no_tensors": (lambda f: ({}, {}), ["holds no tensors"]),
    "layers_the_model_lacks": (lambda f: ({"unet.nowhere.lora_A.weight": torch.ones(2, 4),
                                           "unet.nowhere.lora_B.weight": torch.ones(4, 2)},
                                          {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 2})}),
                               ["none of its 1 layers exist", "'nowhere'"]),
}
CONTAINERS = {
    "truncated": (bad.truncated, ["truncated or corrupted"]),
    "corrupted_header": (bad.corrupted_header, ["truncated or corrupted", "invalid JSON in header"]),
    "absurd_header_length": (bad.absurd_header_length, ["truncated or corrupted", "header too large"]),
    "empty_file": (lambda source, target: bad.empty(target), ["truncated or corrupted", "header too small"]),
}


@pytest.fixture(scope="module")
def files(demo_sdxl_loras, tmp_path_factory):
    """{case: path} of every broken file, all made from the valid demo content LoRA."""
    content, _ = demo_sdxl_loras
    valid = bad.read(content)
    down, up = bad.factor_keys(L)
    assert tuple(valid[0][down].shape) == (RANK, IN) and tuple(valid[0][up].shape) == (OUT, RANK)
    assert bad.adapter_config(valid[1])["unet.lora_alpha"] == RANK
    folder = tmp_path_factory.mktemp("bad-loras")
    paths = {name: bad.write(folder / f"{name}.safetensors", *maker(valid)) for name, (maker, _) in REFUSED.items()}
    for name, (maker, _) in CONTAINERS.items():
        paths[name] = maker(content, folder / f"{name}.safetensors")
    return paths


@pytest.fixture
def sd_argv(tiny_sdxl_dir, demo_sdxl_loras, tmp_path):
    content, style = demo_sdxl_loras
    return lambda content=content, style=style, steps=2: argv_for(tiny_sdxl_dir, content, style, tmp_path / "out",
                                                                  steps)


# --- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(REFUSED) + list(CONTAINERS))
def test_a_broken_content_lora_is_refused_in_one_line(case, files, sd_argv, tmp_path, capfd, monkeypatch):
    fragments = (REFUSED.get(case) or CONTAINERS[case])[1]
    code, out, err = run_cli(sd_argv(content=files[case]), capfd, monkeypatch)
    assert_refused(code, out, err, "content LoRA", files[case], fragments, tmp_path / "out")


@pytest.mark.parametrize("case", ["lora_A_missing", "ranks_disagree", "metadata_alpha_string", "in_features_differ"])
def test_a_broken_style_lora_is_refused_alike(case, files, sd_argv, tmp_path, capfd, monkeypatch):
    code, out, err = run_cli(sd_argv(style=files[case]), capfd, monkeypatch)
    assert_refused(code, out, err, "style LoRA", files[case], REFUSED[case][1], tmp_path / "out")


PROCESS_CASES = ("lora_A_missing", "in_features_differ")  # refused from the file alone / against the model


@pytest.fixture(scope="module")
def real_processes(files, demo_sdxl_loras, tiny_sdxl_dir, tmp_path_factory):
    """inference_sd.py in its own process for the two refusals and an all-zero content LoRA:
    {case: (CompletedProcess, output folder)}."""
    folder = tmp_path_factory.mktemp("processes")
    file = bad.read(demo_sdxl_loras[0])
    paths = {case: files[case] for case in PROCESS_CASES}
    paths["all_zero"] = bad.write(folder / "all_zero.safetensors", *bad.zero_layers(file, bad.layers(file[0]), "B"))
    outs = {case: folder / case for case in paths}
    results = run_as_user(*(argv_for(tiny_sdxl_dir, path, demo_sdxl_loras[1], outs[case])
                            for case, path in paths.items()))
    return {case: (result, outs[case], paths[case]) for case, result in zip(paths, results)}


@pytest.mark.slow
@pytest.mark.parametrize("case", PROCESS_CASES)
def test_refusal_from_a_real_process(case, files, real_processes):
    result, folder, _ = real_processes[case]
    assert_refused(result.returncode, result.stdout, result.stderr, "content LoRA", files[case], REFUSED[case][1],
                   folder)


@pytest.mark.slow
def test_a_file_refusal_prints_nothing_but_the_error_line(real_processes):
    """The files are read and checked before the base model loads: not even a progress bar."""
    result, _, _ = real_processes["lora_A_missing"]
    assert result.returncode == 2
    assert result.stderr.splitlines() == [messages(result.stderr)[0]]


@pytest.mark.slow
def test_a_model_refusal_prints_nothing_but_the_error_line(real_processes):
    result, _, _ = real_processes["in_features_differ"]
    assert result.returncode == 2
    assert result.stderr.splitlines() == [messages(result.stderr)[0]]


# --- warnings --------------------------------------------------------------------------------

def _run_with(sd_argv, tmp_path, capfd, monkeypatch, **loras):
    code, out, err = run_cli(sd_argv(**loras), capfd, monkeypatch)
    lines = assert_ran(code, out, err, tmp_path / "out")
    assert all(line.startswith("warning: ") for line in lines), lines  # nothing raw from the libraries
    return lines, json.loads((tmp_path / "out" / "log.json").read_text())


def test_no_alpha_anywhere_is_a_warning(demo_sdxl_loras, sd_argv, tmp_path, capfd, monkeypatch):
    path = bad.write(tmp_path / "no_alpha.safetensors",
                     *bad.with_metadata(bad.read(demo_sdxl_loras[0]), lora_adapter_metadata=None))
    lines, _ = _run_with(sd_argv, tmp_path, capfd, monkeypatch, content=path)
    assert len(lines) == 1
    assert lines[0].startswith(f"warning: content LoRA '{path}': no alpha in the file")
    assert "alpha = rank assumed" in lines[0]


def test_some_layers_without_alpha_is_a_warning_naming_one(demo_sdxl_loras, sd_argv, tmp_path, capfd, monkeypatch):
    valid = bad.read(demo_sdxl_loras[0])
    names = bad.layers(valid[0])
    file = bad.with_alpha_keys(bad.with_metadata(valid, lora_adapter_metadata=None), float(RANK), names[1:])
    path = bad.write(tmp_path / "partial_alpha.safetensors", *file)
    lines, _ = _run_with(sd_argv, tmp_path, capfd, monkeypatch, content=path)
    assert len(lines) == 1
    assert lines[0].startswith(f"warning: content LoRA '{path}': 1 of {len(names)} layers have no alpha")
    assert f"'unet.{names[0]}'" in lines[0] and "alpha = rank assumed" in lines[0]


def file_deltas(path, prefix="unet") -> dict[str, torch.Tensor]:
    """{module: alpha / rank * B @ A} in float64, read straight from a diffusers-format file with PEFT metadata."""
    tensors, metadata = bad.read(path)
    config = bad.adapter_config(metadata)
    deltas = {}
    for layer in bad.layers(tensors, prefix):
        A, B = (tensors[key].double() for key in bad.factor_keys(layer, prefix))
        rank = config.get(f"{prefix}.rank_pattern", {}).get(layer, config[f"{prefix}.r"])
        alpha = config.get(f"{prefix}.alpha_pattern", {}).get(layer, config[f"{prefix}.lora_alpha"])
        assert rank == A.shape[0]
        deltas[layer] = alpha / rank * (B @ A)
    return deltas


def expected_gamma(content, style, layers) -> float:
    """The spec's trimmed mean of sum|dW_c| / sum|dW_s| over ``layers``."""
    ratios = [float(content[m].abs().sum() / style[m].abs().sum()) for m in layers]
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return sum(kept) / len(kept)


def topk(delta, k) -> float:
    return float(torch.topk(delta.abs().flatten(), k).values.sum())


@pytest.mark.parametrize("zero", [("content",), ("style",), ("content", "style")])
def test_an_all_zero_lora_warns_and_the_other_lora_acts_alone(zero, demo_sdxl_loras, sd_argv, tmp_path, capfd,
                                                                monkeypatch):
    paths = {}
    for role, source in zip(("content", "style"), demo_sdxl_loras):
        if role in zero:
            file = bad.read(source)
            paths[role] = bad.write(tmp_path / f"zero_{role}.safetensors",
                                    *bad.zero_layers(file, bad.layers(file[0]), "A"))
    names = bad.layers(bad.read(demo_sdxl_loras[0])[0])
    lines, log = _run_with(sd_argv, tmp_path, capfd, monkeypatch, **paths)
    for role, path in paths.items():
        other = "style" if role == "content" else "content"
        file_line = [line for line in lines if line.startswith(f"warning: {role} LoRA '{path}': ")]
        assert len(file_line) == 1, lines
        assert f"every weight delta in this LoRA is zero ({len(names)} layers)" in file_line[0]
        assert any(f"{len(names)} layers both LoRAs adapt are all zero in the {role} LoRA '{path}'" in line
                   and f"the {other} LoRA is used there at every step" in line for line in lines), lines
    if len(zero) == 1:
        assert log["only"] == {name: "style" if zero == ("content",) else "content" for name in names}
    else:  # both zero: either LoRA adds nothing; the layer is still not compared
        assert set(log["only"]) == set(names) and set(log["only"].values()) <= {"content", "style"}
    assert log["layers"] == {}
    assert log["gamma"] == 1.0  # no layer where both act: the LoRAs are never compared
    assert all(step["choices"] == {} for step in log["generations"][0]["steps"])


def test_an_all_zero_lora_gets_no_contradicting_warning(demo_sdxl_loras, sd_argv, tmp_path, capfd, monkeypatch):
    file = bad.read(demo_sdxl_loras[0])
    path = bad.write(tmp_path / "zero.safetensors", *bad.zero_layers(file, bad.layers(file[0]), "A"))
    lines, _ = _run_with(sd_argv, tmp_path, capfd, monkeypatch, content=path)
    assert not any("adapt no layer in common" in line for line in lines), lines


def zero_layer_files(demo_sdxl_loras, folder):
    """(content path, style path, content zeros, style zeros, both zero) with disjoint all-zero layer sets."""
    content, style = (bad.read(p) for p in demo_sdxl_loras)
    names = bad.layers(content[0])
    zero_content, zero_style, zero_both = names[0:3], names[10:13], names[20:21]
    content = bad.zero_layers(content, zero_content + zero_both, "B")
    style = bad.zero_layers(style, zero_style + zero_both, "A")
    return (bad.write(folder / "some_zero_content.safetensors", *content),
            bad.write(folder / "some_zero_style.safetensors", *style), zero_content, zero_style, zero_both)


def test_all_zero_layers_warn_and_the_rule_skips_them(demo_sdxl_loras, sd_argv, tmp_path, capfd, monkeypatch):
    content_path, style_path, zero_content, zero_style, zero_both = zero_layer_files(demo_sdxl_loras, tmp_path)
    lines, log = _run_with(sd_argv, tmp_path, capfd, monkeypatch, content=content_path, style=style_path)
    total = len(bad.layers(bad.read(content_path)[0]))
    for role, path, zeros in (("content", content_path, zero_content), ("style", style_path, zero_style)):
        other = "style" if role == "content" else "content"
        named = [line for line in lines if line.startswith(f"warning: {role} LoRA '{path}': ")]
        assert len(named) == 1 and f"{len(zeros) + 1} of {total} layers have a zero delta" in named[0], lines
        assert f"'unet.{zeros[0]}'" in named[0]
        count = len(zeros) + len(zero_both)
        assert any(line.startswith(f"warning: K-LoRA: {count} layers both LoRAs adapt are all zero in the {role} LoRA")
                   and f"the {other} LoRA is used there at every step" in line for line in lines), lines

    # A layer with a zero side is not compared: the other LoRA acts there at every step.
    assert {k: v for k, v in log["only"].items() if k not in zero_both} == {
        **{name: "style" for name in zero_content}, **{name: "content" for name in zero_style}}
    assert set(log["only"]) == set(zero_content + zero_style + zero_both)
    content, style = file_deltas(content_path), file_deltas(style_path)
    both = [m for m in content if m not in log["only"]]
    assert set(log["layers"]) == set(both) and len(both) == total - 7
    gamma = expected_gamma(content, style, both)
    assert math.isfinite(log["gamma"]) and log["gamma"] > 0
    assert log["gamma"] == pytest.approx(gamma, rel=1e-5)  # float32 sums in the engine, float64 here
    for m in both:
        stats = log["layers"][m]
        assert stats["k"] == RANK * RANK
        assert stats["content_topk_sum"] == pytest.approx(topk(content[m], RANK * RANK), rel=1e-5)
        assert stats["style_topk_sum"] == pytest.approx(topk(style[m], RANK * RANK), rel=1e-5)
    for step in log["generations"][0]["steps"]:
        assert set(step["choices"]) == set(both)
        for m in both:
            left = topk(content[m], RANK * RANK) / gamma
            right = topk(style[m], RANK * RANK) * step["scale"]
            if abs(left - right) > 1e-5 * max(left, right):  # a near-tie may go either way in float32
                assert step["choices"][m] == ("content" if left > right else "style"), (m, step["step"])


@pytest.mark.slow
def test_an_all_zero_lora_from_a_real_process(demo_sdxl_loras, real_processes):
    result, folder, path = real_processes["all_zero"]
    lines = assert_ran(result.returncode, result.stdout, result.stderr, folder)
    assert all(line.startswith("warning: ") for line in lines), lines
    assert any(line.startswith(f"warning: content LoRA '{path}': every weight delta in this LoRA is zero")
               for line in lines), lines
    log = json.loads((folder / "log.json").read_text())
    assert log["only"] == {name: "style" for name in bad.layers(bad.read(path)[0])} and log["gamma"] == 1.0
    assert "gamma 1," in result.stdout


def test_a_peft_dora_file_is_refused(demo_sdxl_loras, sd_argv, tmp_path, capfd, monkeypatch):
    tensors, metadata = bad.read(demo_sdxl_loras[0])
    for layer in bad.layers(tensors):
        tensors[f"unet.{layer}.lora_magnitude_vector"] = torch.ones(tensors[bad.factor_keys(layer)[1]].shape[0])
    path = bad.write(tmp_path / "peft_dora.safetensors", tensors, metadata)
    code, out, err = run_cli(sd_argv(content=path), capfd, monkeypatch)
    assert_refused(code, out, err, "content LoRA", path, ["DoRA"], tmp_path / "out")


# --- every accepted format: accepted as before, and applied exactly as written ---------------
#
# Ground truth: alpha / rank * B @ A in float64 from the tensors as written (fp16/bf16 values
# included). The model computes in float32, so the check allows, per element, float32's
# rounding of that very product: eps32 * ((rank + 2) * |alpha / rank| * (|B| @ |A|)), plus, with
# fused switching, one rounding of the new weight, eps32 * |W0 + dW|. Measured: adapters are
# exact (error 0), fused weights reach half the bound. A factor rounded to fp16/bf16 on the
# way (scaled by alpha / rank in the file's dtype) is off by 1e-4 to 3e-3 of the update:
# hundreds of times the bound.

SDXL_FORMATS = {  # name -> (writer, dtype, the file states alphas)
    "peft": (lambda p, layers, cfg: lora_files.write_peft(p, layers), torch.float32, True),
    "peft_fp16": (lambda p, layers, cfg: lora_files.write_peft(p, layers), torch.float16, True),
    "peft_bf16": (lambda p, layers, cfg: lora_files.write_peft(p, layers), torch.bfloat16, True),
    "peft_no_alpha": (lambda p, layers, cfg: lora_files.write_peft(p, layers, with_alpha_metadata=False),
                      torch.float32, False),
    "old_diffusers": (lambda p, layers, cfg: lora_files.write_old_diffusers(p, layers), torch.float32, False),
    "old_diffusers_alpha_keys": (lambda p, layers, cfg: lora_files.write_old_diffusers(p, layers,
                                                                                       with_alpha_keys=True),
                                 torch.float32, True),
    "paper_unet_unet": (lambda p, layers, cfg: lora_files.write_old_diffusers(p, layers, prefix="unet.unet"),
                        torch.float32, False),
    "kohya": (lambda p, layers, cfg: lora_files.write_kohya(p, layers), torch.float32, True),
    "kohya_fp16": (lambda p, layers, cfg: lora_files.write_kohya(p, layers), torch.float16, True),
    "kohya_bf16": (lambda p, layers, cfg: lora_files.write_kohya(p, layers), torch.bfloat16, True),
    "kohya_sgm_names": (lambda p, layers, cfg: lora_files.write_kohya(p, layers, lora_files.sgm_name(cfg)),
                        torch.float32, True),
}


def as_written(A, B, alpha):
    """(dW, rank, |scale| * |B| @ |A|) in float64: the update and the size of its float32 rounding."""
    A, B = A.double().flatten(1), B.double().flatten(1)
    scale = alpha / A.shape[0]
    return scale * (B @ A), A.shape[0], abs(scale) * (B.abs() @ A.abs())


def sdxl_truth(unet, name, path):
    """Write format ``name`` with per-layer ranks and alphas; {module: as_written(...)}."""
    writer, dtype, has_alpha = SDXL_FORMATS[name]
    layers = lora_files.random_layers(unet, lora_files.attention_linears(unet), rank=lambda i: 4 if i % 5 else 8,
                                      alpha=lambda i: [2.0, 4.0, 16.0][i % 3], seed=1)
    layers = {k: (A.to(dtype), B.to(dtype), alpha if has_alpha else float(A.shape[0]))
              for k, (A, B, alpha) in layers.items()}
    writer(path, layers, unet.config)
    return {k: as_written(*layer) for k, layer in layers.items()}


def peft_truth(path, prefix):
    tensors, metadata = bad.read(path)
    config = bad.adapter_config(metadata)
    return {m: as_written(*(tensors[k] for k in bad.factor_keys(m, prefix)), config[f"{prefix}.lora_alpha"])
            for m in bad.layers(tensors, prefix)}


class ModuleTable:
    """A denoiser's ``named_modules()`` listed once: ``applied_delta`` looks every layer up in it."""

    def __init__(self, denoiser):
        self.modules = list(denoiser.named_modules())

    def named_modules(self):
        return iter(self.modules)


def assert_applied_as_written(denoiser, before, role, truth, switching):
    eps = torch.finfo(torch.float32).eps
    table = ModuleTable(denoiser)
    with torch.no_grad():
        for path, (delta, rank, size) in truth.items():
            got = applied_delta(table, path, before, ADAPTER_NAMES[role])
            bound = eps * (rank + 2) * size
            if switching == "fused":
                bound = bound + eps * (before[path].double().flatten(1) + delta).abs()
            excess = float(((got - delta).abs() - bound).max())
            assert excess <= 0, (role, path, float((got - delta).abs().max()))


def attach_and_check(pipe, denoiser, content_path, content_truth, style_path, style_truth, switching, has_alpha):
    before = base_weights(denoiser)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        klora = KLoRA(pipe, str(content_path), str(style_path), switching=switching)
    lines = [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    if has_alpha:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(f"content LoRA '{content_path}': no alpha in the file")
    try:
        assert klora.switching == switching
        for role, truth in (("content", content_truth), ("style", style_truth)):
            klora.set_method(role)
            assert_applied_as_written(denoiser, before, role, truth, switching)
    finally:
        klora.detach()  # the module-wide pipeline serves the next case
    assert all(torch.equal(weight, before[path]) for path, weight in base_weights(denoiser).items())


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)


@pytest.mark.parametrize("switching", ["fused", "adapters"])
@pytest.mark.parametrize("name", list(SDXL_FORMATS))
def test_every_sdxl_format_is_applied_as_written(name, switching, sdxl_pipe, demo_sdxl_loras, tmp_path):
    content_truth = sdxl_truth(sdxl_pipe.unet, name, tmp_path / f"{name}.safetensors")
    style = demo_sdxl_loras[1]
    attach_and_check(sdxl_pipe, sdxl_pipe.unet, tmp_path / f"{name}.safetensors", content_truth, style,
                     peft_truth(style, "unet"), switching, SDXL_FORMATS[name][2])


@pytest.mark.parametrize("name", list(SDXL_FORMATS))
def test_every_sdxl_format_runs_from_the_command_line(name, sdxl_pipe, sd_argv, tmp_path, capfd, monkeypatch):
    path = tmp_path / f"{name}.safetensors"
    sdxl_truth(sdxl_pipe.unet, name, path)
    code, out, err = run_cli(sd_argv(content=path), capfd, monkeypatch)
    lines = assert_ran(code, out, err, tmp_path / "out")
    if SDXL_FORMATS[name][2]:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(f"warning: content LoRA '{path}': no alpha in the file")


FLUX_FORMATS = {  # name -> (units maker(transformer, dtype), writer, the file states alphas)
    # diffusers save_lora_weights: every block linear, per-layer ranks and alphas in the PEFT metadata
    "diffusers": (lambda t, dtype: flux_lora_files.diffusers_units(
        t, flux_lora_files.block_linears(t), rank=lambda i: 2 + i % 3, alpha=lambda i: 1.0 + i % 4, seed=1,
        dtype=dtype), flux_lora_files.write_diffusers, True),
    # ai-toolkit: q/k/v/out, alphas as ".alpha" scalars, no metadata
    "ai_toolkit": (lambda t, dtype: flux_lora_files.diffusers_units(
        t, flux_lora_files.block_linears(t, flux_lora_files.ATTENTION), rank=4, alpha=lambda i: 0.5 * (1 + i % 5),
        seed=1, dtype=dtype), lambda p, u: flux_lora_files.write_diffusers(p, u, metadata=False, alpha_keys=True),
        True),
    "peft_no_alpha": (lambda t, dtype: flux_lora_files.diffusers_units(
        t, flux_lora_files.block_linears(t, flux_lora_files.ATTENTION), rank=8, seed=1, dtype=dtype),
        lambda p, u: flux_lora_files.write_diffusers(p, u, metadata=False), False),
    # kohya: fused qkv, alpha 3 on rank 4 (a scale that is no power of two)
    "kohya": (lambda t, dtype: flux_lora_files.fused_units(t, "kohya", rank=4, alpha=3.0, seed=1, dtype=dtype,
                                                           keep=lambda name: name != "linear1"),
              flux_lora_files.write_kohya, True),
    "xlabs": (lambda t, dtype: flux_lora_files.fused_units(t, "xlabs", rank=6, seed=1, dtype=dtype),
              flux_lora_files.write_xlabs, False),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def flux_truth(transformer, name, dtype, path):
    """Write FLUX format ``name``; {module: as_written(...)} for every module a unit feeds (B rows split)."""
    maker, writer, _ = FLUX_FORMATS[name]
    units = maker(transformer, dtype)
    writer(path, units)
    modules = dict(transformer.named_modules())
    truth = {}
    for unit in units:
        row = 0
        for module in unit.modules:
            out = modules[module].out_features
            alpha = unit.alpha if unit.alpha is not None else unit.A.shape[0]
            truth[module] = as_written(unit.A, unit.B[row:row + out], alpha)
            row += out
    return truth


@pytest.fixture(scope="module")
def flux_setup(tiny_flux_dir, tmp_path_factory):
    """(tiny FLUX pipeline, style file, its truth): the style is a plain diffusers file on q/k/v/out."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    t = pipe.transformer
    units = flux_lora_files.diffusers_units(t, flux_lora_files.block_linears(t, flux_lora_files.ATTENTION), rank=4,
                                            alpha=2.0, seed=2)
    path = tmp_path_factory.mktemp("flux-style") / "style.safetensors"
    flux_lora_files.write_diffusers(path, units)
    return pipe, path, peft_truth(path, "transformer")


FLUX_FILES = [(name, "fp32") for name in FLUX_FORMATS] + [
    ("diffusers", "fp16"), ("diffusers", "bf16"), ("xlabs", "bf16"), ("kohya", "fp16"), ("kohya", "bf16")]


@pytest.mark.parametrize("switching", ["fused", "adapters"])
@pytest.mark.parametrize("name,dtype", FLUX_FILES)
def test_every_flux_format_is_applied_as_written(name, dtype, switching, flux_setup, tmp_path):
    pipe, style, style_truth = flux_setup
    path = tmp_path / f"{name}_{dtype}.safetensors"
    truth = flux_truth(pipe.transformer, name, DTYPES[dtype], path)
    attach_and_check(pipe, pipe.transformer, path, truth, style, style_truth, switching, FLUX_FORMATS[name][2])


@pytest.mark.parametrize("name,dtype", FLUX_FILES)
def test_every_flux_format_runs_from_the_command_line(name, dtype, flux_setup, tiny_flux_dir, tmp_path, capfd,
                                                      monkeypatch):
    pipe, style, _ = flux_setup
    path = tmp_path / f"{name}_{dtype}.safetensors"
    flux_truth(pipe.transformer, name, DTYPES[dtype], path)
    argv = argv_for(tiny_flux_dir, path, style, tmp_path / "out")
    code, out, err = run_cli(argv, capfd, monkeypatch, main=inference_flux.main)
    lines = assert_ran(code, out, err, tmp_path / "out")
    if FLUX_FORMATS[name][2]:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(f"warning: content LoRA '{path}': no alpha in the file")
