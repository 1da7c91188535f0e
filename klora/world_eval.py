"""The trained world, judged by its scorers: does the base model follow captions it never saw,
does each LoRA do its job alone, and what does each fusion method make of "a sbu toy in szn style"?

``train_world.py`` calls ``score_world`` at its end; ``evaluate_metrics.py`` scores a results
folder of world pictures with ``rates``. Numbers of the shipped files: docs/world.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import world, world_scorers

ROOT = Path(__file__).resolve().parent.parent
WORLD = ROOT / "world"
MODEL = WORLD / "sdxl"
SUBJECT_LORA = WORLD / "loras" / "sbu.safetensors"
STYLE_LORA = WORLD / "loras" / "szn.safetensors"
STEPS, GUIDANCE = 50, 5.0  # the pipeline's own defaults: what inference_sd.py uses on world/sdxl


def load(model=MODEL, device="cpu"):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str, seeds, steps: int = STEPS, guidance: float = GUIDANCE, batch: int = 16,
             callback=None) -> list[np.ndarray]:
    """One picture per seed (uint8 arrays), ``batch`` seeds per pipeline call."""
    import torch

    pictures = []
    seeds = list(seeds)
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        kwargs = {"callback_on_step_end": callback} if callback is not None else {}
        images = pipe(prompt, num_images_per_prompt=len(chunk), num_inference_steps=steps,
                      guidance_scale=guidance, output_type="np",
                      generator=[torch.Generator().manual_seed(s) for s in chunk], **kwargs).images
        pictures += [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in images]
    return pictures


def rates(pictures) -> dict:
    """Share of pictures the scorers call the subject, szn style, and both."""
    subject = [world_scorers.subject(p)[0] for p in pictures]
    style = [world_scorers.style(p)[0] for p in pictures]
    both = [a and b for a, b in zip(subject, style)]
    n = max(1, len(pictures))
    return {"subject": sum(subject) / n, "style": sum(style) / n, "both": sum(both) / n, "pictures": len(pictures)}


def base_following(pipe, seeds_per_caption: int = 2, **generation) -> dict:
    """How often the base model draws what a held-out caption names (captions it never saw)."""
    hits = {name: 0 for name in ("shape", "colour", "background", "texture", "all")}
    total = 0
    for combo in world.held_out_combinations():
        scene = world.Scene(*combo)
        for picture in generate(pipe, world.caption(scene), range(seeds_per_caption), **generation):
            match = world_scorers.caption_match(picture, scene)
            for name, ok in match.items():
                hits[name] += ok
            hits["all"] += all(match.values())
            total += 1
    return {name: round(count / total, 3) for name, count in hits.items()} | {"pictures": total}


def round_trip(pipe, pictures) -> list[np.ndarray]:
    """Pictures through the model's VAE and back: what the model can draw at best."""
    import torch

    from .world_training import to_pixels

    vae = pipe.vae
    x = to_pixels(np.stack(pictures))
    with torch.no_grad():
        out = vae.decode(vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean).sample
    out = ((out.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return list(out)


def drawn_targets(count: int, seed: int = 11) -> dict:
    """Drawn pictures of what each prompt asks for: the sbu toy, shapes in szn style, the sbu toy in szn style."""
    rng = np.random.default_rng(seed)
    stars = [world.jitter(rng, world.Scene("star", background=str(rng.choice(list(world.BACKGROUNDS)))), scale=False)
             for _ in range(count)]
    return {"subject": [world.draw(s) for s in stars],
            "style": [world.draw(s) for s in world.style_scenes(count, seed=seed)],
            "fused": [world.draw(world.Scene("star", szn=True, dx=s.dx, dy=s.dy)) for s in stars]}


def style_prompts(count: int, seed: int = 7) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"a {rng.choice(list(world.COLOURS))} {rng.choice(world.SHAPES)} in szn style" for _ in range(count)]


def score_world(model, subject_lora, style_lora, seeds: int = 32, **generation) -> dict:
    """The trained world's report: the base on held-out captions; each LoRA alone on its own prompt."""
    from .fusion import KLoRA

    pipe = load(model)
    # the ceiling: the scorers on drawn pictures of each target, through the VAE and back
    report = {"vae_round_trip": {name: rates(round_trip(pipe, pictures))
                                 for name, pictures in drawn_targets(seeds).items()},
              "base_held_out_captions": base_following(pipe, **generation)}
    klora = KLoRA(pipe, str(subject_lora), str(style_lora), method="content")
    try:
        report["content_lora"] = rates(generate(pipe, world.SUBJECT_PROMPT, range(seeds), **generation))
        klora.set_method("style")
        pictures = []
        for i, prompt in enumerate(style_prompts(seeds)):
            pictures += generate(pipe, prompt, [i], **generation)
        report["style_lora"] = rates(pictures)
    finally:
        klora.detach()
    report["base_on_lora_prompts"] = {
        "subject_prompt": rates(generate(pipe, world.SUBJECT_PROMPT, range(seeds), **generation)),
        "fused_prompt": rates(generate(pipe, world.FUSED_PROMPT, range(seeds), **generation))}
    return _rounded(report)


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 3) if isinstance(value, float) else value


