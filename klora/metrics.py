"""The paper's metrics (K-LoRA, CVPR 2025, Sec. 4 and Table 1), as cosine similarities in %.

For each generated image ``x`` of a pair (content LoRA, style LoRA):

    Style Sim   = mean over style images s   of cos(CLIP_img(x), CLIP_img(s))
    CLIP score  = mean over subject images c of cos(CLIP_img(x), CLIP_img(c))
    DINO score  = mean over subject images c of cos(DINO(x),     DINO(c))
    CLIP text   = cos(CLIP_img(x), CLIP_text(prompt))      (not in the paper)

times 100. CLIP_img is CLIP ViT-B/32's projected image embedding; DINO is the CLS
token of a DINO ViT's last layer. Scores are averaged over a pair's images, then
over pairs (every pair counts the same), per method.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from .errors import KLoRAError

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"
METRICS = ("style_sim", "clip_score", "dino_score", "clip_text")
METRIC_LABELS = {"style_sim": "Style Sim", "clip_score": "CLIP score", "dino_score": "DINO score",
                 "clip_text": "CLIP text-image"}
# Table 1 of the paper (SDXL, 18 pairs x 10 images): Style Sim, CLIP score, DINO score.
PAPER_TABLE_1 = {
    "Direct merge": (48.9, 66.6, 43.0),
    "Joint training": (68.2, 57.5, 17.4),
    "B-LoRA": (58.0, 63.8, 30.6),
    "ZipLoRA": (60.4, 64.4, 35.7),
    "K-LoRA": (58.7, 69.4, 46.9),
}


# --- the math -----------------------------------------------------------------

def cosine_percent(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """100 * cosine similarity of every row of ``a`` with every row of ``b`` (shape [len(a), len(b)])."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return 100.0 * a @ b.T


