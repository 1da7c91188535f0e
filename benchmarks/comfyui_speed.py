"""What the K-LoRA node costs in a ComfyUI KSampler run, next to the base model and ComfyUI's own LoRA loader.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfyui_speed.py              # SDXL-shaped UNet, 1/10 width, 256 px
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfyui_speed.py --full_size  # the real 2.6B SDXL UNet, 1024 px

In-process, on the CPU: the UNet is ComfyUI's own SDXL class (``comfy.supported_models.SDXL``: 70
transformer blocks, 560 attention linears), with every width scaled down by ``--width_scale`` (1/10:
ComfyUI's GroupNorm wants channels in multiples of 32, so 32/64/128 channels, heads of 8) and random
weights. A run is what ``KSampler`` does: ``comfy.sample.sample`` with euler / normal, ``--steps``
steps, classifier-free guidance (cond and uncond in one batch), conditioning tensors made directly.

Two random rank-8 LoRA files on every attention linear (ComfyUI's names, alpha = rank), tilted in
opposite directions through the network (as ``benchmarks/speed.py`` makes them) so that each wins
in some layers and K-LoRA's choice changes during a run. Rows, each printed as soon as it is
measured:

- the base model;
- one LoRA: ComfyUI's ``LoraLoaderModelOnly`` (the LoRA is merged into the weights when the model loads);
- the K-LoRA node (``KLoRALoader``, pattern s*, progress steps): the chosen LoRA's delta is in the
  weights, and a layer whose choice changes is recomputed from ComfyUI's backup before the step;
- for reference, both LoRAs chained with two ``LoraLoaderModelOnly`` (the direct merge).

Each row runs on its own copy of the model (as one workflow in ComfyUI: the model stays loaded and
patched between runs). Every timed run follows one run of an untouched twin of the base model, and
a row's ratio is the median of those pairs, so a busy machine slows both alike. Then: how many layers
K-LoRA re-patched per run (from its selection log) and the time those re-patches took (less
affected by a busy machine than the rows), K-LoRA timed in turn with the one-LoRA run (in alternating
order), and what one full re-patch of all its layers costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def log(text: str = "") -> None:
    print(text, flush=True)


def import_comfyui(path: str):
    """ComfyUI from the checkout at ``path``, on the CPU (set before ``comfy.model_management`` loads)."""
    sys.path.insert(0, str(Path(path).resolve()))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.sample  # noqa: F401
    import comfy.supported_models  # noqa: F401

    return comfy


def _round(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def sdxl_config(scale: float) -> dict:
    """SDXL's UNet config (as ComfyUI detects it from the real file) with widths times ``scale``."""
    pooled = _round(1280 * scale, 8)
    return dict(
        in_channels=4, out_channels=4, model_channels=_round(320 * scale, 32), num_res_blocks=[2, 2, 2],
        channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10, num_heads=-1,
        num_head_channels=_round(64 * scale, 8), context_dim=_round(2048 * scale, 8),
        use_linear_in_transformer=True, use_temporal_attention=False, use_temporal_resblock=False,
        adm_in_channels=pooled + 6 * 256, num_classes="sequential", image_size=32, use_spatial_transformer=True,
        legacy=False)