# ------------------------------------------------- a results folder of world pictures


def score_results(found) -> dict:
    """Rates per method of ``grid.scan``'s images: {method: rates}."""
    from PIL import Image

    by_method = {}
    for item in found:
        with Image.open(item.path) as opened:
            by_method.setdefault(item.method, []).append(np.asarray(opened.convert("RGB")))
    return {method: rates(pictures) for method, pictures in by_method.items()}


def markdown_table(table: dict, methods, labels) -> str:
    lines = ["| method | pictures | subject | szn style | both |", "|---|---:|---:|---:|---:|"]
    for m in methods:
        r = table[m]
        lines.append(f"| {labels[m]} | {r['pictures']} | {r['subject']:.0%} | {r['style']:.0%} | {r['both']:.0%} |")
    return "\n".join(lines) + "\n"


def split_curves(table: dict, steps: int) -> dict:
    """The sweep as curves over K = 0..steps: {(order, rate): [value or None per K]}; the ends
    are the one-LoRA runs (c2s at 0 is style only, at ``steps`` content only)."""
    from .grid import parse_split

    curves = {}
    for order, start, end in (("c2s", "style", "content"), ("s2c", "content", "style")):
        for rate in ("subject", "style", "both"):
            values = [None] * (steps + 1)
            values[0] = table.get(start, {}).get(rate)
            values[steps] = table.get(end, {}).get(rate)
            for method, r in table.items():
                split = parse_split(method)
                if split and method.startswith(order) and split[1] < steps:
                    values[split[1]] = r[rate]
            curves[(order, rate)] = values
    return curves


def split_chart(curves: dict, steps: int, klora_shares: dict, title: str):
    """A line chart of the sweep (PIL only): subject and style rates against K for both orders,
    and the share of layers K-LoRA gives to content at each step."""
    from PIL import Image, ImageDraw

    from .grid import _font

    width, height, left, right, top, bottom = 1000, 520, 70, 310, 50, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(13)
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(k, value):
        return left + plot_w * k / max(1, steps), top + plot_h * (1 - value)

    draw.text((left, 12), title, fill="black", font=font)
    for tick in range(0, 11, 2):
        y = top + plot_h * (1 - tick / 10)
        draw.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
        draw.text((left - 45, y - 8), f"{tick * 10}%", fill="black", font=small)
    for k in range(0, steps + 1, max(1, steps // 10)):
        x, _ = xy(k, 0)
        draw.text((x - 6, top + plot_h + 8), str(k), fill="black", font=small)
    draw.text((left + plot_w // 2 - 120, height - 28), "K: the step at which the LoRA switches",
              fill="black", font=small)
    styles = {("c2s", "subject"): ((214, 110, 20), 3), ("c2s", "style"): ((40, 90, 200), 3),
              ("s2c", "subject"): ((214, 110, 20), 1), ("s2c", "style"): ((40, 90, 200), 1)}
    legend = []
    for key, (colour, line_width) in styles.items():
        points = [xy(k, v) for k, v in enumerate(curves.get(key, [])) if v is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=line_width)
        order = "content then style" if key[0] == "c2s" else "style then content"
        legend.append((f"{key[1]} rate, {order}", colour, line_width))
    for name, shares in klora_shares.items():
        colour = (120, 120, 120) if name == "klora-s" else (0, 0, 0)
        points = [xy(i + 0.5, v) for i, v in enumerate(shares)]  # step i lies between K = i and K = i + 1
        if len(points) > 1:
            draw.line(points, fill=colour, width=1)
        for x, y in points:
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)
        legend.append((f"{name}: share of layers on content", colour, 2))
    for i, (text, colour, line_width) in enumerate(legend):
        y = top + 10 + 24 * i
        draw.line([(width - right + 15, y + 8), (width - right + 45, y + 8)], fill=colour, width=line_width)
        draw.text((width - right + 52, y), text, fill="black", font=small)
    return image
