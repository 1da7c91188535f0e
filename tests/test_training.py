"""DreamBooth LoRA training (klora/training.py, train_dreambooth_lora_sdxl.py) on the tiny SDXL.

The checks recompute what matters independently of the training code: the
denoising loss on fixed (noise, timestep) pairs uses diffusers' own
``encode_prompt`` and the file as ``load_lora_weights`` reads it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from klora import training
from klora.errors import KLoRAError
from klora.training import DreamBoothImages, EpochPlan, TrainingConfig, train

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "train_dreambooth_lora_sdxl.py"
PROMPT = "a sbu dog"
TIME_IDS_64 = [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]  # original size, crop corner, target size


def subprocess_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")


def write_images(folder: Path, sizes) -> Path:
    """Smooth, distinct colour patterns: something a LoRA can learn."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (width, height) in enumerate(sizes):
        y, x = np.mgrid[0:height, 0:width]
        y, x = y / (height - 1), x / (width - 1)
        image = np.stack([np.sin(6 * x + i), np.cos(5 * y - i), x * y], -1) * 0.5 + 0.5
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def square_images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("data") / "square", [(64, 64)] * 4)


@pytest.fixture(scope="module")
def mixed_images(tmp_path_factory) -> Path:
    """Sizes that need resizing and cropping; plus a file that is not an image."""
    sizes = [(80, 64), (64, 96), (64, 64), (72, 72), (128, 96)]
    folder = write_images(tmp_path_factory.mktemp("data") / "mixed", sizes)
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture
def cpu_trainer(monkeypatch):
    """The trainer on the CPU even where there is a GPU, for the tests that resume a run and expect
    the very same LoRA: CUDA's arithmetic is not deterministic from run to run, and Adam's first
    steps turn last-bit differences in near-zero gradients into differences of the learning rate's
    size (seen on an H200). Accelerate keeps the device it chose for the whole process, so its
    state is reset before and after."""
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def config(model, data, output, **overrides) -> TrainingConfig:
    settings = dict(output_dir=str(output), resolution=64, max_train_steps=4, train_batch_size=2,
                    learning_rate=3e-3, rank=4, seed=0, checkpointing_steps=1000)
    settings.update(overrides)
    return TrainingConfig(str(model), str(data), PROMPT, **settings)


# ------------------------------------------------------------ independent reference


def load_pipeline(model):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fixed_pairs(pipe, model, images: Path, repeats: int = 4):
    """Latents of the 64x64 instance images with fixed noise and timesteps, and the conditioning."""
    from diffusers import DDPMScheduler

    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), np.float32) / 127.5 - 1)
                          .permute(2, 0, 1) for p in sorted(images.glob("*.png"))])
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    latents = latents.repeat(repeats, 1, 1, 1)
    generator = torch.Generator().manual_seed(1234)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
    noisy = DDPMScheduler.from_pretrained(model, subfolder="scheduler").add_noise(latents, noise, timesteps)
    n = latents.shape[0]
    cond = dict(encoder_hidden_states=embeds.expand(n, -1, -1),
                added_cond_kwargs={"text_embeds": pooled.expand(n, -1),
                                   "time_ids": torch.tensor([TIME_IDS_64]).expand(n, -1)})
    return noisy, timesteps, noise, cond


def unet_output(unet, pairs):
    noisy, timesteps, _, cond = pairs
    with torch.no_grad():
        return unet(noisy, timesteps, **cond).sample


def loss(unet, pairs) -> float:
    return float(((unet_output(unet, pairs) - pairs[2]) ** 2).mean())


def lora_tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------ training


