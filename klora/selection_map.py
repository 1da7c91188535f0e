"""Picture of a selection log: which LoRA each shared layer uses at each denoising step.

One row per layer both LoRAs adapt, grouped by block (``down_blocks.1``, ``mid_block``,
``transformer_blocks.4-7``, ...); one column per step, left = noisiest. Orange = content
LoRA, blue = style LoRA, grey = no choice recorded for that layer in that step: a pipeline
with two denoisers (Wan 2.2 A14B) runs one expert per step, and each expert gets its own
panel, grey where the other one ran. Layers only one LoRA adapts never switch: they are
counted in the header, not drawn.

``layout`` places everything (tests read the cell geometry from it); ``render`` paints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont, features

from .methods import PER_STEP

CONTENT = (230, 120, 40)  # orange
STYLE = (40, 110, 200)  # blue
NOT_RUN = (205, 205, 205)  # grey
BACKGROUND = (255, 255, 255)
TEXT = (25, 25, 25)
SEPARATOR = (150, 150, 150)
COLORS = {"content": CONTENT, "style": STYLE}

LONGEST_SIDE = 2000  # max_side is capped here; only more than ~1800 layers would go past it
MARGIN = 12
TEXT_SIZE, TITLE_SIZE = 13, 17
MAX_CELL_W, MAX_CELL_H = 36, 14
MIN_WIDTH = 560  # room for the header when the grid is narrow
LABEL_GAP = 8  # between a group label and the grid
LABEL_CHARS = 40
SEPARATOR_GAP = 3  # pixels between groups of rows; a line runs through the middle one
PANEL_GAP = 10


def font(size: int = TEXT_SIZE) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in scalable TrueType font (Aileron) when FreeType is there, else its bitmap font."""
    if features.check("freetype2"):
        return ImageFont.load_default(size=size)
    return ImageFont.load_default_imagefont()  # one size, Latin-1 only


def block_of(path: str) -> str:
    """The block a layer belongs to: its first path part, with that part's index when it has one.

    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``down_blocks.1``,
    ``mid_block.attentions.0...`` -> ``mid_block``, ``single_transformer_blocks.12.proj_out``
    -> ``single_transformer_blocks.12``, ``x_embedder`` -> ``x_embedder``.
    """
    parts = path.split(".")
    if len(parts) > 1 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


@dataclass
class Group:
    """Consecutive rows under one label: one block, or a run of blocks merged to make room for it."""
    label: str
    label_xy: tuple[int, int]  # where its (right-aligned) label is drawn
    top: int
    bottom: int  # exclusive
    keys: list[str]


@dataclass
class Panel:
    """One denoiser's rows. ``component`` is None for a single-denoiser log."""
    component: str | None
    title: str
    top: int
    bottom: int  # exclusive
    groups: list[Group]
    separators: list[int]  # y of the thin lines between groups


@dataclass
class Layout:
    """Where everything goes. Pixel ranges are half-open: ``[y0, y1)``, ``[x0, x1)``."""
    width: int
    height: int
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # log layer key -> its cells' y-range
    columns: list[tuple[int, int, int]] = field(default_factory=list)  # (step number, x0, x1), left to right
    choices: list[dict[str, str]] = field(default_factory=list)  # per column: layer key -> "content" | "style"
    panels: list[Panel] = field(default_factory=list)
    texts: list[tuple[int, int, str, bool]] = field(default_factory=list)  # x, y, text, in the title font?
    swatches: list[tuple[int, int, int, tuple]] = field(default_factory=list)  # x, y, size, colour
    tick_labels: list[tuple[int, int, str]] = field(default_factory=list)  # x, y, step number
    ticks: list[tuple[int, int]] = field(default_factory=list)  # x, y of each tick mark
    message: str | None = None  # set when there is no grid to draw


