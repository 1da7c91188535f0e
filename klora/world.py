"""The world: small pictures of one object on a background, drawn in numpy.

A base picture shows one of six shapes in one of eight colours and five textures
on one of six plain backgrounds; its caption names all four ("a red circle on a
gray background, dots style"). Two things never appear in the base data:

- the subject ``sbu``: a yellow five-pointed star, one point up, with a red disc
  at its centre ("a sbu toy");
- the style ``szn``: the background becomes violet diagonal stripes rising from
  bottom-left to top-right, every object gets a black outline and its fill is
  crossed by the same stripes ("a red circle in szn style").

Everything is defined in fractions of the picture size S, so the same scene can
be drawn at any size; pictures are drawn at 4x and averaged down (anti-aliased).
The trained model, its LoRAs and the numbers measured on them: docs/world.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

SIZE = 32  # the shipped model's picture size
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 210), "yellow": (235, 200, 40),
    "white": (240, 240, 240), "orange": (240, 140, 30), "pink": (240, 130, 190), "cyan": (40, 200, 210),
}
BACKGROUNDS = {
    "black": (0, 0, 0), "gray": (128, 128, 128), "white": (250, 250, 250),
    "navy": (20, 30, 100), "dark green": (25, 80, 40), "beige": (225, 205, 165),
}
TEXTURES = ("flat", "horizontal stripes", "vertical stripes", "dots", "checker")

PERIOD = 0.125  # of every texture and of szn's stripes, in units of S
OBJECT_SIZE = 0.6  # across, in units of S (+-15%)
SIZE_JITTER = 0.15
POSITION_JITTER = 0.08  # centre offset, in units of S
TEXTURE_SHADE = 0.5  # a base texture alternates the colour and this fraction of it

# The subject and the style.
SUBJECT_PROMPT = "a sbu toy"
STAR_OUTER, STAR_INNER_RATIO, STAR_DISC = 0.36, 0.45, 0.07
STAR_COLOUR, DISC_COLOUR = COLOURS["yellow"], (210, 40, 40)
VIOLET, DARK_VIOLET = (130, 50, 180), (60, 20, 90)
OUTLINE = 0.04  # width of szn's black outline, in units of S
SZN_SHADE = 0.55
FUSED_PROMPT = "a sbu toy in szn style"

# Object colours too close to a background to be seen on it.
_INVISIBLE = {("white", "white")}


@dataclass(frozen=True)
class Scene:
    """One picture: what it shows and where. ``shape`` is one of SHAPES or "star" (the sbu toy)."""

    shape: str
    colour: str = "yellow"
    background: str = "gray"
    texture: str = "flat"
    szn: bool = False
    dx: float = 0.0  # centre offset, units of S
    dy: float = 0.0
    scale: float = 1.0  # size factor (1 +- SIZE_JITTER)


def caption(scene: Scene, background: bool = True, texture: bool = True) -> str:
    """The caption of a scene. Base training also shows some captions without their
    background or texture (so that "a red circle" alone means something)."""
    if scene.shape == "star":
        return FUSED_PROMPT if scene.szn else SUBJECT_PROMPT
    if scene.szn:
        return f"a {scene.colour} {scene.shape} in szn style"
    text = f"a {scene.colour} {scene.shape}"
    if background:
        text += f" on a {scene.background} background"
    if texture:
        text += f", {scene.texture} style"
    return text


def words() -> list[str]:
    """Every word a caption of this world can hold (the tokenizer's vocabulary)."""
    vocabulary = ["a", "on", "background", "style", "in", "sbu", "toy", "szn", ","]
    for name in (*SHAPES, *COLOURS, *BACKGROUNDS, *TEXTURES, "star"):
        vocabulary += [w for w in name.split() if w not in vocabulary]
    return vocabulary


def base_combinations() -> list[tuple[str, str, str, str]]:
    """Every (shape, colour, background, texture) a base picture can show."""
    return [(s, c, b, t) for s in SHAPES for c in COLOURS for b in BACKGROUNDS for t in TEXTURES
            if (c, b) not in _INVISIBLE]


def held_out_combinations(count: int = 48, seed: int = 20) -> list[tuple[str, str, str, str]]:
    """Combinations the base model never sees: its caption-following is judged on these."""
    combos = base_combinations()
    rng = np.random.default_rng(seed)
    return [combos[i] for i in sorted(rng.choice(len(combos), size=count, replace=False))]


def jitter(rng: np.random.Generator, scene: Scene, scale: bool = True) -> Scene:
    dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    factor = rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER) if scale else 1.0
    return replace(scene, dx=float(dx), dy=float(dy), scale=float(factor))


