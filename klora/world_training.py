"""Training the world's SDXL from scratch on pictures drawn by ``klora/world.py``.

Three stages, each resumable (``train_world.py`` runs them, then the two LoRAs):

1. ``make_data``: the base pictures (never the sbu toy, never szn style; a fixed
   set of held-out captions is never drawn) and the two LoRAs' instance folders;
2. ``train_vae``: the ``AutoencoderKL`` as a plain autoencoder (latents at half the
   picture size), on base pictures and as many generic ones (``world.draw_generic``:
   random colours, stripes at any angle, star-like polygons, outlines, discs), so that
   it encodes whatever the world draws; its ``scaling_factor`` is 1 / the latents'
   standard deviation, as the LDM paper sets it;
3. ``train_base``: the UNet and both text encoders together, v-prediction with a
   zero-terminal-SNR schedule, conditioned exactly as ``StableDiffusionXLPipeline``
   conditions it (``klora.training.encode_prompt``, time ids ``(S, S, 0, 0, S, S)``,
   all-zero embeddings for the unconditional branch); an EMA of the weights is
   what is saved.

Every random draw comes from a generator seeded by (seed, step), so a run stopped
and resumed from its last checkpoint makes the same model. Times and losses of
the shipped run: docs/world.md.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import world, world_model
from .training import encode_prompt, tokenize


@dataclass
class WorldConfig:
    output_dir: str = "world"  # world/sdxl, world/loras
    work_dir: str = "world_work"  # data, checkpoints, previews (not shipped)
    seed: int = 0
    base_pictures: int = 50_000
    instance_pictures: int = 8  # each LoRA's
    vae_steps: int = 1500
    vae_batch: int = 64
    vae_learning_rate: float = 1e-3
    base_steps: int = 5000
    base_batch: int = 32
    base_learning_rate: float = 1e-3
    warmup_steps: int = 300
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    checkpoint_every: int = 500
    lora_steps: int = 1200  # each LoRA, through train_dreambooth_lora_sdxl.py
    lora_rank: int = 8
    lora_batch: int = 8
    lora_learning_rate: float = 2e-3
    score_seeds: int = 32
    threads: int = 0  # 0: torch's default


def _save_atomic(obj, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def _generator(seed: int, step: int, stage: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + stage) * 1_000_033 + step) % (2 ** 63))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then a cosine down to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


# ------------------------------------------------------------------- data


def make_data(c: WorldConfig, log=print) -> Path:
    """Base pictures and captions in WORK/base.npz; the instance folders WORK/sbu and WORK/szn."""
    work = Path(c.work_dir)
    target = work / "base.npz"
    if target.exists():
        return target
    from tqdm.auto import tqdm

    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rng = np.random.default_rng([c.seed, 1])
    held_out = frozenset(world.held_out_combinations())
    pictures = np.empty((c.base_pictures, world.SIZE, world.SIZE, 3), dtype=np.uint8)
    scenes = []
    for i in tqdm(range(c.base_pictures), desc="drawing base pictures", mininterval=2):
        scene = world.random_base_scene(rng, exclude=held_out)
        pictures[i] = world.draw(scene)
        scenes.append((scene.shape, scene.colour, scene.background, scene.texture))
    write_instance_folder(work / "sbu", world.subject_scenes(c.instance_pictures, seed=c.seed + 11))
    write_instance_folder(work / "szn", world.style_scenes(c.instance_pictures, seed=c.seed + 12))
    partial = work / "base.partial.npz"
    np.savez(partial, pictures=pictures, scenes=np.array(scenes))
    os.replace(partial, target)
    record(work, "data", {"base_pictures": c.base_pictures, "seconds": round(time.time() - started)})
    log(f"data: {c.base_pictures} base pictures ({len(held_out)} caption combinations held out), "
        f"{c.instance_pictures} pictures each of sbu and szn")
    return target


def write_instance_folder(folder: Path, scenes) -> None:
    """PNG pictures with a caption file of the same name beside each (``NAME.txt``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        Image.fromarray(world.draw(scene)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(world.caption(scene) + "\n")


def to_pixels(batch: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) pictures as the VAE's input: float (N, 3, H, W) in -1..1."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# -------------------------------------------------------------------- VAE


def train_vae(c: WorldConfig, log=print):
    """The autoencoder, trained on the base pictures; returns it with its scaling factor set."""
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    work = Path(c.work_dir)
    done = work / "vae"
    if (done / "config.json").exists():
        return AutoencoderKL.from_pretrained(done)
    pictures = np.load(work / "base.npz")["pictures"]
    torch.manual_seed(c.seed)
    vae = world_model.vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=c.vae_learning_rate, weight_decay=0.0)
    checkpoint = work / "vae.ckpt"
    step = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    started = time.time()
    progress = tqdm(total=c.vae_steps, initial=step, desc="VAE")
    vae.train()
    while step < c.vae_steps:
        g = _generator(c.seed, step, stage=2)
        index = torch.randint(len(pictures), (c.vae_batch // 2,), generator=g).numpy()
        rng = np.random.default_rng([c.seed, 2, step])
        generic = np.stack([world.draw_generic(rng) for _ in range(c.vae_batch - len(index))])
        x = to_pixels(np.concatenate([pictures[index], generic]))
        for group in optimizer.param_groups:
            group["lr"] = c.vae_learning_rate * _lr_factor(step, 100, c.vae_steps)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        reconstruction = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(reconstruction, x)
        loss = mse + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update(1)
        progress.set_postfix(mse=f"{mse.item():.5f}")
        if step % c.checkpoint_every == 0 or step == c.vae_steps:
            _save_atomic({"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, checkpoint)
    progress.close()
    vae.eval()
    with torch.no_grad():
        sample = to_pixels(pictures[:2048])
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in sample.split(256)])
        mse = torch.cat([((vae.decode(z).sample - x) ** 2).mean(dim=(1, 2, 3))
                         for z, x in zip(latents.split(256), sample.split(256))]).mean().item()
        unseen = {name: to_pixels(np.stack([world.draw(s) for s in scenes]))  # what the base data never shows
                  for name, scenes in (("sbu", world.subject_scenes(16, seed=99)),
                                       ("szn", world.style_scenes(16, seed=99)))}
        unseen_mse = {name: ((vae.decode(vae.encode(x).latent_dist.mean).sample - x) ** 2).mean().item()
                      for name, x in unseen.items()}
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(done)
    psnr = 10 * math.log10(4.0 / mse)  # pixels in [-1, 1]
    unseen_psnr = {f"psnr_db_{name}": round(10 * math.log10(4.0 / value), 2) for name, value in unseen_mse.items()}
    record(work, "vae", {"steps": c.vae_steps, "seconds": round(time.time() - started),
                         "reconstruction_mse": round(mse, 6), "psnr_db": round(psnr, 2), **unseen_psnr,
                         "scaling_factor": vae.config.scaling_factor})
    log(f"VAE: reconstruction PSNR {psnr:.1f} dB on base pictures, "
        + ", ".join(f"{v:.1f} dB on {k[8:]}" for k, v in unseen_psnr.items())
        + f"; scaling factor {vae.config.scaling_factor:.4f}")
    return vae


def record(work: Path, stage: str, values: dict) -> None:
    """What each stage measured, for the docs: WORK/report.json."""
    path = work / "report.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report[stage] = values
    path.write_text(json.dumps(report, indent=2) + "\n")


def encode_pictures(vae, pictures: np.ndarray) -> torch.Tensor:
    """Scaled latents (the posterior means) of uint8 pictures."""
    with torch.no_grad():
        return torch.cat([vae.encode(to_pixels(chunk)).latent_dist.mean * vae.config.scaling_factor
                          for chunk in np.array_split(pictures, max(1, len(pictures) // 512))])


# ------------------------------------------------------------------- base


def _caption_variant(scene_row, draw: float) -> str:
    """Most captions name all four; some leave out the background, the texture or both."""
    scene = world.Scene(*[str(v) for v in scene_row])
    if draw < 0.7:
        return world.caption(scene)
    if draw < 0.8:
        return world.caption(scene, background=False)
    if draw < 0.9:
        return world.caption(scene, texture=False)
    return world.caption(scene, background=False, texture=False)


def train_base(c: WorldConfig, vae, log=print) -> dict:
    """UNet and text encoders from scratch; returns the pipeline's parts with the EMA weights."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    work = Path(c.work_dir)
    data = np.load(work / "base.npz")
    scenes = data["scenes"]
    latents_file = work / "latents.pt"
    if latents_file.exists():
        latents = torch.load(latents_file, weights_only=True)
    else:
        latents = encode_pictures(vae, data["pictures"])
        _save_atomic(latents, latents_file)

    parts = world_model.build_parts(seed=c.seed)
    parts["vae"] = vae
    models = [parts["unet"], parts["text_encoder"], parts["text_encoder_2"]]
    parameters = [p for m in models for p in m.parameters()]
    ema = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=c.base_learning_rate, weight_decay=0.01)
    noise_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    tokenizers = (parts["tokenizer"], parts["tokenizer_2"])
    time_ids = torch.tensor([[world.SIZE, world.SIZE, 0, 0, world.SIZE, world.SIZE]], dtype=torch.float32)

    checkpoint = work / "base.ckpt"
    step, losses = 0, []
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        for model, weights in zip(models, state["models"]):
            model.load_state_dict(weights)
        for kept, saved in zip(ema, state["ema"]):
            kept.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        step, losses = state["step"], state["losses"]
        log(f"base: resumed at step {step}")
    started = time.time()
    progress = tqdm(total=c.base_steps, initial=step, desc="UNet + text encoders")
    for model in models:
        model.train()
    while step < c.base_steps:
        g = _generator(c.seed, step, stage=3)
        index = torch.randint(len(latents), (c.base_batch,), generator=g)
        draws = torch.rand(c.base_batch, generator=g).tolist()
        captions = [_caption_variant(scenes[i], d) for i, d in zip(index.tolist(), draws)]
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=g)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (c.base_batch,), generator=g)
        keep = (torch.rand(c.base_batch, generator=g) >= c.caption_dropout).float()
        for group in optimizer.param_groups:
            group["lr"] = c.base_learning_rate * _lr_factor(step, c.warmup_steps, c.base_steps)

        ids = tokenize(tokenizers, captions)
        embeds, pooled = encode_prompt((parts["text_encoder"], parts["text_encoder_2"]), ids, "cpu")
        embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]  # dropped: the pipeline's zeros
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
        prediction = parts["unet"](noisy, timesteps, embeds,
                                   added_cond_kwargs={"text_embeds": pooled,
                                                      "time_ids": time_ids.expand(c.base_batch, -1)}).sample
        loss = torch.nn.functional.mse_loss(prediction, noise_scheduler.get_velocity(x0, noise, timesteps))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            decay = min(c.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in parameters], 1 - decay)
        step += 1
        losses.append(loss.item())
        progress.update(1)
        if step % 20 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
        if step % c.checkpoint_every == 0 or step == c.base_steps:
            _save_atomic({"models": [m.state_dict() for m in models], "ema": ema,
                          "optimizer": optimizer.state_dict(), "step": step, "losses": losses}, checkpoint)
            log(f"base: step {step}, mean loss of the last 500 steps {np.mean(losses[-500:]):.4f}")
    progress.close()
    with torch.no_grad():
        for p, kept in zip(parameters, ema):
            p.copy_(kept)
    for model in models:
        model.eval()
    record(work, "base", {"steps": c.base_steps, "batch": c.base_batch,
                           "seconds_this_run": round(time.time() - started),
                           "final_loss": round(float(np.mean(losses[-500:])), 4),
                           "unet_parameters": sum(p.numel() for p in parts["unet"].parameters())})
    return parts


def save_pipeline(parts: dict, folder: Path) -> Path:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def config_dict(c: WorldConfig) -> dict:
    return asdict(c)
