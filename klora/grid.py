"""The paper's comparison set-up: content x style pairs, methods and seeds.

A pairs file names the content (subject) LoRAs, the style LoRAs, their trigger
words and reference images, and which pairs to generate. ``evaluate_grid.py``
turns it into one image per (pair, method, seed) in a fixed folder layout::

    results/run.json                                  settings and pairs of the run
    results/images/<content>__<style>/<method>/seed<N>.png
    results/grids/method_<method>_seed<N>.png         rows = styles, columns = subjects
    results/grids/pair_<content>__<style>.png         rows = seeds, columns = methods

``evaluate_metrics.py`` scores whatever PNGs that layout holds, so images made by
other methods (B-LoRA, ZipLoRA, ...) dropped into ``images/<pair>/<name>/`` are
scored beside ours.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from . import atomic
from .errors import KLoRAError

# Method tags of the comparison and what they mean for ``KLoRA``: (method, pattern, attach-time options).
METHODS = {
    "klora-s": ("klora", "s", {}),
    "klora-sstar": ("klora", "s*", {}),
    "est-s": ("est", "s", {}),
    "est-sstar": ("est", "s*", {}),
    "switch": ("switch", None, {}),
    "np": ("np", None, {}),
    "np-hard": ("np", None, {"np_mu": float("inf")}),
    "merge": ("merge", None, {}),
    "content": ("content", None, {}),
    "style": ("style", None, {}),
}
METHOD_LABELS = {
    "klora-s": "K-LoRA (s)",
    "klora-sstar": "K-LoRA (s*)",
    "est-s": "EST-LoRA (s)",
    "est-sstar": "EST-LoRA (s*)",
    "switch": "LoRA Switch",
    "np": "NP-LoRA (mu 0.5)",
    "np-hard": "NP-LoRA (mu inf)",
    "merge": "Direct merge",
    "content": "Content LoRA only",
    "style": "Style LoRA only",
}
DEFAULT_TEMPLATE = "{content} in {style} style"
# The step-split sweep (evaluate_grid.py --sweep): one LoRA for the first k steps, the other after.
_SPLIT = re.compile(r"^(c2s|s2c)-(\d+)$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PairsError(KLoRAError):
    """A mistake in the pairs file."""


# --- the pairs file ----------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One content or one style LoRA with what the evaluation needs to know about it."""

    role: str  # "content" or "style"
    name: str
    lora: str  # absolute local path or hub id
    weight_name: str | None
    trigger: str  # the words the prompt uses for it
    description: str  # plain words for the CLIP text score (default: the trigger)
    images: tuple[str, ...]  # reference images, absolute paths


@dataclass(frozen=True)
class Pair:
    content: Entry
    style: Entry
    prompt: str  # generation prompt (trigger words)
    text_prompt: str  # the same template with descriptions, for the CLIP text score

    @property
    def id(self) -> str:
        return pair_id(self.content.name, self.style.name)


@dataclass
class Spec:
    contents: dict[str, Entry]
    styles: dict[str, Entry]
    pairs: list[Pair]
    source: str = ""

    def pair(self, pid: str) -> Pair | None:
        return next((p for p in self.pairs if p.id == pid), None)


def pair_id(content: str, style: str) -> str:
    return f"{content}__{style}"


