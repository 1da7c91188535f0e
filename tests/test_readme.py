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
    assert {"inference_sd.py", "inference_flux.py", "inference_gradio.py", "train_dreambooth_lora_sdxl.py",
            "evaluate_grid.py", "evaluate_metrics.py", "benchmarks/speed.py"} <= scripts
    assert "bash .ci/run" in README


@pytest.mark.parametrize("script,args", _commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_readme_command_parses(script, args):
    """Parse each command line with the script's own parser (nothing runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build_parser().parse_args(args)  # argparse exits (SystemExit) on any unknown flag or bad value