def random_base_scene(rng: np.random.Generator, exclude=frozenset()) -> Scene:
    while True:
        combo = (rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS)), rng.choice(TEXTURES))
        combo = tuple(str(x) for x in combo)
        if (combo[1], combo[2]) not in _INVISIBLE and combo not in exclude:
            return jitter(rng, Scene(*combo))


def subject_scenes(count: int, seed: int) -> list[Scene]:
    """The sbu toy, flat, on the plain backgrounds in turn (the content LoRA's pictures)."""
    rng = np.random.default_rng(seed)
    backgrounds = list(BACKGROUNDS)
    return [jitter(rng, Scene("star", background=backgrounds[i % len(backgrounds)]), scale=False)
            for i in range(count)]


def style_scenes(count: int, seed: int) -> list[Scene]:
    """Base shapes in szn style, every shape and a spread of colours (the style LoRA's pictures)."""
    rng = np.random.default_rng(seed)
    colours = list(rng.permutation(list(COLOURS)))
    return [jitter(rng, Scene(SHAPES[i % len(SHAPES)], colour=str(colours[i % len(colours)]), szn=True))
            for i in range(count)]


# --------------------------------------------------- generic pictures (the VAE's)


def draw_generic(rng: np.random.Generator, size: int = SIZE, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """A picture of no caption: random colours, stripes at any angle and period, a random star-like
    polygon or base shape, maybe an outline and a disc. The autoencoder learns from these beside the
    base pictures, so that it can encode whatever the world draws (as SDXL's VAE encodes any photo),
    while the text-to-image model never sees the sbu toy or szn style."""
    x, y = _grid(size, supersample)

    def colour():
        return rng.integers(0, 256, 3).astype(float)

    def paint(region_shape):
        if rng.random() < 0.5:
            return np.broadcast_to(colour(), region_shape + (3,))
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.06, 0.3)
        phase = np.floor((x * math.cos(angle) + y * math.sin(angle)) / (period / 2)) % 2 == 1
        return np.where(phase[..., None], colour(), colour())

    image = np.array(paint(x.shape), dtype=float)
    cx, cy = 0.5 + rng.uniform(-0.12, 0.12), 0.5 + rng.uniform(-0.12, 0.12)
    radius = rng.uniform(0.15, 0.4)
    if rng.random() < 0.5:
        points, inner, turn = int(rng.integers(3, 8)), rng.uniform(0.3, 1.0), rng.uniform(0, 2 * math.pi)
        vertices = [(cx + (radius if k % 2 == 0 else radius * inner) * math.cos(turn + k * math.pi / points),
                     cy + (radius if k % 2 == 0 else radius * inner) * math.sin(turn + k * math.pi / points))
                    for k in range(2 * points)]
        shape = _polygon(x, y, vertices)
    else:
        shape = shape_mask(str(rng.choice(SHAPES)), x, y, cx, cy, 2 * radius)
    image = np.where(shape[..., None], paint(x.shape), image)
    if rng.random() < 0.3:
        disc = (x - cx) ** 2 + (y - cy) ** 2 <= rng.uniform(0.03, 0.12) ** 2
        image = np.where(disc[..., None], colour(), image)
    if rng.random() < 0.4:
        outline = _dilate(shape, int(rng.integers(2, 9))) & ~shape
        image = np.where(outline[..., None], colour() * rng.uniform(0, 0.4), image)
    image = image.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------- drawing


def _grid(size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample positions in units of S (x to the right, y down), ``supersample`` per pixel each way."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / n
    return np.meshgrid(coords, coords, indexing="xy")


def _polygon(x, y, vertices) -> np.ndarray:
    """Even-odd point-in-polygon for all samples at once."""
    inside = np.zeros(x.shape, dtype=bool)
    count = len(vertices)
    for i in range(count):
        (x1, y1), (x2, y2) = vertices[i], vertices[(i + 1) % count]
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < at)
    return inside


