"""Train the world from scratch: the small SDXL and the two LoRAs the demo and the tests use.

    python train_world.py                 # everything, about 1.5 hours on a 2-core CPU

Stages (each resumes where a stopped run left off; --until stops after one):
data, vae, base (UNet + text encoders), loras (train_dreambooth_lora_sdxl.py, twice),
score (the world's scorers on the trained model and LoRAs). Outputs: world/sdxl,
world/loras/sbu.safetensors, world/loras/szn.safetensors and world/report.json;
everything else (pictures, checkpoints) goes to --work_dir. docs/world.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

STAGES = ("data", "vae", "base", "loras", "score")
ROOT = Path(__file__).resolve().parent

# The LoRAs' prompts: the subject's one prompt, the style's pictures each their caption file.
LORA_PROMPTS = {"sbu": ["--instance_prompt", "a sbu toy"],
                "szn": ["--instance_prompt", "a shape in szn style", "--caption_extension", ".txt"]}


def build_parser():
    from klora.world_training import WorldConfig

    parser = argparse.ArgumentParser(description="Train the world's SDXL and its two LoRAs from scratch.")
    for f in fields(WorldConfig):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    parser.add_argument("--until", choices=STAGES, default="score", help="stop after this stage")
    return parser


def lora_command(name: str, model: Path, config) -> list[str]:
    """The LoRA's training, as a user of train_dreambooth_lora_sdxl.py runs it."""
    work = Path(config.work_dir)
    return [sys.executable, str(ROOT / "train_dreambooth_lora_sdxl.py"),
            "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(work / name),
            "--output_dir", str(work / f"lora-{name}"), *LORA_PROMPTS[name], "--resolution", "32",
            "--rank", str(config.lora_rank), "--train_batch_size", str(config.lora_batch),
            "--max_train_steps", str(config.lora_steps), "--learning_rate", str(config.lora_learning_rate),
            "--seed", str(config.seed), "--checkpointing_steps", "100", "--resume_from_checkpoint", "latest"]


def run_showing_output(command) -> float | None:
    """Run a training command with its output shown as it comes; returns the last loss its progress
    bar showed."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    tail = b""
    while chunk := process.stderr.read1(4096):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-4096:]
    if process.wait():
        raise SystemExit(f"error: {command[1]} failed (exit code {process.returncode})")
    losses = re.findall(rb"loss=([0-9.]+)", tail)
    return float(losses[-1]) if losses else None


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    import torch

    from klora import world_training
    from klora.world_training import WorldConfig

    config = WorldConfig(**{f.name: getattr(args, f.name) for f in fields(WorldConfig)})
    if config.threads:
        torch.set_num_threads(config.threads)
    out, work = Path(config.output_dir), Path(config.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    def stage(name):
        return STAGES.index(name) <= STAGES.index(args.until)

    model = out / "sdxl"
    if stage("data"):
        world_training.make_data(config)
    if stage("vae"):
        vae = world_training.train_vae(config)
    if stage("base"):
        if not (model / "model_index.json").exists():
            parts = world_training.train_base(config, vae)
            partial = out / "sdxl.partial"
            shutil.rmtree(partial, ignore_errors=True)
            world_training.save_pipeline(parts, partial)
            os.replace(partial, model)
        print(f"base model: {model}")
    if stage("loras"):
        (out / "loras").mkdir(parents=True, exist_ok=True)
        for name in LORA_PROMPTS:
            target = out / "loras" / f"{name}.safetensors"
            if target.exists():
                continue
            command = lora_command(name, model, config)
            started = time.time()
            print("$", " ".join(command[1:]))
            loss = run_showing_output(command)
            shutil.copyfile(work / f"lora-{name}" / "pytorch_lora_weights.safetensors", target)
            world_training.record(work, f"lora_{name}", {"seconds": round(time.time() - started),
                                                         "final_loss": loss,
                                                         "command": " ".join([Path(command[1]).name, *command[2:]])})
    if stage("score"):
        from klora import world_eval

        report = world_eval.score_world(model, out / "loras" / "sbu.safetensors", out / "loras" / "szn.safetensors",
                                        seeds=config.score_seeds)
        report["training"] = json.loads((work / "report.json").read_text())
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
