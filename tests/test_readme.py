"""The README and docs/ stay true: every script they run exists and accepts the flags shown, and
every relative link leads to a file (and heading) that exists."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # the README and every docs page


def _commands(text):
    """Every `python <script>.py ...` / `accelerate launch <script>.py ...` in a code block of ``text``."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
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


def _page_commands():
    """(page, script, args) for every command in the README and in docs/*.md."""
    return [(page.relative_to(ROOT).as_posix(), script, args)
            for page in PAGES for script, args in _commands(page.read_text())]


def test_readme_mentions_the_main_commands():
    """The README is the front door: it shows every top-level script and how to run the tests."""
    scripts = {script for script, _ in _commands(README)}
    assert {"inference_sd.py", "inference.py", "inference_video.py", "inference_flux.py", "inference_gradio.py",
            "train_dreambooth_lora_sdxl.py", "evaluate_grid.py", "evaluate_metrics.py"} <= scripts
    assert "bash .ci/run" in README
    assert "benchmarks/speed.py" in {script for _, script, _ in _page_commands()}  # docs/speed.md


def test_ci_runs_the_readme_test_command():
    """`.ci/run` runs exactly the test command the README gives."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line
          and not line.lstrip().startswith("#")]
    assert ci == ["python -m pytest -q"]
    assert "`pip install -r requirements-dev.txt && python -m pytest -q`" in README


@pytest.mark.parametrize("page,script,args", _page_commands(),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_readme_command_parses(page, script, args):
    """Parse each command line of the README and docs/ with the script's own parser (nothing runs)."""
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


def _outside_code(text):
    """``text`` without its fenced code blocks (a ``# comment`` there is no heading, ``[x](y)`` no link)."""
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)


def _anchors(page):
    """The ``#anchor`` of every heading of a Markdown page, by GitHub's rule: lowercase, punctuation other
    than '-' and '_' dropped, spaces to '-'; a repeated heading gets -1, -2, ..."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _outside_code(page.read_text()), flags=re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
        seen[anchor] = seen.get(anchor, 0) + 1
    return anchors


def _links(page):
    """Every link and image target of a Markdown page, outside code."""
    text = re.sub(r"`[^`\n]*`", "", _outside_code(page.read_text()))
    return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)


def _broken_links(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):
            continue  # https:, mailto: ...
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or not linked.is_relative_to(ROOT):
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_links_resolve(page):
    """Every relative link of the README and docs/ leads to an existing file, and an ``#anchor`` to a heading."""
    if page.name == "README.md":
        assert len(_links(page)) > 10  # the links are found at all
    assert _broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in _links(ROOT / "README.md")}
    assert [page.name for page in PAGES[1:] if page.resolve() not in linked] == []
