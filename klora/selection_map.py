"""Picture of a selection log: one row per shared layer, one column per step."""

from __future__ import annotations

from PIL import Image, ImageDraw

CONTENT = (230, 120, 40)  # orange
STYLE = (40, 110, 200)  # blue
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def render(log: dict, generation: int = -1, max_side: int = 720) -> Image.Image:
    """Draw generation ``generation`` of a ``KLoRA.selection_log()`` dict."""
    generations = log.get("generations") or []
    layers = list(log.get("layers", {}))
    header = [f"K-LoRA selection  pattern {log.get('pattern')}  alpha {log.get('alpha'):.3g}  "
              f"beta {log.get('beta'):.3g}  gamma {log.get('gamma'):.3g}",
              f"rows: {len(layers)} layers both LoRAs adapt   columns: denoising steps (left = noisiest)",
              "orange = content LoRA, blue = style LoRA"]
    steps = generations[generation]["steps"] if generations else []
    cell_w = max(2, min(24, max_side // max(1, len(steps))))
    cell_h = max(1, min(12, max_side // max(1, len(layers))))
    grid_w, grid_h = cell_w * len(steps), cell_h * len(layers)
    width = max(grid_w + 20, 460)
    top = 14 * len(header) + 10
    image = Image.new("RGB", (width, top + max(grid_h, 14) + 10), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(header):
        draw.text((10, 4 + 14 * i), line, fill=TEXT)
    if not steps or not layers:
        draw.text((10, top), "no K-LoRA steps recorded (other method, or no shared layers)", fill=TEXT)
        return image
    for col, step in enumerate(steps):
        choices = step["choices"]
        for row, layer in enumerate(layers):
            color = CONTENT if choices.get(layer) == "content" else STYLE
            x, y = 10 + col * cell_w, top + row * cell_h
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=color)
    return image
