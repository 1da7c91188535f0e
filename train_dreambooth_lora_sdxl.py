"""DreamBooth LoRA training for SDXL: a subject LoRA from a few photos, a style LoRA from one image.

    accelerate launch train_dreambooth_lora_sdxl.py \\
      --pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0 \\
      --instance_data_dir=dog --output_dir=lora-sdxl-dog --instance_prompt="a sbu dog" \\
      --rank=8 --resolution=1024 --train_batch_size=1 --learning_rate=5e-5 \\
      --lr_scheduler=constant --lr_warmup_steps=0 --max_train_steps=1000 \\
      --validation_prompt="a sbu dog in a bucket" --validation_epochs=50 --seed=0

Writes OUTPUT_DIR/pytorch_lora_weights.safetensors (diffusers format, alpha
in the metadata), OUTPUT_DIR/README.md, OUTPUT_DIR/validation/*.png and
OUTPUT_DIR/checkpoint-<step>/. The training itself is klora/training.py.
"""

from __future__ import annotations

import sys

from klora import cli
from klora.training import LR_SCHEDULERS, MIXED_PRECISION, REPORT_TO, TrainingConfig, train

D = TrainingConfig("", "", "")  # the defaults


def build_parser():
    p = cli.ArgumentParser(description="Train a DreamBooth LoRA for SDXL (step 1 of K-LoRA's recipe).")
    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="SDXL base: hub id (stabilityai/stable-diffusion-xl-base-1.0) or local folder")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="a separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix for fp16 training")
    g.add_argument("--instance_data_dir", required=True, help="folder with the subject photos or the style image")
    g.add_argument("--instance_prompt", required=True, help="prompt naming the subject, e.g. 'a sbu dog'")
    g.add_argument("--caption_extension", default=None, metavar=".EXT",
                   help="each image's own caption from a text file beside it (e.g. .txt: dog1.png -> dog1.txt); "
                        "images without one use --instance_prompt")
    g.add_argument("--output_dir", default=D.output_dir, help=f"where everything goes (default {D.output_dir})")
    g.add_argument("--resolution", type=int, default=D.resolution,
                   help=f"training size, a multiple of 8 (default {D.resolution})")
    g.add_argument("--center_crop", action="store_true", help="crop the centre (default: a random square)")
    g.add_argument("--random_flip", action="store_true", help="mirror images at random")
    g.add_argument("--dataloader_num_workers", type=int, default=D.dataloader_num_workers,
                   help="image-loading worker processes (default 0: in the training process)")

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=D.rank, help=f"LoRA rank r (default {D.rank})")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha; the update is scaled by "
                   "alpha / rank (default: alpha = rank)")
    g.add_argument("--train_text_encoder", action="store_true", help="also train LoRAs on both text encoders")

    g = p.add_argument_group("prior preservation")
    g.add_argument("--with_prior_preservation", action="store_true",
                   help="add DreamBooth's class-prior loss on images of the class")
    g.add_argument("--class_data_dir", default=None,
                   help="class images; missing ones are generated there by the base model")
    g.add_argument("--class_prompt", default=None, help="prompt of the class, e.g. 'a dog'")
    g.add_argument("--num_class_images", type=int, default=D.num_class_images,
                   help=f"class images to use (default {D.num_class_images})")
    g.add_argument("--prior_loss_weight", type=float, default=D.prior_loss_weight,
                   help=f"weight of the prior loss (default {D.prior_loss_weight})")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=D.train_batch_size,
                   help=f"images per step and process (default {D.train_batch_size})")
    g.add_argument("--gradient_accumulation_steps", type=int, default=D.gradient_accumulation_steps,
                   help="batches per optimiser step (default 1)")
    g.add_argument("--max_train_steps", type=int, default=D.max_train_steps,
                   help=f"optimiser steps (default {D.max_train_steps})")
    g.add_argument("--learning_rate", type=float, default=D.learning_rate,
                   help=f"AdamW learning rate (default {D.learning_rate:g})")
    g.add_argument("--lr_scheduler", default=D.lr_scheduler,
                   help=f"one of {', '.join(LR_SCHEDULERS)} (default {D.lr_scheduler})")
    g.add_argument("--lr_warmup_steps", type=int, default=D.lr_warmup_steps, help="warm-up steps (default 0)")
    g.add_argument("--max_grad_norm", type=float, default=D.max_grad_norm,
                   help=f"gradient clipping norm (default {D.max_grad_norm})")
    g.add_argument("--gradient_checkpointing", action="store_true", help="less memory, about 20%% slower")
    g.add_argument("--use_8bit_adam", action="store_true",
                   help="bitsandbytes' 8-bit AdamW (CUDA only; otherwise a warning and torch's AdamW)")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention (CUDA only; otherwise a warning and PyTorch's SDPA, "
                        "which is memory-efficient already)")
    g.add_argument("--mixed_precision", default=None, choices=MIXED_PRECISION,
                   help="no, fp16 or bf16 (default: accelerate's config, else no)")
    g.add_argument("--seed", type=int, default=None, help="seed for noise, data order and sampling")

    g = p.add_argument_group("validation, logging, checkpoints")
    g.add_argument("--validation_prompt", default=None, help="sample this prompt during and after training")
    g.add_argument("--num_validation_images", type=int, default=D.num_validation_images,
                   help=f"images per validation (default {D.num_validation_images})")
    g.add_argument("--validation_epochs", type=int, default=D.validation_epochs,
                   help=f"validate every N epochs (default {D.validation_epochs})")
    g.add_argument("--report_to", default=D.report_to, choices=REPORT_TO,
                   help="log loss, learning rate and images to tensorboard or wandb (default none)")
    g.add_argument("--checkpointing_steps", type=int, default=D.checkpointing_steps,
                   help=f"save OUTPUT_DIR/checkpoint-<step> every N steps (default {D.checkpointing_steps})")
    g.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help="keep only the newest N checkpoints (default: all)")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (newest in OUTPUT_DIR) or a checkpoint-<step> folder")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    train(TrainingConfig(**vars(args)))


if __name__ == "__main__":
    cli.quiet_libraries()
    sys.exit(cli.run(main))
