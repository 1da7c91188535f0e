"""Scorers of the world's pictures, written from its definition (``klora/world.py``), numpy only.

- ``subject``: does a picture show the sbu toy? A yellow silhouette (with its red
  centre) that matches the star better than any base shape, and a red disc at the
  star's centre.
- ``style``: is it in szn style? A violet background, 45-degree stripes rising to the
  right at szn's period, and a dark outline around the object.
- ``read_base``: the shape, colour, background and texture a base picture shows.

Shapes are told apart by silhouette: the best overlap (IoU) of the picture's object
mask with each shape, drawn by the world's own ``shape_mask`` at the sizes and
positions the world uses. Colours by hue (they survive szn's darker stripes), the
stripes by their Fourier power. Each scorer returns its verdict with the numbers it
was decided on. Their accuracy on drawn pictures: tests/test_world.py.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from . import world

STAR = "star"
_SHIFT = 0.1  # how far from the centre a silhouette is looked for, in units of S
_SCALES = (0.85, 1.0, 1.15)


def hsv(image: np.ndarray):
    """Hue in degrees, saturation and value (0..1) of a uint8 (H, W, 3) picture."""
    rgb = image.astype(np.float64) / 255.0
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    spread = high - low
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(spread > 0, spread, 1.0)
    hue = np.select([high == r, high == g], [((g - b) / safe) % 6, (b - r) / safe + 2], (r - g) / safe + 4) * 60
    saturation = np.where(high > 0, spread / np.where(high > 0, high, 1.0), 0.0)
    return hue, saturation, high


def _hue_near(hue, centre: float, width: float):
    return np.abs((hue - centre + 180) % 360 - 180) <= width


def yellow_mask(image):
    hue, sat, val = hsv(image)
    return _hue_near(hue, 50, 13) & (sat >= 0.45) & (val >= 0.3)


def red_mask(image):
    hue, sat, val = hsv(image)
    return _hue_near(hue, 0, 18) & (sat >= 0.5) & (val >= 0.3)


def violet_mask(image):
    hue, sat, val = hsv(image)
    return _hue_near(hue, 276, 24) & (sat >= 0.4) & (val >= 0.2)


def dark_mask(image):
    return image.max(axis=-1) < 60


def _luminance(image):
    return image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _grow(mask, steps: int):
    """``mask`` grown by ``steps`` pixels (4-neighbours); nothing comes in from outside the picture."""
    grown = mask.copy()
    for _ in range(steps):
        step = grown.copy()
        step[1:] |= grown[:-1]
        step[:-1] |= grown[1:]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        grown = step
    return grown


def _shrink(mask):
    """``mask`` less its boundary pixels (4-neighbours)."""
    return ~_grow(~mask, 1)


# ------------------------------------------------------------ silhouettes


@lru_cache(maxsize=8)
def _templates(size: int):
    """Binary masks of every shape (and the star) at the world's sizes, over a grid of positions:
    (names, masks as a (count, size*size) float array, centres in units of S)."""
    x, y = np.meshgrid((np.arange(size * 4) + 0.5) / (size * 4), (np.arange(size * 4) + 0.5) / (size * 4))
    steps = max(1, round(_SHIFT * size))
    offsets = [k / size for k in range(-steps, steps + 1)]
    names, masks, centres = [], [], []
    for shape in (*world.SHAPES, STAR):
        scales = (1.0,) if shape == STAR else _SCALES
        for scale in scales:
            across = (2 * world.STAR_OUTER if shape == STAR else world.OBJECT_SIZE) * scale
            for dy in offsets:
                for dx in offsets:
                    fine = world.shape_mask(shape, x, y, 0.5 + dx, 0.5 + dy, across)
                    coverage = fine.reshape(size, 4, size, 4).mean(axis=(1, 3))
                    names.append(shape)
                    masks.append((coverage >= 0.5).ravel())
                    centres.append((0.5 + dx, 0.5 + dy))
    return names, np.array(masks, dtype=np.float32), np.array(centres)


def shape_scores(mask: np.ndarray) -> dict:
    """The best IoU of ``mask`` with each shape over the world's positions and sizes, where each
    best match sits and its silhouette: {shape: (iou, (cx, cy), silhouette)}."""
    names, masks, centres = _templates(mask.shape[0])
    flat = mask.astype(np.float32).ravel()
    inter = masks @ flat
    union = masks.sum(axis=1) + flat.sum() - inter
    iou = inter / np.maximum(union, 1.0)
    best = {}
    for i, name in enumerate(names):
        if name not in best or iou[i] > iou[best[name]]:
            best[name] = i
    size = mask.shape[0]
    return {name: (float(iou[i]), tuple(centres[i]), masks[i].reshape(size, size) > 0) for name, i in best.items()}


def classify_shape(mask: np.ndarray, shapes=world.SHAPES) -> tuple[str, float, np.ndarray]:
    """The best-fitting shape, its IoU and its silhouette where it fits best."""
    scores = shape_scores(mask)
    name = max(shapes, key=lambda s: scores[s][0])
    return name, scores[name][0], scores[name][2]


# ----------------------------------------------------------------- subject


def subject(image: np.ndarray) -> tuple[bool, dict]:
    """Is this the sbu toy: a yellow star, one point up, with a red disc at its centre?"""
    size = image.shape[0]
    yellow, red = yellow_mask(image), red_mask(image)
    scores = shape_scores(yellow | red)
    star_iou, (cx, cy), _ = scores[STAR]
    rival = max(world.SHAPES, key=lambda s: scores[s][0])
    coords = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid(coords, coords)
    # the red disc: red pixels near the star's centre, as a share of the disc's own area (a blurred
    # disc keeps its red core and turns orange at its rim)
    disc = (x - cx) ** 2 + (y - cy) ** 2 <= (world.STAR_DISC * 1.5) ** 2
    red_centre = float(red[disc].sum() / (math.pi * (world.STAR_DISC * size) ** 2))
    star = world.shape_mask(STAR, x, y, cx, cy, 2 * world.STAR_OUTER)
    yellow_fill = float(yellow[star & ~disc].mean()) if star.any() else 0.0
    verdict = (star_iou >= 0.55 and star_iou > scores[rival][0] and red_centre >= 0.25 and yellow_fill >= 0.5)
    return bool(verdict), {"star_iou": round(star_iou, 3), "best_other": rival,
                           "other_iou": round(scores[rival][0], 3), "red_centre": round(red_centre, 3),
                           "yellow_fill": round(yellow_fill, 3)}


# ------------------------------------------------------------------- style


def _border(size: int) -> np.ndarray:
    width = max(1, round(0.07 * size))
    ring = np.zeros((size, size), dtype=bool)
    ring[:width], ring[-width:], ring[:, :width], ring[:, -width:] = True, True, True, True
    return ring


def stripe_power(image: np.ndarray, background: np.ndarray | None = None) -> dict:
    """Fourier power of the picture's brightness at szn's stripe frequency (period S/8 across
    the stripes), along the right diagonal (constant along x + y) and the wrong one, as
    fractions of all power away from the lowest frequencies. With ``background`` (a mask),
    everything else is set to the background's mean brightness first, so that an object's
    own edges (a diamond's run along both diagonals) do not count as stripes."""
    size = image.shape[0]
    luminance = _luminance(image)
    if background is not None:
        if background.sum() < 0.2 * size * size:
            return {"right": 0.0, "wrong": 0.0}
        luminance = np.where(background, luminance, luminance[background].mean())
    window = np.outer(np.hanning(size), np.hanning(size))
    spectrum = np.abs(np.fft.fft2((luminance - luminance.mean()) * window)) ** 2
    k = np.fft.fftfreq(size) * size  # cycles per picture
    kx, ky = np.meshgrid(k, k)
    radius, target = np.hypot(kx, ky), 1 / world.PERIOD
    band = (radius >= 0.75 * target) & (radius <= 1.3 * target)
    total = spectrum[radius >= 2.5].sum() + 1e-12
    along = np.abs(kx - ky) <= 0.25 * target  # kx = ky: brightness varies along x + y
    against = np.abs(kx + ky) <= 0.25 * target
    return {"right": float(spectrum[band & along].sum() / total),
            "wrong": float(spectrum[band & against].sum() / total)}


def outline_darkness(image, violet, border) -> float:
    """The mean brightness of the pixels just outside the object's fill (one pixel at 32 x 32), over the
    background's: above 1 without an outline (the ring shows the background's stripes and the fill's
    blur), about 0.3 with szn's outline, drawn, and up to 0.5 after the VAE. The fill: what is neither
    violet background nor dark."""
    size = image.shape[0]
    luminance = _luminance(image)
    fill = ~violet & ~border & (luminance >= 35)
    if fill.sum() < 0.02 * size * size:
        return 1.0
    ring = _grow(fill, max(1, round(0.03 * size))) & ~fill
    background = violet & border
    if not ring.any() or not background.any():
        return 1.0
    return float(luminance[ring].mean() / max(luminance[background].mean(), 1.0))


def style(image: np.ndarray) -> tuple[bool, dict]:
    """Is this szn style: violet background, rising 45-degree stripes at szn's period, black outline?"""
    size = image.shape[0]
    border = _border(size)
    violet = violet_mask(image)
    violet_border = float(violet[border].mean())
    power = stripe_power(image, background=violet & ~_grow(~violet & ~border, 1))
    outline = outline_darkness(image, violet, border)
    verdict = (violet_border >= 0.6 and power["right"] >= 0.06 and power["right"] >= 2 * power["wrong"]
               and outline <= 0.7)
    return bool(verdict), {"violet_border": round(violet_border, 3), "stripes_right": round(power["right"], 3),
                           "stripes_wrong": round(power["wrong"], 3), "outline": round(outline, 3)}


# -------------------------------------------------------------- base scenes


def read_base(image: np.ndarray) -> dict:
    """The shape, colour, background and texture a base picture shows."""
    size = image.shape[0]
    pixels = image.astype(np.float64)
    edge = np.median(pixels[_border(size)], axis=0)
    backgrounds = {name: np.array(rgb, float) for name, rgb in world.BACKGROUNDS.items()}
    background = min(backgrounds, key=lambda n: np.linalg.norm(backgrounds[n] - edge))
    mask = np.linalg.norm(pixels - edge, axis=-1) > 40
    shape, iou, silhouette = classify_shape(mask)
    # a texture's darker shade can be close to the background (blue on navy): the texture is read
    # over the fitted silhouette, not over what differs from the background
    core = _shrink(silhouette)
    inner = pixels[core & mask] if (core & mask).sum() >= 8 else pixels[mask] if mask.any() else pixels.reshape(-1, 3)

    def fit(name):
        rgb = np.array(world.COLOURS[name], float)
        near = np.minimum(np.linalg.norm(inner - rgb, axis=-1),
                          np.linalg.norm(inner - rgb * world.TEXTURE_SHADE, axis=-1))
        return float((near <= 45).mean())

    colour = max(world.COLOURS, key=fit)
    rgb = np.array(world.COLOURS[colour], float)
    axis = rgb * (1 - world.TEXTURE_SHADE)
    shade = np.clip(((rgb - pixels) @ axis) / (axis @ axis), 0, 1)  # 0: the colour, 1: its darker shade
    coords = (np.arange(size * 4) + 0.5) / (size * 4)
    x, y = np.meshgrid(coords, coords)
    region = core if core.sum() >= 8 else silhouette
    errors = {}
    for texture in world.TEXTURES:
        pattern = world.texture_mask(texture, x, y).reshape(size, 4, size, 4).mean(axis=(1, 3))
        errors[texture] = min(float(np.abs(shade - np.roll(pattern, (dy, dx), axis=(0, 1)))[region].mean())
                              if region.any() else 1.0 for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    texture = min(errors, key=errors.get)
    return {"shape": shape, "colour": colour, "background": background, "texture": texture,
            "shape_iou": round(iou, 3), "colour_fit": round(fit(colour), 3)}


def caption_match(image: np.ndarray, scene: world.Scene) -> dict:
    """Which of the caption's four attributes the picture shows: {attribute: bool}."""
    read = read_base(image)
    return {name: read[name] == getattr(scene, name) for name in ("shape", "colour", "background", "texture")}