def test_training_lowers_the_loss_and_leaves_the_base_untouched(tiny_sdxl_dir, square_images, tmp_path):
    from diffusers import UNet2DConditionModel

    result = train(config(tiny_sdxl_dir, square_images, tmp_path / "out", max_train_steps=20,
                          lora_alpha=8, center_crop=True))
    assert result.global_step == 20
    # The trainer ran on the device accelerate chose (a GPU where there is one); the checks run on the CPU.
    trained_unet = result.unet.to("cpu")
    assert result.weights == tmp_path / "out" / "pytorch_lora_weights.safetensors"

    pipe = load_pipeline(tiny_sdxl_dir)
    pairs = fixed_pairs(pipe, tiny_sdxl_dir, square_images)
    base_output = unet_output(pipe.unet, pairs)
    loss_before = loss(pipe.unet, pairs)
    pipe.load_lora_weights(str(tmp_path / "out"))  # the folder, unchanged, as users load it
    loss_after = loss(pipe.unet, pairs)
    assert loss_after < 0.95 * loss_before, (loss_before, loss_after)
    assert (unet_output(pipe.unet, pairs) - base_output).abs().max() > 1e-2

    # alpha / r = 8 / 4 survives the file: the loaded UNet is the trained one.
    loaded = dict(pipe.unet.named_modules())["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert list(loaded.scaling.values()) == [2.0]
    assert torch.allclose(unet_output(pipe.unet, pairs), unet_output(trained_unet, pairs), atol=1e-5)

    # The frozen weights are bit-identical to the pretrained ones.
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet").state_dict()
    trained = {n.replace(".base_layer", ""): p for n, p in trained_unet.state_dict().items() if "lora_" not in n}
    assert trained.keys() == base.keys()
    assert all(torch.equal(trained[n], base[n]) for n in base)

    # Only the paper's attention projections carry a LoRA.
    keys = lora_tensors(result.weights).keys()
    assert {k.split(".lora")[0].rsplit(".", 1)[-1] for k in keys} == {"to_q", "to_k", "to_v", "0"}
    assert all(k.startswith("unet.") and (".to_out.0.lora" in k or ".to_out" not in k) for k in keys)


KILL_AFTER_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    from klora import training
    save = training.save_checkpoint

    def save_then_die(accelerator, output_dir, step, limit):
        path = save(accelerator, output_dir, step, limit)
        if step == {step}:
            os.kill(os.getpid(), signal.SIGKILL)  # as abrupt as a power cut
        return path

    training.save_checkpoint = save_then_die
    import train_dreambooth_lora_sdxl
    train_dreambooth_lora_sdxl.main(sys.argv[1:])
""")


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_same_lora(tiny_sdxl_dir, mixed_images, tmp_path, cpu_trainer):
    # 5 images, batches of 1, 2 per optimiser step: steps of 2, 2, 1 batches per epoch;
    # the kill at step 4 lands inside the second epoch, after its first step.
    settings = dict(max_train_steps=8, train_batch_size=1, gradient_accumulation_steps=2,
                    lr_scheduler="linear", random_flip=True, checkpointing_steps=2, checkpoints_total_limit=2)
    with pytest.warns(UserWarning, match="notes.txt"):
        straight = train(config(tiny_sdxl_dir, mixed_images, tmp_path / "straight", **settings))
    assert sorted(p.name for p in training.list_checkpoints(tmp_path / "straight")) == ["checkpoint-6", "checkpoint-8"]

    killed = tmp_path / "killed"
    flags = [f"--{k}={v}" for k, v in dict(
        pretrained_model_name_or_path=tiny_sdxl_dir, instance_data_dir=mixed_images, instance_prompt=PROMPT,
        output_dir=killed, resolution=64, learning_rate=3e-3, rank=4, seed=0, **settings).items()
        if not isinstance(v, bool)] + ["--random_flip"]
    run = subprocess.run([sys.executable, "-c", KILL_AFTER_CHECKPOINT.replace("{step}", "4"), *flags],
                         env=dict(subprocess_env(), ACCELERATE_USE_CPU="1"), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    assert not (killed / "pytorch_lora_weights.safetensors").exists()
    assert sorted(p.name for p in training.list_checkpoints(killed)) == ["checkpoint-2", "checkpoint-4"]

    at_kill = lora_tensors(killed / "checkpoint-4" / "pytorch_lora_weights.safetensors")

    with pytest.warns(UserWarning, match="notes.txt"):
        resumed = train(config(tiny_sdxl_dir, mixed_images, killed, resume_from_checkpoint="latest", **settings))
    assert resumed.global_step == 8
    expected, got = lora_tensors(straight.weights), lora_tensors(resumed.weights)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    # ... having really trained after the checkpoint, which --checkpoints_total_limit=2 then removed.
    assert sorted(p.name for p in training.list_checkpoints(killed)) == ["checkpoint-6", "checkpoint-8"]
    assert any(not torch.allclose(at_kill[k], got[k]) for k in got)


def test_prior_preservation_and_text_encoder_training(tiny_sdxl_dir, square_images, tmp_path, cpu_trainer):
    class_dir = tmp_path / "class"
    # 4 images in batches of 3: the second batch is a short one (1 instance + 1 class image).
    with pytest.warns(UserWarning, match="no checkpoint in .*; starting a new run"):
        result = train(config(tiny_sdxl_dir, square_images, tmp_path / "out", max_train_steps=2, train_batch_size=3,
                              with_prior_preservation=True, class_data_dir=str(class_dir), class_prompt="a dog",
                              num_class_images=2, train_text_encoder=True, resume_from_checkpoint="latest",
                              checkpointing_steps=1))
    assert next(result.unet.parameters()).device.type == "cpu"  # pinned, whatever the machine has
    assert sorted(p.name for p in class_dir.iterdir()) == ["class-0000.png", "class-0001.png"]
    keys = lora_tensors(result.weights).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}

    # Resuming restores the text encoders' LoRAs too (from a checkpoint path, into another folder).
    resumed = train(config(tiny_sdxl_dir, square_images, tmp_path / "again", max_train_steps=2, train_batch_size=3,
                           with_prior_preservation=True, class_data_dir=str(class_dir), class_prompt="a dog",
                           num_class_images=2, train_text_encoder=True,
                           resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1")))
    expected, got = lora_tensors(result.weights), lora_tensors(resumed.weights)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)

    pipe = load_pipeline(tiny_sdxl_dir)
    with torch.no_grad():
        before = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)[0]
    pipe.load_lora_weights(str(tmp_path / "out"))
    with torch.no_grad():
        after = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)[0]
    assert (after - before).abs().max() > 1e-4  # the text encoders' LoRAs loaded and act


@pytest.mark.slow
def test_command_line_end_to_end(tiny_sdxl_dir, mixed_images, demo_sdxl_loras, tmp_path):
    out = tmp_path / "lora-sdxl-dog"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), f"--pretrained_model_name_or_path={tiny_sdxl_dir}",
         f"--instance_data_dir={mixed_images}", f"--output_dir={out}", f"--instance_prompt={PROMPT}",
         "--rank=8", "--resolution=64", "--train_batch_size=1", "--learning_rate=5e-5", "--report_to=none",
         "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=6",
         f"--validation_prompt={PROMPT} in a bucket", "--validation_epochs=1", "--num_validation_images=1",
         "--seed=0", "--mixed_precision=no", "--enable_xformers_memory_efficient_attention",
         "--gradient_checkpointing", "--use_8bit_adam", "--checkpointing_steps=3", "--random_flip"],
        env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert any("notes.txt" in w for w in warnings)
    if importlib.util.find_spec("xformers") is None or not torch.cuda.is_available():
        assert any("--enable_xformers_memory_efficient_attention ignored" in w for w in warnings)
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        assert any("--use_8bit_adam ignored" in w for w in warnings)
    assert "loss=" in run.stderr and "lr=5.00e-05" in run.stderr  # the progress bar
    assert "Traceback" not in run.stderr

    assert sorted(p.name for p in (out / "validation").iterdir()) == ["epoch-0001-0.png", "final-0.png"]
    assert sorted(p.name for p in training.list_checkpoints(out)) == ["checkpoint-3", "checkpoint-6"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    card = (out / "README.md").read_text()
    assert str(tiny_sdxl_dir) in card and PROMPT in card and "| rank | 8 |" in card
    assert "![final-0](validation/final-0.png)" in card

    # Step 2 of the recipe: inference_sd.py fuses the new LoRA (as content) with a style LoRA.
    import inference_sd
    from klora import cli

    _, style = demo_sdxl_loras
    fused = tmp_path / "fused"
    code = cli.run(inference_sd.main, [f"--pretrained_model_name_or_path={tiny_sdxl_dir}",
                                       f"--lora_name_or_path_content={out}", f"--lora_name_or_path_style={style}",
                                       f"--prompt={PROMPT} in szn style", "--height=64", "--width=64",
                                       "--num_inference_steps=2", f"--output_folder={fused}"])
    assert code == 0
    assert Image.open(fused / "klora-sstar_seed0.png").size == (64, 64)


# ------------------------------------------------------------- bad input


def bad_input_cases(tmp: Path, images: str) -> dict:
    (tmp / "empty").mkdir()
    (tmp / "text_only").mkdir()
    (tmp / "text_only" / "a.txt").write_text("x")
    (tmp / "text_only" / "b.json").write_text("{}")
    return {
        "missing instance folder": ([f"--instance_data_dir={tmp / 'nowhere'}"], "does not exist"),
        "empty instance folder": ([f"--instance_data_dir={tmp / 'empty'}"], "has no images"),
        "no images left": ([f"--instance_data_dir={tmp / 'text_only'}"], "has no images"),
        "resolution": ([f"--instance_data_dir={images}", "--resolution=100"], "multiple of 8"),
        "scheduler": ([f"--instance_data_dir={images}", "--lr_scheduler=cosine_warm"], "unknown --lr_scheduler"),
        "rank": ([f"--instance_data_dir={images}", "--rank=0"], "--rank 0"),
        "resume path": ([f"--instance_data_dir={images}", f"--resume_from_checkpoint={tmp / 'checkpoint-7'}"],
                        "does not exist"),
    }


def base_flags(model, tmp: Path) -> list[str]:
    return [f"--pretrained_model_name_or_path={model}", f"--output_dir={tmp / 'out'}",
            f"--instance_prompt={PROMPT}", "--resolution=64"]


@pytest.fixture(scope="module")
def bad_input_runs(tiny_sdxl_dir, mixed_images, tmp_path_factory) -> dict:
    """Every bad command line, run at the same time: (expected text, returncode, stdout, stderr)."""
    tmp = tmp_path_factory.mktemp("bad")
    running = {name: (expected, subprocess.Popen([sys.executable, str(SCRIPT), *base_flags(tiny_sdxl_dir, tmp), *args],
                                                 env=subprocess_env(), cwd=tmp, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True))
               for name, (args, expected) in bad_input_cases(tmp, str(mixed_images)).items()}
    results = {}
    for name, (expected, process) in running.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = (expected, process.returncode, stdout, stderr)
    return results


def assert_one_error_line(returncode, stderr, expected):
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert returncode == 2, stderr[-2000:]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-2000:]
    assert expected in errors[0]
    assert [line for line in lines if not line.startswith(("error: ", "warning: "))] == [], stderr[-2000:]


@pytest.mark.parametrize("case", ["missing instance folder", "empty instance folder", "no images left", "resolution",
                                  "scheduler", "rank", "resume path"])
def test_bad_input_is_one_line_and_exit_code_2(bad_input_runs, case):
    expected, returncode, stdout, stderr = bad_input_runs[case]
    assert_one_error_line(returncode, stderr, expected)
    assert stdout == ""
    if case == "no images left":
        assert any("a.txt, b.json" in line for line in stderr.splitlines() if line.startswith("warning: "))


@pytest.mark.parametrize("case", ["model", "not a pipeline", "hub id offline", "wandb", "tensorboard"])
def test_more_bad_input_through_the_scripts_main(tiny_sdxl_dir, mixed_images, tmp_path, capsys, case):
    """The script's own error handling (cli.run around main), in this process to save the imports."""
    import train_dreambooth_lora_sdxl as script
    from klora import cli

    args, expected = {
        "model": ([f"--pretrained_model_name_or_path={tmp_path / 'no-model'}"], "no such folder"),
        "not a pipeline": ([f"--pretrained_model_name_or_path={tmp_path}"], "not a diffusers SDXL pipeline folder"),
        "hub id offline": (["--pretrained_model_name_or_path=someone/not-cached-sdxl"], "hub id (offline"),
        "wandb": (["--report_to=wandb"], "pip install wandb"),
        "tensorboard": (["--report_to=tensorboard"], "pip install tensorboard"),
    }[case]
    if case in ("wandb", "tensorboard") and (importlib.util.find_spec(case) or importlib.util.find_spec(case + "X")):
        pytest.skip(f"{case} is installed here")
    code = cli.run(script.main, [*base_flags(tiny_sdxl_dir, tmp_path), f"--instance_data_dir={mixed_images}", *args])
    assert_one_error_line(code, capsys.readouterr().err, expected)


# -------------------------------------------------------------- the pieces


def test_epoch_plan_depends_on_seed_and_epoch_only():
    plan = EpochPlan(6, seed=3, random_flip=True)
    first = list(plan)
    assert list(plan) == first and sorted(k[0] for k in first) == list(range(6))
    plan.set_epoch(1)
    assert list(plan) != first
    plan.set_epoch(0)
    assert list(plan) == first
    assert not any(k[3] for k in EpochPlan(6, seed=3, random_flip=False))


def test_images_are_resized_cropped_and_flipped_with_sdxl_micro_conditioning(tmp_path):
    folder = write_images(tmp_path / "img", [(128, 64)])  # wide: resized to 128 x 64, then a 64-wide crop
    data = DreamBoothImages([folder / "0.png"], resolution=32, center_crop=False)
    item = data[(0, 0.0, 1.0, False)]["instance"]
    assert item["pixels"].shape == (3, 32, 32) and item["pixels"].dtype == np.float32
    assert -1.0 <= item["pixels"].min() and item["pixels"].max() <= 1.0
    assert item["time_ids"] == (64, 128, 0, 32, 32, 32)  # original (h, w), crop (top, left), target
    flipped = data[(0, 0.0, 1.0, True)]["instance"]
    np.testing.assert_array_equal(flipped["pixels"], item["pixels"][:, :, ::-1])
    assert flipped["time_ids"] == (64, 128, 0, 0, 32, 32)  # the mirrored corner
    centred = DreamBoothImages([folder / "0.png"], resolution=32, center_crop=True)[(0, 0.0, 1.0, False)]
    assert centred["instance"]["time_ids"] == (64, 128, 0, 16, 32, 32)


def test_scheduler_names_are_diffusers_own():
    from diffusers.optimization import SchedulerType

    assert set(training.LR_SCHEDULERS) <= {s.value for s in SchedulerType}


def test_final_save_is_atomic(tiny_sdxl_dir, tmp_path, monkeypatch):
    """A failure while writing leaves the previous file intact and no temporary file behind."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=training.UNET_TARGETS))
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"previous")

    def fail_half_way(save_directory, weight_name, **kwargs):
        (Path(save_directory) / weight_name).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(StableDiffusionXLPipeline, "save_lora_weights", fail_half_way)
    with pytest.raises(OSError):
        training.save_lora(tmp_path, unet)
    assert (tmp_path / "pytorch_lora_weights.safetensors").read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["pytorch_lora_weights.safetensors"]


def test_checks_in_process(tmp_path, square_images):
    with pytest.raises(KLoRAError, match="expected a folder named checkpoint-<step>"):
        (tmp_path / "step-3").mkdir()
        training.check_config(config("model", square_images, tmp_path, resume_from_checkpoint=str(tmp_path / "step-3")))
    with pytest.raises(KLoRAError, match="needs --class_data_dir and --class_prompt"):
        training.check_config(config("model", square_images, tmp_path, with_prior_preservation=True))
    assert training.resolve_checkpoint(str(tmp_path), "latest") is None
    for name in ("checkpoint-12", "checkpoint-3", ".checkpoint-20.partial"):
        (tmp_path / name).mkdir()
    assert training.resolve_checkpoint(str(tmp_path), "latest") == tmp_path / "checkpoint-12"
    assert training.resolve_checkpoint(str(tmp_path), "checkpoint-3") == tmp_path / "checkpoint-3"  # in OUTPUT_DIR