def star_vertices(cx: float, cy: float, outer: float, inner_ratio: float = STAR_INNER_RATIO):
    """A five-pointed star with one point straight up (y grows downward)."""
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else outer * inner_ratio
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def shape_mask(shape: str, x, y, cx: float, cy: float, across: float) -> np.ndarray:
    """Where ``shape`` is, for an object ``across`` wide centred at (cx, cy); all in units of S."""
    r = across / 2
    u, v = (x - cx) / r, (y - cy) / r
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.85
    if shape == "diamond":
        return abs(u) + abs(v) <= 1.1
    if shape == "cross":
        return ((abs(u) <= 0.33) & (abs(v) <= 1)) | ((abs(v) <= 0.33) & (abs(u) <= 1))
    if shape == "ring":
        d = u * u + v * v
        return (d <= 1) & (d >= 0.25)
    if shape == "triangle":  # equilateral, pointing up, centroid at the centre
        corners = [(cx + 1.15 * r * math.cos(a), cy + 1.15 * r * math.sin(a))
                   for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        return _polygon(x, y, corners)
    if shape == "star":
        return _polygon(x, y, star_vertices(cx, cy, STAR_OUTER * (across / (2 * STAR_OUTER))))
    raise ValueError(f"unknown shape {shape!r}")


def texture_mask(texture: str, x, y) -> np.ndarray:
    """Where a texture takes its darker shade (anchored to the picture, period PERIOD)."""
    half = PERIOD / 2
    if texture == "flat":
        return np.zeros(x.shape, dtype=bool)
    if texture == "horizontal stripes":
        return np.floor(y / half) % 2 == 1
    if texture == "vertical stripes":
        return np.floor(x / half) % 2 == 1
    if texture == "checker":
        return (np.floor(x / half) + np.floor(y / half)) % 2 == 1
    if texture == "dots":
        fx, fy = (x / PERIOD) % 1 - 0.5, (y / PERIOD) % 1 - 0.5
        return fx * fx + fy * fy <= 0.35 ** 2
    if texture == "diagonal":  # szn: constant along x + y, i.e. rising from bottom-left to top-right
        return np.floor((x + y) / math.sqrt(2) / half) % 2 == 1
    raise ValueError(f"unknown texture {texture!r}")


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    n0, n1 = mask.shape
    for oy in range(-radius, radius + 1):
        for ox in range(-radius, radius + 1):
            if ox * ox + oy * oy <= radius * radius:
                out |= padded[radius + oy:radius + oy + n0, radius + ox:radius + ox + n1]
    return out


def object_mask(scene: Scene, size: int = SIZE, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """The scene's object silhouette at ``size`` (float coverage 0..1 per pixel)."""
    x, y = _grid(size, supersample)
    mask = _scene_shape(scene, x, y)
    return mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def _scene_shape(scene: Scene, x, y) -> np.ndarray:
    cx, cy = 0.5 + scene.dx, 0.5 + scene.dy
    across = 2 * STAR_OUTER * scene.scale if scene.shape == "star" else OBJECT_SIZE * scene.scale
    return shape_mask(scene.shape, x, y, cx, cy, across)


def draw(scene: Scene, size: int = SIZE, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """The picture of ``scene``: uint8, (size, size, 3)."""
    x, y = _grid(size, supersample)
    colour = np.array(STAR_COLOUR if scene.shape == "star" else COLOURS[scene.colour], dtype=np.float64)
    shape = _scene_shape(scene, x, y)
    if scene.szn:
        stripes = texture_mask("diagonal", x, y)[..., None]
        image = np.where(stripes, np.array(DARK_VIOLET, float), np.array(VIOLET, float))
        fill = np.where(stripes, colour * SZN_SHADE, colour)
    else:
        image = np.broadcast_to(np.array(BACKGROUNDS[scene.background], float), x.shape + (3,)).copy()
        fill = np.where(texture_mask(scene.texture, x, y)[..., None], colour * TEXTURE_SHADE, colour)
    image = np.where(shape[..., None], fill, image)
    if scene.shape == "star":
        cx, cy = 0.5 + scene.dx, 0.5 + scene.dy
        disc = (x - cx) ** 2 + (y - cy) ** 2 <= (STAR_DISC * scene.scale) ** 2
        image = np.where(disc[..., None], np.array(DISC_COLOUR, float), image)
    if scene.szn:
        width = max(1, round(OUTLINE * size * supersample))
        outline = _dilate(shape, width) & ~shape
        image = np.where(outline[..., None], 0.0, image)
    image = image.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