def build(comfy, config: dict, seed: int = 0):
    """A ``ModelPatcher`` of ComfyUI's SDXL class with seeded weights (ComfyUI skips initialisation)."""
    model_config = comfy.supported_models.SDXL(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.diffusion_model.named_parameters():
            if parameter.dim() >= 2:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                parameter.fill_(1.0)
            else:
                parameter.zero_()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def attention_keys(patcher) -> list[str]:
    return [key for key in patcher.model.state_dict()
            if key.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"))
            and key.startswith("diffusion_model.")]


def write_loras(patcher, folder: Path, rank: int) -> tuple[str, str]:
    """Content and style LoRA files (ComfyUI's names, alpha = rank) on every attention linear, their
    magnitudes tilted in opposite directions through the network so that each wins in some layers."""
    from safetensors.torch import save_file

    state = patcher.model.state_dict()
    keys = attention_keys(patcher)
    generator = torch.Generator().manual_seed(0)
    names = []
    for role, tilt in (("content", 1.0), ("style", -1.0)):
        tensors = {}
        for i, key in enumerate(keys):
            out_features, in_features = state[key].shape
            strength = 0.05 * (1.0 + 0.8 * tilt * (i / max(1, len(keys) - 1) - 0.5))
            module = key.removesuffix(".weight")
            tensors[f"{module}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * strength
            tensors[f"{module}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * strength
            tensors[f"{module}.alpha"] = torch.tensor(float(rank))
        name = f"{role}.safetensors"
        save_file(tensors, str(folder / name))
        names.append(name)
    return names[0], names[1]


class Runs:
    """KSampler runs of one size, timed in pairs with an untouched twin; prints one row per method."""

    def __init__(self, comfy, config: dict, args, twin):
        self.comfy, self.args, self.twin = comfy, args, twin
        generator = torch.Generator().manual_seed(1)
        context, pooled = config["context_dim"], config["adm_in_channels"] - 6 * 256
        size = {"width": args.size, "height": args.size}
        self.positive = [[torch.randn(1, 77, context, generator=generator),
                          {"pooled_output": torch.randn(1, pooled, generator=generator), **size}]]
        self.negative = [[torch.randn(1, 77, context, generator=generator),
                          {"pooled_output": torch.randn(1, pooled, generator=generator), **size}]]
        self.latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
        self.ratios = {}
        self.run(twin, seed=0)  # its first run loads it

    def run(self, patcher, seed: int) -> float:
        noise = self.comfy.sample.prepare_noise(self.latent, seed)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.comfy.sample.sample(patcher, noise, self.args.steps, 5.0, "euler", "normal", self.positive,
                                           self.negative, self.latent, denoise=1.0, disable_pbar=True, seed=seed)
        seconds = time.perf_counter() - start
        if not torch.isfinite(out).all():
            log("  (warning: the latent is not finite)")
        return seconds

    def row(self, name: str, patcher, note: str = "") -> float:
        first = self.run(patcher, seed=0)  # loads and patches the model, as a workflow's first run
        times, ratios = [], []
        for r in range(self.args.rounds):
            base = self.run(self.twin, seed=1 + r)
            times.append(self.run(patcher, seed=1 + r))
            ratios.append(times[-1] / base)
        seconds, ratio = statistics.median(times), statistics.median(ratios)
        self.ratios[name] = ratio
        note = f"{note}; first run {first:.2f} s (loads and patches)".lstrip("; ")
        log(f"| {name} | {seconds:.3f} | {ratio:.3f}x | {note} |")
        return ratio


    def versus(self, patcher, reference, rounds: int) -> tuple[float, float]:
        """(median of patcher / reference over runs taken in turn, mean seconds per run of ``patcher``).

        The order alternates (reference first in even rounds, ``patcher`` first in odd ones): on this CPU the
        second run of a pair tends to be the slower, which would otherwise count against one side."""
        ratios, times = [], []
        for r in range(rounds):
            if r % 2:
                seconds = self.run(patcher, seed=100 + r)
                base = self.run(reference, seed=100 + r)
            else:
                base = self.run(reference, seed=100 + r)
                seconds = self.run(patcher, seed=100 + r)
            times.append(seconds)
            ratios.append(seconds / base)
        return statistics.median(ratios), statistics.mean(times)


class RepatchClock:
    """Seconds spent in K-LoRA's re-patches (``klora.comfyui._repatch``, which a switch calls) while on."""

    def __init__(self):
        from klora import comfyui as kc

        self.module, self.original, self.seconds = kc, kc._repatch, 0.0

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        kc._repatch = timed

    def close(self):
        self.module._repatch = self.original


def repatched_layers(klora) -> int:
    """Layers K-LoRA recomputed in its last run: choices that changed from the run before's last step."""
    generations = klora.selection_log()["generations"]
    before = generations[-2]["steps"][-1]["choices"] if len(generations) > 1 else None
    count = 0
    for step in generations[-1]["steps"]:
        if before is not None:
            count += sum(1 for key, role in step["choices"].items() if before[key] != role)
        before = step["choices"]
    return count


def full_repatch_seconds(klora, patcher, repeats: int = 5) -> float:
    """One re-patch of every K-LoRA layer from ComfyUI's backup, as a switch does it (``klora.comfyui._repatch``)."""
    from klora import comfyui as kc

    keys = [key for unit in klora.units for key in unit.keys]
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            kc._repatch(patcher, keys)  # the clone K-LoRA made: its patches, ComfyUI's shared backup
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"),
                        help="the ComfyUI checkout (default: $COMFYUI_PATH)")
    parser.add_argument("--full_size", action="store_true", help="the real SDXL UNet widths and 1024 px")
    parser.add_argument("--width_scale", type=float, default=None, help="widths times this (default 0.1; 1 with "
                        "--full_size); channels are rounded to multiples of 32")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 256; 1024 with "
                        "--full_size)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per row (median)")
    parser.add_argument("--rank", type=int, default=8)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.comfyui:
        raise SystemExit("set COMFYUI_PATH (or --comfyui) to a ComfyUI checkout (0.3.64 tested)")
    args.width_scale = args.width_scale or (1.0 if args.full_size else 0.1)
    args.size = args.size or (1024 if args.full_size else 256)
    comfy = import_comfyui(args.comfyui)
    import folder_paths
    import nodes

    from klora import comfyui as kc
    from klora.comfyui_nodes import KLoRALoader

    config = sdxl_config(args.width_scale)
    start = time.perf_counter()
    models = {name: build(comfy, config) for name in ("twin", "base", "one", "klora", "merge")}
    twin = models["twin"]
    parameters = sum(p.numel() for p in twin.model.diffusion_model.parameters())
    temporary = tempfile.TemporaryDirectory(prefix="klora-comfyui-speed-")  # the LoRA files, removed at exit
    folder = Path(temporary.name)
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    content, style = write_loras(twin, folder, args.rank)
    log(f"ComfyUI SDXL UNet (comfy.supported_models.SDXL, widths x {args.width_scale:g}: "
        f"{config['model_channels']} channels, heads of {config['num_head_channels']}; {parameters / 1e9:.3f}B "
        f"parameters, {len(attention_keys(twin))} attention linears with LoRAs), {args.size}x{args.size}, "
        f"{args.steps} steps euler/normal, CFG (cond + uncond in one batch), rank {args.rank}, fp32, CPU, "
        f"{torch.get_num_threads()} threads; median of {args.rounds} runs after a first one, each next to a run of "
        f"an untouched twin; built in {time.perf_counter() - start:.1f} s")
    log()
    log("| method | seconds per run | x base model (paired) | note |")
    log("|---|---|---|---|")

    runs = Runs(comfy, config, args, twin)
    runs.row("base model", models["base"], "its own copy, as a check of the pairing")
    (one,) = nodes.LoraLoaderModelOnly().load_lora_model_only(models["one"], content, 1.0)
    runs.row("one LoRA (LoraLoaderModelOnly)", one)
    (klora_model,) = KLoRALoader().load(models["klora"], content, style, "s*", 1.5, -1.0, "klora", "steps", "")
    clock = RepatchClock()
    runs.row("K-LoRA node (klora, s*, steps)", klora_model)
    repatch_seconds = clock.seconds / (1 + args.rounds)
    clock.close()
    klora = kc.attached(klora_model)
    repatched, layers = repatched_layers(klora), len(klora.paths)
    full_pass = full_repatch_seconds(klora, klora_model)
    (merged,) = nodes.LoraLoaderModelOnly().load_lora_model_only(models["merge"], content, 1.0)
    (merged,) = nodes.LoraLoaderModelOnly().load_lora_model_only(merged, style, 1.0)
    runs.row("both LoRAs chained (two LoraLoaderModelOnly, direct merge)", merged)
    direct, klora_seconds = runs.versus(klora_model, one, args.rounds)

    ratios = runs.ratios
    log()
    log(f"- K-LoRA node / one LoRA: {ratios['K-LoRA node (klora, s*, steps)'] / ratios['one LoRA (LoraLoaderModelOnly)']:.3f}x"
        f" from the rows; {direct:.3f}x timed in turn with each other ({args.rounds} pairs); issue 16's target: "
        f"<= 1.02x")
    log(f"- K-LoRA re-patched {repatched} layers per run ({repatched / max(1, layers):.2f} passes over its "
        f"{layers} layers; {repatched / max(1, args.steps):.1f} per step), which took {repatch_seconds:.3f} s per run "
        f"({repatch_seconds / klora_seconds * 100:.1f}% of its run); one full re-patch of all {layers} from "
        f"ComfyUI's backup: {full_pass * 1000:.1f} ms")


if __name__ == "__main__":
    main()