def load_pairs(path: str | os.PathLike) -> Spec:
    """Read and check a pairs file (JSON, or YAML when PyYAML is installed).

    Relative paths inside it are relative to the file's folder. Everything is
    checked here, before any image is generated.
    """
    path = Path(path).expanduser()
    label = f"pairs file '{path}'"
    if not path.is_file():
        raise PairsError(f"{label}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise PairsError(f"{label}: reading YAML needs PyYAML (pip install pyyaml), or write the file as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PairsError(f"{label}: not valid YAML ({str(exc).splitlines()[0]})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PairsError(f"{label}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    return spec_from_dict(data, path.parent.resolve(), label)


def spec_from_dict(data, base: Path, label: str = "pairs") -> Spec:
    if not isinstance(data, dict):
        raise PairsError(f"{label}: expected an object with 'contents', 'styles' and optionally 'pairs'")
    unknown = set(data) - {"contents", "styles", "pairs", "prompt_template"}
    if unknown:
        raise PairsError(f"{label}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                         "(known: contents, styles, pairs, prompt_template)")
    template = data.get("prompt_template", DEFAULT_TEMPLATE)
    _check_template(template, f"{label}: prompt_template")
    entries = {}
    for role, key in (("content", "contents"), ("style", "styles")):
        items = data.get(key)
        if not isinstance(items, list) or not items:
            raise PairsError(f"{label}: '{key}' must be a non-empty list of {role} LoRAs")
        entries[role] = {}
        for i, item in enumerate(items):
            entry = _entry(item, role, base, f"{label}: {key}[{i}]")
            if entry.name in entries[role]:
                raise PairsError(f"{label}: two {role} LoRAs are named '{entry.name}'")
            entries[role][entry.name] = entry
    contents, styles = entries["content"], entries["style"]

    raw_pairs = data.get("pairs")
    if raw_pairs is None:  # every content with every style
        raw_pairs = [[c, s] for s in styles for c in contents]
    if not isinstance(raw_pairs, list) or not raw_pairs:
        raise PairsError(f"{label}: 'pairs' must be a non-empty list of [content, style] (or leave it out for all)")
    pairs, seen = [], set()
    for i, item in enumerate(raw_pairs):
        where = f"{label}: pairs[{i}]"
        prompt_template = template
        if isinstance(item, dict):
            extra = set(item) - {"content", "style", "prompt"}
            if extra:
                raise PairsError(f"{where}: unknown key(s) {', '.join(sorted(map(str, extra)))} (known: content, style, prompt)")
            c_name, s_name = item.get("content"), item.get("style")
            if "prompt" in item:
                prompt_template = item["prompt"]
                _check_template(prompt_template, f"{where}: prompt")
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            c_name, s_name = item
        else:
            raise PairsError(f"{where}: expected [content, style] or {{\"content\": ..., \"style\": ...}}")
        if c_name not in contents:
            raise PairsError(f"{where}: no content LoRA named {c_name!r} (have: {', '.join(contents)})")
        if s_name not in styles:
            raise PairsError(f"{where}: no style LoRA named {s_name!r} (have: {', '.join(styles)})")
        if (c_name, s_name) in seen:
            raise PairsError(f"{where}: the pair {c_name} / {s_name} is listed twice")
        seen.add((c_name, s_name))
        content, style = contents[c_name], styles[s_name]
        pairs.append(Pair(content=content, style=style,
                          prompt=prompt_template.format(content=content.trigger, style=style.trigger),
                          text_prompt=prompt_template.format(content=content.description, style=style.description)))
    return Spec(contents=contents, styles=styles, pairs=pairs, source=label)


def _check_template(template, where: str) -> None:
    if not isinstance(template, str) or not template.strip():
        raise PairsError(f"{where}: must be a non-empty string")
    try:
        template.format(content="c", style="s")
    except (KeyError, IndexError, ValueError) as exc:
        raise PairsError(f"{where} {template!r}: only {{content}} and {{style}} may appear in braces ({exc})") from None


def _entry(item, role: str, base: Path, where: str) -> Entry:
    if not isinstance(item, dict):
        raise PairsError(f"{where}: expected an object with at least 'name' and 'lora'")
    unknown = set(item) - {"name", "lora", "weight_name", "trigger", "description", "images"}
    if unknown:
        raise PairsError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                         "(known: name, lora, weight_name, trigger, description, images)")
    name = item.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or "__" in name:
        raise PairsError(f"{where}: 'name' {name!r} must be letters, digits, '.', '-' or '_' (no '__'); "
                         "it names folders")
    where = f"{role} '{name}'"
    lora = item.get("lora")
    if not isinstance(lora, str) or not lora.strip():
        raise PairsError(f"{where}: 'lora' (a .safetensors file, a folder or a hub id) is required")
    weight_name = item.get("weight_name")
    if weight_name is not None and not isinstance(weight_name, str):
        raise PairsError(f"{where}: 'weight_name' must be a file name")
    trigger = item.get("trigger", name)
    description = item.get("description", trigger)
    for key, value in (("trigger", trigger), ("description", description)):
        if not isinstance(value, str) or not value.strip():
            raise PairsError(f"{where}: '{key}' must be a non-empty string")
    return Entry(role=role, name=name, lora=_lora_source(lora, base, where), weight_name=weight_name,
                 trigger=trigger, description=description, images=_reference_images(item.get("images"), base, where))


def _lora_source(text: str, base: Path, where: str) -> str:
    local = (base / Path(text).expanduser())
    if local.exists():
        return str(local.resolve())
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and " " not in text \
            and not text.endswith(".safetensors"):
        return text  # a hub repo id
    raise PairsError(f"{where}: LoRA '{text}' not found (looked for '{local}'; not a hub repo id either)")


def _reference_images(value, base: Path, where: str) -> tuple[str, ...]:
    """A list of image files, or one folder whose images are taken in name order."""
    if value is None:
        return ()
    if isinstance(value, str):
        folder = base / Path(value).expanduser()
        if folder.is_dir():
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise PairsError(f"{where}: reference folder '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
            value = [str(p) for p in files]
        else:
            value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PairsError(f"{where}: 'images' must be a list of image files or one folder")
    found = []
    for text in value:
        path = (base / Path(text).expanduser()).resolve()
        if not path.is_file():
            raise PairsError(f"{where}: reference image '{text}' not found (looked for '{path}')")
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception:
            raise PairsError(f"{where}: reference image '{path}' is not an image PIL can read") from None
        found.append(str(path))
    return tuple(found)


# --- the run record ------------------------------------------------------------

def spec_to_dict(spec: Spec) -> dict:
    def entry(e: Entry) -> dict:
        d = asdict(e)
        d.pop("role")
        d["images"] = list(e.images)
        return d

    return {"contents": {n: entry(e) for n, e in spec.contents.items()},
            "styles": {n: entry(e) for n, e in spec.styles.items()},
            "pairs": {p.id: {"content": p.content.name, "style": p.style.name, "prompt": p.prompt,
                             "text_prompt": p.text_prompt} for p in spec.pairs}}


def spec_from_record(record: dict, label: str) -> Spec:
    """The Spec a ``run.json`` describes (paths in it are absolute already)."""
    try:
        entries = {}
        for role, key in (("content", "contents"), ("style", "styles")):
            entries[role] = {n: Entry(role=role, name=n, lora=e["lora"], weight_name=e.get("weight_name"),
                                      trigger=e["trigger"], description=e["description"], images=tuple(e["images"]))
                             for n, e in record[key].items()}
        pairs = [Pair(content=entries["content"][p["content"]], style=entries["style"][p["style"]],
                      prompt=p["prompt"], text_prompt=p["text_prompt"]) for p in record["pairs"].values()]
    except (KeyError, TypeError, AttributeError) as exc:
        raise KLoRAError(f"{label}: not a run record written by evaluate_grid.py (missing {exc})") from None
    return Spec(contents=entries["content"], styles=entries["style"], pairs=pairs, source=label)


def read_run_record(root: Path) -> dict | None:
    path = Path(root) / "run.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KLoRAError(f"'{path}': not valid JSON ({exc}); it records the run, delete it only with its images") from None
    if not isinstance(record, dict):
        raise KLoRAError(f"'{path}': not a run record written by evaluate_grid.py")
    return record


def merge_run_record(old: dict | None, settings: dict, spec: Spec, where: str) -> dict:
    """The record after this run; refuse a resume that would mix different generations.

    Images already in the folder must have been made with the same settings,
    LoRAs, triggers and prompts; new pairs, methods and seeds may be added.
    """
    new = {"settings": settings, **spec_to_dict(spec)}
    if not old:
        return new
    for key, value in settings.items():
        before = old.get("settings", {}).get(key)
        if before != value:
            raise KLoRAError(f"{where} was made with {key} = {before!r}, this run asks for {value!r}; "
                             "resuming would mix images: use another --output_folder")
    for key, fields in (("contents", ("lora", "weight_name", "trigger")), ("styles", ("lora", "weight_name", "trigger")),
                        ("pairs", ("prompt",))):
        for name, item in new[key].items():
            before = old.get(key, {}).get(name)
            for f in fields:
                if before is not None and before.get(f) != item[f]:
                    raise KLoRAError(f"{where}: {key[:-1]} '{name}' had {f} {before.get(f)!r}, now {item[f]!r}; "
                                     "resuming would mix images: rename it or use another --output_folder")
    merged = {"settings": settings}
    for key in ("contents", "styles", "pairs"):
        merged[key] = {**old.get(key, {}), **new[key]}
    return merged


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that a reader never sees half of it."""
    atomic.write_text(path, text)


# --- the images ----------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    pair: Pair
    method: str  # a METHODS tag
    seed: int
    path: Path


def image_path(root: str | os.PathLike, pid: str, method: str, seed: int) -> Path:
    return Path(root) / "images" / pid / method / f"seed{seed}.png"


def choices_path(root: str | os.PathLike, pid: str, method: str) -> Path:
    """K-LoRA's per-step choices of a pair and method (the share of layers on content per step)."""
    return Path(root) / "choices" / pid / f"{method}.json"


def plan(root, spec: Spec, methods: list[str], seeds: list[int]) -> list[Job]:
    """Every image of the run, pair by pair (one LoRA attach per pair), then method, then seed."""
    return [Job(pair, method, seed, image_path(root, pair.id, method, seed))
            for pair in spec.pairs for method in methods for seed in seeds]


def is_finished(path: str | os.PathLike) -> bool:
    """A complete, readable PNG: what a resumed run does not generate again."""
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                return False
            im.load()  # decodes every byte: a truncated file fails here
        return True
    except Exception:
        return False


@dataclass(frozen=True)
class ResultImage:
    pair: str
    method: str
    name: str  # file name without suffix, e.g. "seed3"
    path: Path


def scan(root: str | os.PathLike) -> list[ResultImage]:
    """Every image under ``root/images/<pair>/<method>/``, in a fixed order."""
    found = []
    images = Path(root) / "images"
    if not images.is_dir():
        return found
    for pair_dir in sorted(p for p in images.iterdir() if p.is_dir()):
        for method_dir in sorted(p for p in pair_dir.iterdir() if p.is_dir()):
            for file in sorted(method_dir.iterdir(), key=_natural):
                if file.is_file() and not file.name.startswith(".") and file.suffix.lower() in IMAGE_SUFFIXES:
                    found.append(ResultImage(pair_dir.name, method_dir.name, file.stem, file))
    return found


def _natural(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def split_methods(steps: int) -> list[str]:
    """The sweep's tags: ``c2s-K`` is the content LoRA for steps 0..K-1 and the style LoRA after,
    ``s2c-K`` the reverse, for every K from 1 to steps - 1 (0 and steps are style or content only)."""
    return [f"{order}-{k:02d}" for order in ("c2s", "s2c") for k in range(1, steps)]


def parse_split(method: str) -> tuple[str, int, str] | None:
    """``c2s-05`` -> ("content", 5, "style"); None for any other tag."""
    match = _SPLIT.match(method)
    if not match:
        return None
    first, second = ("content", "style") if match.group(1) == "c2s" else ("style", "content")
    return first, int(match.group(2)), second


def method_order(methods) -> list[str]:
    """Baselines first, K-LoRA last, like the paper's tables; the other fusion rules and unknown methods
    in between, step splits after them by order and step."""
    known = ["merge", "content", "style", "np", "np-hard", "switch", "est-s", "est-sstar"]
    kl = ["klora-s", "klora-sstar"]
    methods = list(dict.fromkeys(methods))
    splits = sorted((m for m in methods if parse_split(m)), key=lambda m: (m[:3], parse_split(m)[1]))
    others = sorted(m for m in methods if m not in known + kl and not parse_split(m))
    return [m for m in known if m in methods] + others + splits + [m for m in kl if m in methods]


def method_label(method: str) -> str:
    split = parse_split(method)
    if split:
        return f"{split[0]} then {split[2]} from step {split[1]}"
    return METHOD_LABELS.get(method, method)


# --- grid pictures -------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Sizes of a grid picture, in pixels."""

    cell: int = 256
    gap: int = 4
    margin: int = 10
    title_height: int = 32
    label_height: int = 24  # column labels, above the columns
    label_width: int = 140  # row labels, left of the rows
    font_size: int = 14

    def size(self, rows: int, cols: int) -> tuple[int, int]:
        width = 2 * self.margin + self.label_width + cols * self.cell + (cols - 1) * self.gap
        height = 2 * self.margin + self.title_height + self.label_height + rows * self.cell + (rows - 1) * self.gap
        return width, height

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), right and bottom exclusive."""
        left = self.margin + self.label_width + col * (self.cell + self.gap)
        top = self.margin + self.title_height + self.label_height + row * (self.cell + self.gap)
        return left, top, left + self.cell, top + self.cell


BACKGROUND = (255, 255, 255)
EMPTY = (225, 225, 225)  # a cell whose image is missing (not generated yet)
TEXT = (20, 20, 20)
BLANK = "blank"  # a cell with nothing in it by design: left as background


@dataclass
class Table:
    """What a grid picture shows: cells[row][col] is an image path, an image or None."""

    title: str
    row_labels: list[str]
    col_labels: list[str]
    cells: list[list] = field(default_factory=list)


def compose(table: Table, layout: Layout = Layout()) -> Image.Image:
    """Draw a table of images with a title, column labels on top and row labels on the left."""
    rows, cols = len(table.row_labels), len(table.col_labels)
    picture = Image.new("RGB", layout.size(rows, cols), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    font = _font(layout.font_size)
    title_font = _font(layout.font_size + 4)
    draw.text((layout.margin, layout.margin + layout.title_height // 2), _fit(draw, table.title, title_font,
              picture.width - 2 * layout.margin), fill=TEXT, font=title_font, anchor="lm")
    for c, label in enumerate(table.col_labels):
        left, top, right, _ = layout.cell_box(0, c)
        draw.text(((left + right) // 2, top - layout.label_height // 2), _fit(draw, label, font, layout.cell),
                  fill=TEXT, font=font, anchor="mm")
    for r, label in enumerate(table.row_labels):
        left, top, _, bottom = layout.cell_box(r, 0)
        draw.text((layout.margin, (top + bottom) // 2), _fit(draw, label, font, layout.label_width - 6),
                  fill=TEXT, font=font, anchor="lm")
    for r in range(rows):
        for c in range(cols):
            box = layout.cell_box(r, c)
            item = table.cells[r][c] if r < len(table.cells) and c < len(table.cells[r]) else None
            if isinstance(item, str) and item == BLANK:
                continue
            thumb = _thumbnail(item, layout.cell)
            if thumb is None:
                draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=EMPTY)
            else:
                picture.paste(thumb, box[:2])
    return picture


def _thumbnail(item, size: int) -> Image.Image | None:
    """The image, centre-cropped to a square and resized to the cell."""
    if item is None:
        return None
    if isinstance(item, Image.Image):
        image = item
    else:
        try:
            with Image.open(item) as im:
                image = im.convert("RGB")
        except Exception:
            return None
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: a fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """Shorten ``text`` with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def method_table(root, spec: Spec, method: str, seed: int) -> Table:
    """Rows = styles, columns = subjects; first row and column show the reference images."""
    contents = list(dict.fromkeys(p.content.name for p in spec.pairs))
    styles = list(dict.fromkeys(p.style.name for p in spec.pairs))
    wanted = {(p.content.name, p.style.name) for p in spec.pairs}
    cells = [[BLANK] + [_first(spec.contents[c].images) for c in contents]]
    for s in styles:
        row = [_first(spec.styles[s].images)]
        for c in contents:
            path = image_path(root, pair_id(c, s), method, seed)
            row.append(path if (c, s) in wanted and path.is_file() else None)
        cells.append(row)
    return Table(title=f"{method_label(method)}   seed {seed}   (rows: styles, columns: subjects)",
                 row_labels=["subject image"] + styles, col_labels=["style image"] + contents, cells=cells)


def pair_table(root, pair: Pair, methods: list[str], seeds: list[int]) -> Table:
    """Rows = seeds; columns = the two references, then one per method."""
    cells = []
    for i, seed in enumerate(seeds):
        refs = [_first(pair.content.images), _first(pair.style.images)] if i == 0 else [BLANK, BLANK]
        outs = [image_path(root, pair.id, m, seed) for m in methods]
        cells.append(refs + [p if p.is_file() else None for p in outs])
    return Table(title=f"{pair.content.name} in {pair.style.name} style:  \"{pair.prompt}\"",
                 row_labels=[f"seed {s}" for s in seeds],
                 col_labels=[f"subject: {pair.content.name}", f"style: {pair.style.name}"]
                 + [method_label(m) for m in methods], cells=cells)


def _first(images: tuple[str, ...]):
    return images[0] if images else BLANK


def write_grids(root, spec: Spec, methods: list[str], seeds: list[int], layout: Layout = Layout()) -> list[Path]:
    """Every grid picture of the run (from the images that exist); returns the paths written."""
    from .cli import save_png

    folder = Path(root) / "grids"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for method in methods:
        for seed in seeds:
            path = folder / f"method_{method}_seed{seed}.png"
            save_png(compose(method_table(root, spec, method, seed), layout), path)
            written.append(path)
    for pair in spec.pairs:
        path = folder / f"pair_{pair.id}.png"
        save_png(compose(pair_table(root, pair, methods, seeds), layout), path)
        written.append(path)
    return written


def report_in_turn(state, line: str) -> None:
    """Each process prints its line in rank order: lines from processes sharing one
    stdout would otherwise interleave mid-line."""
    for rank in range(state.num_processes):
        if rank == state.process_index:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        state.wait_for_everyone()