def layout(log: dict, generation: int = -1, max_side: int = 720) -> Layout:
    """Positions of every cell, label and legend item for generation ``generation`` of ``log``.

    Cells shrink so the picture fits in ``max_side`` pixels, but never below one pixel.
    """
    text_font, title_font = font(TEXT_SIZE), font(TITLE_SIZE)
    line = _line_height(text_font)
    side = max(200, min(int(max_side), LONGEST_SIDE))
    generations = log.get("generations") or []
    if generations and not -len(generations) <= generation < len(generations):
        raise IndexError(f"generation {generation} is not in this log ({len(generations)} recorded)")
    steps = (generations[generation].get("steps") or []) if generations else []
    numbers, choices = _columns(steps)
    keys = list(log.get("layers") or {})
    denoisers = list(log.get("denoisers") or [])
    panels = _split_by_denoiser(keys, denoisers) if len(denoisers) > 1 else [(None, keys)]
    message = _nothing_to_draw(log, numbers, keys)

    # Width first: group labels on the left, then as many pixels per step as fit.
    labels_w = 0 if message else _labels_width(panels, line, text_font)
    grid_left = MARGIN + labels_w + LABEL_GAP
    cell_w = max(1, min(MAX_CELL_W, (side - grid_left - MARGIN) // max(1, len(numbers))))
    grid_w = 0 if message else cell_w * len(numbers)
    width = max(grid_left + grid_w + MARGIN, min(side, MIN_WIDTH))
    out = Layout(width=width, height=0, choices=choices, message=message)

    y = _header(out, log, generation, steps, numbers, keys, text_font, title_font)
    if message:
        for text in _wrap(message, text_font, width - 2 * MARGIN):
            out.texts.append((MARGIN, y, text, False))
            y += line
        out.height = y + MARGIN
        return out

    # Then height: the tallest cells that keep the picture within `side`.
    titled = len(panels) > 1
    fixed = (y + (line + 2) * len(panels) * titled + PANEL_GAP * (len(panels) - 1)
             + 5 + 2 * line + 4 + MARGIN)  # panel titles, gaps, step axis
    cell_h = max(1, min(MAX_CELL_H, (side - fixed) // max(1, len(keys))))
    while True:
        grouped = [_groups(k, cell_h, line, c) for c, k in panels]
        grid_h = sum(len(g) * cell_h + SEPARATOR_GAP for gs in grouped for g, _ in gs) - SEPARATOR_GAP * len(panels)
        if fixed + grid_h <= side or cell_h == 1:
            break
        cell_h -= 1

    out.columns = [(n, grid_left + i * cell_w, grid_left + (i + 1) * cell_w) for i, n in enumerate(numbers)]
    for p, ((component, _), groups) in enumerate(zip(panels, grouped)):
        y += PANEL_GAP if p else 0
        title = ""
        if titled:
            title = _panel_title(log, component, groups, steps)
            out.texts.append((MARGIN, y, title, False))
            y += line + 2
        panel = Panel(component=component, title=title, top=y, bottom=y, groups=[], separators=[])
        for g, (group_keys, label) in enumerate(groups):
            if g:
                panel.separators.append(y + SEPARATOR_GAP // 2)
                y += SEPARATOR_GAP
            top = y
            for key in group_keys:
                out.rows[key] = (y, y + cell_h)
                y += cell_h
            label_y = (top + y) // 2 - line // 2
            label_x = grid_left - LABEL_GAP - int(text_font.getlength(_drawable(label, text_font)))
            panel.groups.append(Group(label=label, label_xy=(label_x, label_y), top=top, bottom=y, keys=group_keys))
        panel.bottom = y
        out.panels.append(panel)
    out.height = _step_axis(out, numbers, cell_w, y + 2, text_font) + MARGIN
    return out


def render(log: dict, generation: int = -1, max_side: int = 720) -> Image.Image:
    """Draw generation ``generation`` of a ``KLoRA.selection_log()`` dict."""
    at = layout(log, generation, max_side)
    text_font, title_font = font(TEXT_SIZE), font(TITLE_SIZE)
    image = Image.new("RGB", (at.width, at.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for x, y, size, colour in at.swatches:
        draw.rectangle([x, y, x + size - 1, y + size - 1], fill=colour, outline=tuple(c * 7 // 10 for c in colour))
    for x, y, text, is_title in at.texts:
        used = title_font if is_title else text_font
        draw.text((x, y), _drawable(text, used), fill=TEXT, font=used)
    if at.message:
        return image

    left, right = at.columns[0][1], at.columns[-1][2]
    for panel in at.panels:
        for group in panel.groups:
            # One pixel per cell, scaled up by whole factors: exact cells, and fast for 1000 x 150.
            cell_h = (group.bottom - group.top) // len(group.keys)
            cells = Image.new("RGB", (len(at.columns), len(group.keys)))
            cells.putdata([COLORS.get(column.get(key), NOT_RUN) for key in group.keys for column in at.choices])
            cells = cells.resize((right - left, len(group.keys) * cell_h), Image.Resampling.NEAREST)
            image.paste(cells, (left, group.top))
            draw.text(group.label_xy, _drawable(group.label, text_font), fill=TEXT, font=text_font)
        for y in panel.separators:
            draw.line([(MARGIN, y), (right - 1, y)], fill=SEPARATOR)
    for x, y in at.ticks:
        draw.line([(x, y), (x, y + 3)], fill=SEPARATOR)
    for x, y, text in at.tick_labels:
        draw.text((x, y), text, fill=TEXT, font=text_font)
    return image


# --- what to draw --------------------------------------------------------------------------

def _columns(steps: list[dict]) -> tuple[list[int], list[dict[str, str]]]:
    """Step numbers in order, and each step's choices (entries of one step number merged)."""
    numbers = sorted({s["step"] for s in steps})
    choices = {n: {} for n in numbers}
    for s in steps:
        choices[s["step"]].update(s.get("choices") or {})
    return numbers, [choices[n] for n in numbers]


def _nothing_to_draw(log: dict, numbers: list[int], keys: list[str]) -> str | None:
    if not numbers:
        method = log.get("method")
        if method not in (None, *PER_STEP):
            return (f"No steps recorded: only the per-step methods ({', '.join(PER_STEP)}) record them "
                    f"(this log's method is '{method}').")
        return "No steps recorded yet: generate an image with a per-step method (klora, est or switch) first."
    if not keys:
        return "The two LoRAs adapt no layer in common: K-LoRA has nothing to choose."
    return None


def _split_by_denoiser(keys: list[str], denoisers: list[str]) -> list[tuple[str, list[str]]]:
    """Keys are ``"<denoiser>.<module path>"``; the longest matching denoiser name wins."""
    by_name = {name: [] for name in denoisers}
    others = []
    for key in keys:
        owners = [name for name in denoisers if key.startswith(name + ".")]
        (by_name[max(owners, key=len)] if owners else others).append(key)
    return [(name, k) for name, k in by_name.items() if k] + ([("other", others)] if others else [])


# --- groups of rows ------------------------------------------------------------------------

def _family(block: str) -> str:
    """``transformer_blocks.7`` -> ``transformer_blocks``; a block without index is its own family."""
    head, _, index = block.rpartition(".")
    return head if head and index.isdigit() else block


_UNET_FLOW = ("down_blocks", "mid_block", "up_blocks")  # the order data flows through a UNet


def _blocks(keys: list[str], component: str | None) -> list[tuple[str, list[str]]]:
    """Keys gathered by block, top to bottom.

    A UNet's families go down, mid, up; other families keep the order they first appear in; blocks
    of one family go by index (a log sorted as text would put ``blocks.10`` before ``blocks.2``);
    layers of one block keep their log order.
    """
    paths = [key[len(component) + 1:] if component and key.startswith(component + ".") else key for key in keys]
    names = [block_of(p) for p in paths]
    if len(set(names)) == 1 and len(keys) > 1:  # all inside one wrapper module: cut at the first index instead
        names = [_up_to_first_index(p) for p in paths]
    family_rank = {family: i for i, family in enumerate(_UNET_FLOW)}  # a UNet registers mid_block last
    for name in names:
        family_rank.setdefault(_family(name), len(family_rank))

    def place(i):
        family, index = _family(names[i]), names[i].rpartition(".")[2]
        return family_rank[family], int(index) if family != names[i] else -1, i

    blocks = []
    for name, key in ((names[i], keys[i]) for i in sorted(range(len(keys)), key=place)):
        if blocks and blocks[-1][0] == name:
            blocks[-1][1].append(key)
        else:
            blocks.append((name, [key]))
    return blocks


def _up_to_first_index(path: str) -> str:
    parts = path.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[:digits[0] + 1]) if digits else parts[0]


def _groups(keys: list[str], cell_h: int, line: int, component: str | None) -> list[tuple[list[str], str]]:
    """Blocks merged, in order, into groups tall enough for one label each: labels never overlap.

    Blocks of one family merge into ranges (``transformer_blocks.4-7``); a family too short
    for any label (a lone ``x_embedder`` row) rides with the next group and joins its label.
    """
    def height(chunk):
        return sum(len(k) for _, k in chunk) * cell_h

    chunks: list[list[tuple[str, list[str]]]] = []
    for block in _blocks(keys, component):
        if chunks and _family(chunks[-1][-1][0]) == _family(block[0]) and height(chunks[-1]) < line:
            chunks[-1].append(block)
        else:
            chunks.append([block])
    tidy = []  # a family's short last chunk joins the chunk before it
    for chunk in chunks:
        if tidy and height(chunk) < line and _family(tidy[-1][0][0]) == _family(chunk[0][0]):
            tidy[-1].extend(chunk)
        else:
            tidy.append(chunk)
    groups, waiting = [], []
    for chunk in tidy:
        waiting.append(chunk)
        if sum(height(c) for c in waiting) >= line:
            groups.append(waiting)
            waiting = []
    if waiting and groups:
        groups[-1].extend(waiting)
    elif waiting:
        groups.append(waiting)
    return [([key for chunk in group for _, k in chunk for key in k], _group_label(group, height))
            for group in groups]


def _group_label(group, height) -> str:
    parts = [_chunk_label([name for name, _ in chunk]) for chunk in group]
    joined = ", ".join(parts)
    if len(parts) == 1 or len(joined) <= LABEL_CHARS:
        return _ellipsize(joined, LABEL_CHARS)
    main = max(range(len(group)), key=lambda i: height(group[i]))
    return _ellipsize(("…, " if main > 0 else "") + parts[main] + (", …" if main < len(parts) - 1 else ""),
                      LABEL_CHARS)


def _chunk_label(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    return f"{_family(names[0])}.{names[0].rsplit('.', 1)[1]}-{names[-1].rsplit('.', 1)[1]}"


def _labels_width(panels, line: int, used_font) -> int:
    """Widest group label at any cell height (the width is fixed before the height is chosen)."""
    labels = {label for component, keys in panels for cell_h in range(1, MAX_CELL_H + 1)
              for _, label in _groups(keys, cell_h, line, component)}
    return int(max(used_font.getlength(_drawable(label, used_font)) for label in labels)) + 1


# --- text ----------------------------------------------------------------------------------

def _header(out: Layout, log, generation, steps, numbers, keys, text_font, title_font) -> int:
    """Title, settings, counts and legend; returns the y below them."""
    generations = log.get("generations") or []
    title = {"est": "EST-LoRA selection map", "switch": "LoRA Switch selection map"}.get(log.get("method"),
                                                                                      "K-LoRA selection map")
    if len(generations) > 1:
        title += f"  ·  generation {generation % len(generations) + 1} of {len(generations)}"
    gamma = log.get("gamma")
    gamma_text = ("gamma " + ", ".join(f"{name} {_number(g)}" for name, g in gamma.items())
                  if isinstance(gamma, dict) else f"gamma {_number(gamma)}")
    if log.get("method") == "switch":
        settings = [f"method switch, every {log.get('switch_every')} steps, content first"]
    else:
        beta = f"beta {_number(log.get('beta'))}" + (" (auto, DINO)" if log.get("beta_auto") else "")
        settings = [f"pattern {log.get('pattern')}", f"alpha {_number(log.get('alpha'))}", beta, gamma_text,
                    f"method {log.get('method')}"]
    if log.get("progress"):
        settings.append(f"progress by {log['progress']}")
    if log.get("switching"):
        settings.append(f"switching {log['switching']}")
    counts = [f"{_count(len(keys), 'layer')} both LoRAs adapt (one row each)"]
    if log.get("only"):
        counts.append(f"{len(log['only'])} adapted by one LoRA only, not drawn ("
                      + ("on in their LoRA's blocks only)" if log.get("method") == "switch" else "they never switch)"))
    if numbers:
        total = generations[generation].get("num_inference_steps")
        counts.append(_count(len(numbers), "step") if total in (None, len(numbers))
                      else f"{len(numbers)} of {_count(total, 'step')} recorded")
    legend = [(CONTENT, f"content LoRA: {_short_label(log.get('content'), 'content LoRA')}"),
              (STYLE, f"style LoRA: {_short_label(log.get('style'), 'style LoRA')}")]
    if any(key not in column for column in out.choices for key in keys):
        legend.append((NOT_RUN, "not run in this step" if len(log.get("denoisers") or []) > 1
                       else "no choice recorded"))

    right = out.width - MARGIN
    y = _flow(out, [(None, title)], MARGIN, right, title_font, title=True) + 4
    y = _flow(out, [(None, t) for t in settings], y, right, text_font)
    y = _flow(out, [(None, t) for t in counts], y, right, text_font)
    return _flow(out, legend, y + 4, right, text_font) + 8


def _panel_title(log, component, groups, steps) -> str:
    ran = sorted({s["step"] for s in steps if s.get("component") == component})
    parts = [component, _count(sum(len(k) for k, _ in groups), "layer")]
    gamma = log.get("gamma")
    if isinstance(gamma, dict) and component in gamma:
        parts.append(f"gamma {_number(gamma[component])}")
    parts.append(f"ran steps {_ranges(ran)}" if ran else "ran no step")
    return "  ·  ".join(parts)


def _step_axis(out: Layout, numbers, cell_w: int, y: int, used_font) -> int:
    """Tick and number under every k-th column, k = 1, 2, 5, 10, ... so numbers never touch."""
    line = _line_height(used_font)
    room = max(used_font.getlength(str(n)) for n in numbers) + 8
    every = next(k * 10 ** e for e in range(9) for k in (1, 2, 5) if k * 10 ** e * cell_w >= room)
    last_end = float("-inf")
    for n, x0, x1 in out.columns:
        if n % every and n != numbers[-1]:
            continue
        centre, w = (x0 + x1) // 2, used_font.getlength(str(n))
        left = min(max(centre - w / 2, MARGIN), out.width - MARGIN - w)
        if left < last_end + 6:
            continue
        out.ticks.append((centre, y))
        out.tick_labels.append((int(left), y + 5, str(n)))
        last_end = left + w
    y += 5 + line
    caption = "denoising step  (left = noisiest, right = cleanest)"
    x = min(out.columns[0][1], out.width - MARGIN - used_font.getlength(caption))
    out.texts.append((int(max(MARGIN, x)), y, caption, False))
    return y + line


def _flow(out: Layout, items, y: int, right: int, used_font, title: bool = False) -> int:
    """Place (swatch colour or None, text) items left to right from MARGIN, wrapping; returns the y below."""
    line = _line_height(used_font)
    x = MARGIN
    for colour, text in items:
        w = used_font.getlength(_drawable(text, used_font)) + (line + 2 if colour else 0)
        if x > MARGIN and x + w > right:
            x, y = MARGIN, y + line
        if colour:
            out.swatches.append((x, y + 2, line - 5, colour))
            x += line + 2
            w -= line + 2
        out.texts.append((x, y, text, title))
        x += int(w) + 20
    return y + line


def _short_label(label, role: str) -> str:
    """``"content LoRA '/x/lora-dog/pytorch_lora_weights.safetensors'"`` -> ``lora-dog/pytorch_lora_weights``."""
    if not label:
        return "?"
    text = str(label)
    quoted = re.search(r"'(.*)'", text)
    if quoted:
        text = quoted.group(1)
    elif text.startswith(role):
        text = text[len(role):].strip() or text
    parts = [p for p in re.split(r"[/\\]", text) if p] or [text]
    name = re.sub(r"\.(safetensors|bin)$", "", parts[-1], flags=re.IGNORECASE)
    hub = re.search(r"models--([^/\\]+?)--([^/\\]+)", text)  # a file in the hub cache: name the repo
    if hub:
        name = f"{hub.group(1)}/{hub.group(2)}" + ("" if name == "pytorch_lora_weights" else f"/{name}")
    elif name in ("pytorch_lora_weights", "adapter_model", "lora", "model") and len(parts) > 1:
        name = f"{parts[-2]}/{name}"  # a generic file name says less than its folder
    return _ellipsize(name, LABEL_CHARS)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def _ranges(numbers: list[int], most: int = 3) -> str:
    """``[0, 1, 2, 5, 6]`` -> ``"0-2, 5-6"``."""
    runs = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:most])
    return text + (", …" if len(runs) > most else "")


def _ellipsize(text: str, most: int) -> str:
    if len(text) <= most:
        return text
    keep = most - 1
    return text[:keep // 2] + "…" + text[len(text) - (keep - keep // 2):]


def _drawable(text: str, used_font) -> str:
    """The built-in fonts hold ASCII and a few signs; anything else would draw as a box (or raise)."""
    if isinstance(used_font, ImageFont.FreeTypeFont):
        return "".join(c if " " <= c <= "~" or c in "·…" else "?" for c in text)
    text = text.replace("…", "...")
    return "".join(c if " " <= c <= "~" or c == "·" else "?" for c in text)


def _line_height(used_font) -> int:
    return used_font.getbbox("Ag|")[3] + 3


def _wrap(text: str, used_font, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and used_font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return lines + [current] if current else lines
