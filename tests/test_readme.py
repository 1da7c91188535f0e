"""The README's commands stay true: every script it runs exists and accepts the flags shown."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _commands():
    """Every `python <script>.py ...` / `accelerate launch <script>.py ...` in a README code block."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", README, flags=re.S)
    commands = []
    for block in blocks:
        text = re.sub(r"\\\n\s*", " ", block)  # join continued lines
        for line in text.splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue  # not a shell line (JSON, Python)
            command = []
            for word in words + ["&&"]:
                if word not in ("&&", ";"):
                    command.append(word)
                    continue
                if command and command[0] in ("python", "python3", "accelerate"):
                    scripts = [i for i, w in enumerate(command) if w.endswith(".py") and (ROOT / w).is_file()]
                    if scripts:
                        commands.append((command[scripts[0]], command[scripts[0] + 1:]))
                command = []
    return commands


def test_readme_mentions_the_main_commands():
    scripts = {script for script, _ in _commands()}
    assert {"inference_sd.py", "inference.py", "inference_video.py", "inference_flux.py", "inference_gradio.py",
            "train_dreambooth_lora_sdxl.py", "evaluate_grid.py", "evaluate_metrics.py",
            "benchmarks/speed.py"} <= scripts
    assert "bash .ci/run" in README


@pytest.mark.parametrize("script,args", _commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_readme_command_parses(script, args):
    """Parse each command line with the script's own parser (nothing runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build_parser().parse_args(args)  # argparse exits (SystemExit) on any unknown flag or bad value


@pytest.mark.parametrize("script,flags", [
    ("inference.py", ["--demo_family", "--call_arg", "--true_cfg_scale", "--image", "--strength", "--progress",
                      "--switching", "--compile", "--cpu_offload"]),
    ("inference_video.py", ["--num_frames", "--fps", "--guidance_scale_2", "--lora_name_or_path_content_2",
                            "--lora_name_or_path_style_2", "--save_frames", "--sequential_cpu_offload"]),
])
def test_new_scripts_help(script, flags, capsys):
    """``python <script> --help`` prints the flags the README documents and exits 0."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_:
        module.build_parser().parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out, flag


@pytest.mark.slow
@pytest.mark.parametrize("script,folder,files", [
    ("inference.py", "demo_output/sdxl", ["klora-sstar_seed0.png", "klora-sstar_seed0_selection.png",
                                          "selection_log.json"]),
    ("inference_video.py", "demo_output/video", ["klora-sstar_seed0.mp4", "klora-sstar_seed0_selection.png",
                                                 "selection_log.json"]),
])
def test_new_scripts_demo(script, folder, files, tmp_path):
    """``python <script> --demo --overwrite``, as a user runs it from a fresh folder."""
    from conftest import run_script

    result = run_script(script, "--demo", "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "noise; the demo checks the installation" in result.stdout and "Traceback" not in result.stderr
    assert sorted(p.name for p in (tmp_path / folder).iterdir()) == files