def mean_similarity(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """For each image: the mean of its cosine similarities (in %) with all references."""
    return cosine_percent(images, references).mean(dim=1)


# --- the embedding models ---------------------------------------------------------

class ClipEmbedder:
    """CLIP image and text embeddings (the projected ones both towers share)."""

    def __init__(self, name_or_path: str = DEFAULT_CLIP, device: str = "cpu", batch_size: int = 16):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.name, self.device, self.batch_size = name_or_path, device, batch_size
        self.model = _load(CLIPModel, name_or_path, "--clip_model").to(device).eval()
        self.processor = _load(AutoImageProcessor, name_or_path, "--clip_model")
        self.tokenizer = _load(AutoTokenizer, name_or_path, "--clip_model")

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for batch in _batches(images, self.batch_size):
            pixels = self.processor(images=[im.convert("RGB") for im in batch], return_tensors="pt")["pixel_values"]
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for batch in _batches(texts, self.batch_size):
            tokens = self.tokenizer(list(batch), padding=True, truncation=True, return_tensors="pt")
            pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(out)


class DinoEmbedder:
    """DINO ViT image embedding: the CLS token of the last layer (as DreamBooth's DINO metric)."""

    def __init__(self, name_or_path: str = DEFAULT_DINO, device: str = "cpu", batch_size: int = 16):
        from transformers import AutoImageProcessor, AutoModel

        self.name, self.device, self.batch_size = name_or_path, device, batch_size
        self.model = _load(AutoModel, name_or_path, "--dino_model").to(device).eval()
        self.processor = _load(AutoImageProcessor, name_or_path, "--dino_model")

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for batch in _batches(images, self.batch_size):
            pixels = self.processor(images=[im.convert("RGB") for im in batch], return_tensors="pt")["pixel_values"]
            hidden = self.model(pixel_values=pixels.to(self.device)).last_hidden_state
            out.append(hidden[:, 0].float().cpu())
        return torch.cat(out)


def _load(cls, name_or_path: str, flag: str):
    try:
        return cls.from_pretrained(name_or_path)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise KLoRAError(f"{flag} '{name_or_path}': could not load it with {cls.__name__} (offline, misspelt, "
                         f"or not this kind of model? {flag} also takes a local folder): {first}") from None


def _batches(items, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


# --- scoring --------------------------------------------------------------------

@dataclass(frozen=True)
class ImageToScore:
    pair: str  # "<content>__<style>"
    method: str
    name: str  # e.g. "seed3"
    path: str
    subject_images: tuple[str, ...]
    style_images: tuple[str, ...]
    prompt: str  # what the CLIP text score compares with


def score(items: list[ImageToScore], clip, dino, progress=None, batch_size: int = 16) -> tuple[list[dict], list[str]]:
    """One row per image with its four scores, and the paths that could not be read.

    ``clip`` gives ``images(list of PIL) -> [N, D]`` and ``texts(list of str) -> [N, D]``,
    ``dino`` gives ``images``; reference embeddings are computed once per model and set.
    """
    cache: dict[tuple, torch.Tensor] = {}

    def references(key: str, model, paths: tuple[str, ...]) -> torch.Tensor:
        if (key, paths) not in cache:
            cache[(key, paths)] = model.images([_open(p) for p in paths])
        return cache[(key, paths)]

    def text(prompt: str) -> torch.Tensor:
        if ("text", prompt) not in cache:
            cache[("text", prompt)] = clip.texts([prompt])
        return cache[("text", prompt)]

    rows, unreadable = [], []
    for batch in _batches(items, batch_size):
        readable, images = [], []
        for item in batch:
            try:
                images.append(_open(item.path))
                readable.append(item)
            except Exception:
                unreadable.append(item.path)
        if images:
            clip_x, dino_x = clip.images(images), dino.images(images)
            for i, item in enumerate(readable):
                c, d = clip_x[i:i + 1], dino_x[i:i + 1]
                rows.append({
                    "pair": item.pair, "method": item.method, "image": item.name, "path": item.path,
                    "style_sim": float(mean_similarity(c, references("clip", clip, item.style_images))[0]),
                    "clip_score": float(mean_similarity(c, references("clip", clip, item.subject_images))[0]),
                    "dino_score": float(mean_similarity(d, references("dino", dino, item.subject_images))[0]),
                    "clip_text": float(cosine_percent(c, text(item.prompt))[0, 0]),
                })
        if progress is not None:
            progress(len(batch))
    return rows, unreadable


def _open(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def summarize(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(per pair and method, per method): means over a pair's images, then over pairs."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["pair"]), []).append(row)
    per_pair = []
    for (method, pair), items in sorted(groups.items()):
        entry = {"method": method, "pair": pair, "images": len(items)}
        for m in METRICS:
            entry[m] = sum(r[m] for r in items) / len(items)
        per_pair.append(entry)
    per_method = []
    for method in dict.fromkeys(p["method"] for p in per_pair):
        items = [p for p in per_pair if p["method"] == method]
        entry = {"method": method, "pairs": len(items), "images": sum(p["images"] for p in items)}
        for m in METRICS:
            entry[m] = sum(p[m] for p in items) / len(items)
        per_method.append(entry)
    return per_pair, per_method


# --- reports ----------------------------------------------------------------------

def csv_text(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def markdown_report(per_pair: list[dict], per_method: list[dict], methods: list[str], labels: dict[str, str],
                    title: str, notes: list[str]) -> str:
    """Table 1 of the paper (metrics as rows, methods as columns), the paper's numbers, then every pair."""
    by_method = {m["method"]: m for m in per_method}
    lines = [f"# {title}", ""] + notes + [""]
    lines.append("| | " + " | ".join(labels.get(m, m) for m in methods) + " |")
    lines.append("|---|" + "---:|" * len(methods))
    for metric in METRICS:
        cells = [f"{by_method[m][metric]:.1f}" for m in methods]
        lines.append(f"| {METRIC_LABELS[metric]} ↑ | " + " | ".join(cells) + " |")
    lines.append("| images (pairs) | " + " | ".join(f"{by_method[m]['images']} ({by_method[m]['pairs']})"
                                                 for m in methods) + " |")
    lines += ["", "The paper's Table 1 (SDXL, 18 pairs x 10 images; CLIP text-image not reported):", ""]
    lines.append("| | " + " | ".join(PAPER_TABLE_1) + " |")
    lines.append("|---|" + "---:|" * len(PAPER_TABLE_1))
    for i, metric in enumerate(METRICS[:3]):
        lines.append(f"| {METRIC_LABELS[metric]} ↑ | " + " | ".join(f"{v[i]:.1f}" for v in PAPER_TABLE_1.values()) + " |")
    lines += ["", "## Per pair", "", "| pair | method | images | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " |",
              "|---|---|---:|" + "---:|" * len(METRICS)]
    order = {m: i for i, m in enumerate(methods)}
    for p in sorted(per_pair, key=lambda p: (p["pair"], order.get(p["method"], len(order)))):
        lines.append(f"| {p['pair']} | {labels.get(p['method'], p['method'])} | {p['images']} | "
                     + " | ".join(f"{p[m]:.1f}" for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


PALETTE = [(120, 120, 150), (70, 140, 200), (150, 100, 190), (80, 170, 110), (230, 160, 40),
           (215, 80, 60), (40, 60, 140), (190, 150, 110), (120, 190, 200), (200, 100, 160)]
# No grey in the palette: anti-aliased text is grey, and a bar should be found by its colour.
CHART_TEXT = (20, 20, 20)
CHART_GRID = (220, 220, 220)


@dataclass(frozen=True)
class ChartLayout:
    bar: int = 28  # bar width
    group_gap: int = 30
    plot_height: int = 300
    left: int = 50
    top: int = 40
    bottom: int = 40  # metric names under the groups
    legend_width: int = 190


def bar_chart(per_method: list[dict], methods: list[str], labels: dict[str, str], title: str = "",
              layout: ChartLayout = ChartLayout()) -> Image.Image:
    """Grouped bars: one group per metric, one bar per method (colours in PALETTE order), in %.

    The value axis runs from min(0, lowest value) to max(100, highest value); a
    bar of value v spans from the 0 line to v.
    """
    from .grid import _font

    by_method = {m["method"]: m for m in per_method}
    values = [by_method[m][k] for m in methods for k in METRICS]
    low = min(0.0, math.floor(min(values) / 10) * 10)
    high = max(100.0, math.ceil(max(values) / 10) * 10)
    group_width = layout.bar * len(methods)
    plot_width = len(METRICS) * group_width + (len(METRICS) + 1) * layout.group_gap
    width = layout.left + plot_width + layout.legend_width
    height = layout.top + layout.plot_height + layout.bottom
    chart = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(chart)
    font, small = _font(13), _font(10)

    def y_of(value: float) -> float:
        return layout.top + (high - value) / (high - low) * layout.plot_height

    for tick in range(int(low), int(high) + 1, 10 if high - low <= 120 else 20):
        y = round(y_of(tick))
        draw.line([layout.left, y, layout.left + plot_width, y], fill=CHART_GRID)
        draw.text((layout.left - 6, y), f"{tick}", fill=CHART_TEXT, font=small, anchor="rm")
    draw.text((layout.left, layout.top // 2), title or "cosine similarity (%)", fill=CHART_TEXT, font=font, anchor="lm")
    zero = round(y_of(0.0))
    for g, metric in enumerate(METRICS):
        x0 = layout.left + layout.group_gap + g * (group_width + layout.group_gap)
        for i, method in enumerate(methods):
            value = by_method[method][metric]
            x = x0 + i * layout.bar
            top, bottom = sorted((round(y_of(value)), zero))
            if bottom > top:
                draw.rectangle([x, top, x + layout.bar - 2, bottom - 1], fill=PALETTE[i % len(PALETTE)])
            draw.text((x + layout.bar // 2 - 1, top - 2 if value >= 0 else bottom + 2), f"{value:.1f}",
                      fill=CHART_TEXT, font=small, anchor="mb" if value >= 0 else "mt")
        draw.text((x0 + group_width // 2, layout.top + layout.plot_height + layout.bottom // 2),
                  METRIC_LABELS[metric], fill=CHART_TEXT, font=font, anchor="mm")
    draw.line([layout.left, zero, layout.left + plot_width, zero], fill=CHART_TEXT)
    legend_x = layout.left + plot_width + 15
    for i, method in enumerate(methods):
        y = layout.top + i * 20
        draw.rectangle([legend_x, y, legend_x + 12, y + 12], fill=PALETTE[i % len(PALETTE)])
        draw.text((legend_x + 18, y + 6), labels.get(method, method), fill=CHART_TEXT, font=font, anchor="lm")
    return chart


# --- tiny offline models (the --demo and the tests) ---------------------------------

def build_tiny_clip(folder, seed: int = 0) -> str:
    """A CLIP with the layout of ViT-B/32 at toy size (32 px images, patch 8), random weights."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from .tiny import clip_tokenizer

    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def build_tiny_dino(folder, seed: int = 0) -> str:
    """A ViT at toy size (32 px images, patch 8) standing in for DINO ViT-S/16, random weights."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       image_size=32, patch_size=8)
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return str(folder)


def quiet_loading() -> None:
    """transformers 5 draws a progress bar for every model it loads or saves."""
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
    except ImportError:
        pass
