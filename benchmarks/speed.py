"""What K-LoRA costs per image, next to the base model and the usual ways of applying LoRAs.

    python benchmarks/speed.py                          # SDXL-shaped UNet at 1/8 width, CPU, 256 px
    python benchmarks/speed.py --family dit             # FLUX-shaped transformer (DiT), scaled
    python benchmarks/speed.py --family wan             # Wan 2.1-shaped video transformer, scaled
    python benchmarks/speed.py --device cuda --dtype fp16 --full_size --height 1024 --width 1024 \\
        --steps 20 --compile                            # the real 2.6B SDXL UNet on a GPU

The model is built with random weights directly on the target device, in the target
dtype; two random LoRAs (rank 8) go on its attention projections (SDXL: the 560
q/k/v/out linears of its 70 transformer blocks). No text encoder or VAE: a real
scheduler drives the denoiser for ``--steps`` calls (classifier-free guidance as one
batch of 2; FLUX is guidance-distilled, batch 1), so K-LoRA switches layers exactly as
it does in a generation (its progress comes from that scheduler, as in a pipeline).

Rows, each printed as soon as it is measured (median of ``--rounds`` images after one
warm-up image): the base model; one unfused LoRA (a PEFT adapter); for SDXL both LoRAs
merged into the weights ("direct merge, fused"); K-LoRA with fused switching; NP-LoRA,
EST-LoRA and LoRA Switch (fused); K-LoRA with adapter switching; a LoRA stack: two unfused PEFT adapters, and K-LoRA fused with
a third LoRA always on (held in the copy its switches rewrite from); for SDXL the
original implementation's per-call recompute
(dense B @ A and top-K in every layer on every call, a Python comparison, the chosen
delta as a second full-rank matmul: re-implemented here only to be timed; with
``--full_size`` on fewer steps, scaled, as its row says); with ``--compile`` base +
compile and K-LoRA fused + compile. On the CPU every timed image follows one image of
an untouched twin of the base model and the ratio is the median of those pairs
(``--paired``), so a busy machine slows both alike; on a GPU the ratio is to the first
row and a last "base model, again" row shows the drift. Then: the attach time (two LoRAs
+ statistics), the weight copy fused switching keeps, and one full switch pass (every
shared layer rewritten from its copy, synchronized), with how many passes K-LoRA made
in its last image.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from klora import rule  # noqa: E402
from klora.fusion import KLoRA  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def log(text: str = "") -> None:
    print(text, flush=True)


def _round8(value: float) -> int:
    return max(8, int(round(value / 8)) * 8)


# --- the three model shapes ------------------------------------------------------


def sdxl_unet(scale: float):
    """SDXL's UNet layout (70 transformer blocks, 560 attention linears); widths times ``scale``."""
    from diffusers import UNet2DConditionModel

    channels = tuple(_round8(c * scale) for c in (320, 640, 1280))
    pooled, time_dim = _round8(1280 * scale), _round8(256 * scale)
    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=_round8(2048 * scale), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=pooled + 6 * time_dim,
        norm_num_groups=32 if scale == 1 else 8)


def flux_transformer(scale: float, blocks: float):
    """FLUX.1's layout (19 double, 38 single blocks, head 128); heads times ``scale``."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=max(1, round(19 * blocks)),
        num_single_layers=max(1, round(38 * blocks)), attention_head_dim=128,
        num_attention_heads=max(1, round(24 * scale)), joint_attention_dim=_round8(4096 * scale),
        pooled_projection_dim=_round8(768 * scale), guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def wan_transformer(scale: float, blocks: float):
    """Wan 2.1 T2V 14B's layout (40 blocks, 40 heads of 128, FFN 13824); heads times ``scale``."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=max(1, round(40 * scale)), attention_head_dim=128,
        in_channels=16, out_channels=16, text_dim=_round8(4096 * scale), freq_dim=256,
        ffn_dim=_round8(13824 * scale), num_layers=max(1, round(40 * blocks)), cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6)


@contextmanager
def default_dtype(dtype):
    """Build in the target dtype: a 12B model never exists in float32 on the card."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(args):
    """(denoiser, LoRA file prefix, a denoise(steps, seed) function, a one-line description)."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype), torch.no_grad():
        if args.family == "sdxl":
            model = sdxl_unet(args.width_scale)
        elif args.family == "dit":
            model = flux_transformer(args.width_scale, args.block_fraction)
        else:
            model = wan_transformer(args.width_scale, args.block_fraction)
    model = model.to(device, dtype).eval().requires_grad_(False)
    run = {"sdxl": sdxl_loop, "dit": flux_loop, "wan": wan_loop}[args.family](model, args, device, dtype)
    prefix = "unet" if args.family == "sdxl" else "transformer"
    return model, prefix, run


def _noise(shape, seed, device, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def sdxl_loop(model, args, device, dtype):
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    c = model.config
    text = _noise((2, 77, c.cross_attention_dim), 1, device, dtype)
    pooled = _noise((2, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim), 2, device, dtype)
    time_ids = torch.tensor([[args.height, args.width, 0, 0, args.height, args.width]] * 2, device=device, dtype=dtype)
    shape = (1, 4, args.height // 8, args.width // 8)

    def denoise(unet, steps, seed=0, each_step=None):
        scheduler.set_timesteps(steps, device=device)
        latents = _noise(shape, seed, device, dtype) * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            if each_step:
                each_step(i, steps)
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise = unet(model_input, t, encoder_hidden_states=text,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            uncond, cond = noise.chunk(2)
            latents = scheduler.step(uncond + 5.0 * (cond - uncond), t, latents).prev_sample
        return latents

    denoise.scheduler = scheduler
    return denoise


def flux_loop(model, args, device, dtype):
    """FLUX.1-dev style: guidance distilled (one batch of 1), 512 text tokens at full size."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    c = model.config
    h, w = args.height // 16, args.width // 16  # 8x VAE, then 2x2 patches
    text_len = 512 if args.full_size else 64
    text = _noise((1, text_len, c.joint_attention_dim), 1, device, dtype)
    pooled = _noise((1, c.pooled_projection_dim), 2, device, dtype)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device, dtype)
    txt_ids = torch.zeros(text_len, 3, device=device, dtype=dtype)
    guidance = torch.full((1,), 3.5, device=device, dtype=torch.float32)

    def denoise(transformer, steps, seed=0, each_step=None):
        scheduler.set_timesteps(steps, device=device)
        latents = _noise((1, h * w, c.in_channels), seed, device, dtype)
        for i, t in enumerate(scheduler.timesteps):
            if each_step:
                each_step(i, steps)
            velocity = transformer(latents, encoder_hidden_states=text, pooled_projections=pooled,
                                   timestep=(t / 1000).expand(1).to(dtype), img_ids=img_ids, txt_ids=txt_ids,
                                   guidance=guidance).sample
            latents = scheduler.step(velocity, t, latents).prev_sample
        return latents

    denoise.scheduler = scheduler
    return denoise


def wan_loop(model, args, device, dtype):
    """Wan 2.1 T2V: a short clip, classifier-free guidance as one batch of 2."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    c = model.config
    frames = (args.frames - 1) // 4 + 1
    text = _noise((2, 512 if args.full_size else 64, c.text_dim), 1, device, dtype)
    shape = (1, c.in_channels, frames, args.height // 8, args.width // 8)

    def denoise(transformer, steps, seed=0, each_step=None):
        scheduler.set_timesteps(steps, device=device)
        latents = _noise(shape, seed, device, dtype)
        for i, t in enumerate(scheduler.timesteps):
            if each_step:
                each_step(i, steps)
            velocity = transformer(torch.cat([latents] * 2), timestep=t.expand(2), encoder_hidden_states=text).sample
            uncond, cond = velocity.chunk(2)
            latents = scheduler.step(uncond + 5.0 * (cond - uncond), t, latents).prev_sample
        return latents

    denoise.scheduler = scheduler
    return denoise


class Driver:
    """What K-LoRA sees of a pipeline here: the denoiser and the scheduler the loop steps. As with a
    real pipeline, progress then comes from the scheduler's step index, with no read of the timestep
    off the GPU per step (a bare denoiser must read it: one device sync per call)."""

    def __init__(self, component: str, model, scheduler):
        setattr(self, component, model)
        self.scheduler = scheduler


# --- LoRAs ---------------------------------------------------------------------------


def adapted_paths(model) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.endswith(tuple("." + p for p in PROJECTIONS))]


def random_loras(model, prefix: str, rank: int) -> tuple[dict, dict, dict]:
    """Three rank-``rank`` LoRAs (diffusers naming, alpha = rank) as host state dicts, as if read
    from files: content and style with magnitudes tilted in opposite directions through the
    network, so that each LoRA wins in some layers and K-LoRA switches layers during a
    generation, and an untilted third one, the extra (always-on) LoRA of the stack rows."""
    modules = dict(model.named_modules())
    paths = adapted_paths(model)
    generator = torch.Generator().manual_seed(0)
    loras = []
    for tilt in (1.0, -1.0, 0.0):
        tensors = {}
        for i, path in enumerate(paths):
            linear = modules[path]
            strength = 0.05 * (1.0 + 0.8 * tilt * (i / max(1, len(paths) - 1) - 0.5))
            tensors[f"{prefix}.{path}.lora_A.weight"] = torch.randn(rank, linear.in_features,
                                                                   generator=generator) * strength
            tensors[f"{prefix}.{path}.lora_B.weight"] = torch.randn(linear.out_features, rank,
                                                                   generator=generator) * strength
        loras.append(tensors)
    return loras[0], loras[1], loras[2]


class RecomputeEveryCall(torch.nn.Module):
    """The original implementation's layer, for timing only: on every call it rebuilds both
    dense ``B @ A``, sums their top-K magnitudes, compares them in Python (a device-to-host
    sync per layer and call) and applies the chosen dense delta as a second full-rank matmul."""

    def __init__(self, base, content, style, gamma, clock):
        super().__init__()
        self.base, self.content, self.style, self.gamma, self.clock = base, content, style, gamma, clock

    def forward(self, x):
        (content_a, content_b), (style_a, style_b) = self.content, self.style
        content_delta, style_delta = content_b @ content_a, style_b @ style_a
        k = content_a.shape[0] * style_a.shape[0]
        content_sum = content_delta.abs().flatten().topk(k).values.float().sum()
        style_sum = style_delta.abs().flatten().topk(k).values.float().sum()
        use_content = bool(content_sum / self.gamma > style_sum * self.clock["scale"])
        return self.base(x) + torch.nn.functional.linear(x, content_delta if use_content else style_delta)


def swap_in_recompute(model, content: dict, style: dict, prefix: str, gamma: float, clock: dict) -> list:
    modules = dict(model.named_modules())
    swapped = []
    for path in adapted_paths(model):
        linear = modules[path]
        factors = [tuple(lora[f"{prefix}.{path}.lora_{ab}.weight"].to(linear.weight.device, linear.weight.dtype)
                         for ab in "AB") for lora in (content, style)]
        parent, _, child = path.rpartition(".")
        setattr(modules[parent], child, RecomputeEveryCall(linear, factors[0], factors[1], gamma, clock))
        swapped.append((modules[parent], child, linear))
    return swapped


def swap_back(swapped) -> None:
    for parent, child, linear in swapped:
        setattr(parent, child, linear)


# --- timing --------------------------------------------------------------------------


class Bench:
    """Times images and prints one table row per method as soon as it is measured.

    With a twin (an untouched copy of the base model, ``--paired``), every timed image of a
    method follows one image of the twin, and the ratio is the median of those pairs: a
    busy machine slows both alike. Without one (the GPU default: it would double the
    weights), the ratio is to the first base row, and a second base row at the end shows
    how much the machine drifted."""

    def __init__(self, args, run, twin):
        self.args, self.run, self.twin = args, run, twin
        self.cuda = args.device.startswith("cuda")
        self.base_seconds = None
        self.twin_bytes = 0 if twin is None else sum(p.numel() * p.element_size() for p in twin.parameters())
        if twin is not None:
            with torch.no_grad():
                run(twin, args.steps, seed=0)  # its first image, which is slower, is not a reference

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, call) -> float:
        self.sync()
        start = time.perf_counter()
        call()
        self.sync()
        return time.perf_counter() - start

    def row(self, name: str, model, steps=None, rounds=None, note="", each_step=None) -> float:
        """One warm-up image, then ``rounds`` timed images of ``steps`` denoiser calls."""
        args = self.args
        steps, rounds = steps or args.steps, rounds or args.rounds
        times, ratios, peak = [], [], 0
        with torch.no_grad():
            warm = self.seconds(lambda: self.run(model, steps, seed=0, each_step=each_step))
            for r in range(rounds):
                if self.twin is not None:
                    base = self.seconds(lambda: self.run(self.twin, steps, seed=1 + r))
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats()
                times.append(self.seconds(lambda: self.run(model, steps, seed=1 + r, each_step=each_step)))
                if self.cuda:
                    peak = max(peak, torch.cuda.max_memory_allocated() - self.twin_bytes)
                if self.twin is not None:
                    ratios.append(times[-1] / base)
        per_image = statistics.median(times) * args.steps / steps  # scaled to --steps
        if self.base_seconds is None:
            self.base_seconds = per_image
        ratio = statistics.median(ratios) if ratios else per_image / self.base_seconds
        if steps != args.steps or rounds != args.rounds:
            note = f"{note}; {steps} steps x {rounds} image(s), time scaled to {args.steps} steps".lstrip("; ")
        if warm > 1.5 * per_image * steps / args.steps + 0.5:
            note = f"{note}; first image {warm:.1f} s".lstrip("; ")
        memory = f"{peak / 2**30:.2f}" if self.cuda else "-"
        log(f"| {name} | {per_image:.3f} | {ratio:.3f}x | {memory} | {note} |")
        return per_image


def layer_switches(klora) -> int:
    """Layer writes K-LoRA's choice made in its last generation (from the selection log)."""
    generations = klora.selection_log()["generations"]
    if len(generations) < 2:
        return 0
    before = generations[-2]["steps"][-1]["choices"]
    count = 0
    for entry in generations[-1]["steps"]:
        count += sum(1 for key, role in entry["choices"].items() if before[key] != role)
        before = entry["choices"]
    return count


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["sdxl", "dit", "wan"], default="sdxl",
                        help="sdxl: SDXL UNet; dit: FLUX.1 transformer; wan: Wan 2.1 T2V 14B transformer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default: fp32 on the CPU; on a GPU fp16 (sdxl) or bf16 (dit, wan)")
    parser.add_argument("--full_size", action="store_true", help="real widths and sizes (a GPU)")
    parser.add_argument("--width_scale", type=float, default=None,
                        help="widths (sdxl) or head counts (dit, wan) times this; default 1/8, 1 with --full_size")
    parser.add_argument("--block_fraction", type=float, default=None,
                        help="dit, wan: keep this fraction of the blocks (default 1; 1/4 on the CPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoiser calls per image (default 10; 20 for sdxl on a GPU)")
    parser.add_argument("--rounds", type=int, default=None, help="timed images per row, median (default 3; "
                        "2 for dit, wan on a GPU)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--frames", type=int, default=5, help="wan: video frames")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--paired", action=argparse.BooleanOptionalAction, default=None,
                        help="time every image next to one of an untouched twin of the base model "
                             "(default on the CPU; doubles the weights)")
    parser.add_argument("--recompute_steps", type=int, default=None,
                        help="steps (and one image) for the original-style recompute row with --full_size "
                             "(default 5)")
    parser.add_argument("--skip_recompute", action="store_true", help="leave out the original-style recompute row")
    parser.add_argument("--compile", action="store_true", help="add base + compile and K-LoRA fused + compile")
    parser.add_argument("--compile_mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    return parser


def resolve_defaults(args):
    gpu = not args.device.startswith("cpu")
    if args.dtype is None:
        args.dtype = "fp32" if not gpu else ("fp16" if args.family == "sdxl" else "bf16")
    if args.width_scale is None:
        args.width_scale = 1.0 if args.full_size else 0.125
    if args.block_fraction is None:
        args.block_fraction = 1.0 if gpu or args.full_size else 0.25
    if args.steps is None:
        args.steps = 10 if not gpu else (20 if args.family == "sdxl" else 10)
    if args.rounds is None:
        args.rounds = 2 if gpu and args.family != "sdxl" else 3
    size = {"sdxl": (1024, 256), "dit": (1024, 256), "wan": (480, 128)}[args.family]
    args.height = args.height or (size[0] if args.full_size else size[1])
    args.width = args.width or (args.height if args.family != "wan" else (832 if args.full_size else 128))
    if args.paired is None:
        args.paired = not gpu
    return args


def main(argv=None):
    args = resolve_defaults(build_parser().parse_args(argv))
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    start = time.perf_counter()
    model, prefix, run = build(args)
    driver = Driver(prefix, model, run.scheduler)  # K-LoRA attaches to this, as to a pipeline
    twin = copy.deepcopy(model) if args.paired else None
    bench = Bench(args, run, twin)
    bench.sync()
    parameters = sum(p.numel() for p in model.parameters())
    shape = f"{args.frames} frames {args.height}x{args.width}" if args.family == "wan" else f"{args.height}x{args.width}"
    name = {"sdxl": "SDXL UNet", "dit": "FLUX.1-shaped transformer", "wan": "Wan 2.1 14B-shaped transformer"}
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    size = "full size" if args.width_scale == 1 else f"widths x {args.width_scale:g}"
    if args.family != "sdxl" and args.block_fraction != 1:
        size += f", {args.block_fraction:g} of the blocks"
    log(f"{name[args.family]} ({size}, {parameters / 1e9:.2f}B parameters, {len(adapted_paths(model))} "
        f"attention linears with LoRAs), {shape}, {args.steps} steps"
        f"{' (CFG batch 2)' if args.family != 'dit' else ''}, rank {args.rank}, {args.dtype}, {where}; "
        f"median of {args.rounds} images after a warm-up"
        f"{', each next to an image of an untouched twin' if args.paired else ''}; "
        f"built in {time.perf_counter() - start:.1f} s")
    content, style, extra = random_loras(model, prefix, args.rank)
    log()
    log("| method | seconds per image | x base | peak GPU GiB | note |")
    log("|---|---|---|---|---|")

    bench.row("base model", model, note="its twin, as a check of the pairing" if args.paired else "")

    with torch.no_grad():
        model.load_lora_adapter(dict(content), adapter_name="one", prefix=prefix)
    bench.row("one LoRA, unfused (PEFT adapter)", model)
    model.unload_lora()

    if args.family == "sdxl":
        merged = KLoRA(driver, content, style, method="merge")
        bench.row("direct merge, fused into the weights", model)
        merged.detach()

    bench.sync()
    started = time.perf_counter()
    klora = KLoRA(driver, content, style)
    bench.sync()
    attach_seconds = time.perf_counter() - started
    bench.row("K-LoRA, fused switching", model)
    switches, shared, copies, gamma = layer_switches(klora), len(klora.paths), klora.memory(), klora.gamma
    switch_pass = measure_switch_pass(bench, klora)
    klora.detach()

    # The other training-free rules (klora.methods), on the same two LoRAs.
    for label, options in (("NP-LoRA (mu 0.5), one static merge fused into the weights", {"method": "np"}),
                           ("EST-LoRA, fused switching", {"method": "est"}),
                           ("LoRA Switch (every 5 steps), fused switching", {"method": "switch"})):
        other = KLoRA(driver, content, style, **options)
        bench.row(label, model)
        other.detach()

    adapters = KLoRA(driver, content, style, switching="adapters")
    bench.row("K-LoRA, adapter switching (PEFT set_adapter)", model)
    adapters.detach()

    # A LoRA stack: K-LoRA plus an always-on extra LoRA (a speed LoRA), next to the same two LoRAs unfused.
    with torch.no_grad():
        model.load_lora_adapter(dict(content), adapter_name="one", prefix=prefix)
        model.load_lora_adapter(dict(extra), adapter_name="two", prefix=prefix)
    model.set_adapters(["one", "two"])
    bench.row("two LoRAs, unfused (PEFT adapters)", model)
    model.unload_lora()
    stacked = KLoRA(driver, content, style, extra_loras=[extra])
    bench.row("K-LoRA fused + an extra LoRA (always on)", model)
    stacked.detach()

    if args.family == "sdxl" and not args.skip_recompute:
        clock = {"scale": 1.0}

        def tick(step, steps):
            clock["scale"] = rule.scale_at(step / steps, "s*", rule.DEFAULT_ALPHA, rule.default_beta("s*"))

        swapped = swap_in_recompute(model, content, style, prefix, gamma, clock)
        steps = (args.recompute_steps or min(5, args.steps)) if args.full_size else None
        bench.row("original-style recompute (every layer, every call)", model, steps=steps,
                  rounds=1 if args.full_size else None, each_step=tick)
        swap_back(swapped)

    if not args.paired:
        bench.row("base model, again", model, note="how far the machine drifted since the first row")

    if args.compile:
        from torch._dynamo.utils import counters

        options = {} if args.compile_mode is None else {"mode": args.compile_mode}
        model.compile_repeated_blocks(**options)
        if twin is not None:
            twin.compile_repeated_blocks(**options)
        bench.base_seconds = None
        bench.row("base + compile (repeated blocks)", model, note="ratios from here on: to this row"
                  if not args.paired else "inductor; the twin compiled too")
        graphs = counters["stats"]["unique_graphs"]
        compiled = KLoRA(driver, content, style, compile=options)
        bench.row("K-LoRA fused + compile", model, note=f"graphs compiled for K-LoRA: "
                  f"{counters['stats']['unique_graphs'] - graphs}")
        compiled.detach()

    log()
    copy_text = ", ".join(f"{nbytes / 2**30:.3f} GiB on {device}" for device, nbytes in copies.items()) or "none"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    log(f"- attach K-LoRA (two rank-{args.rank} LoRAs from host memory, conversion + statistics): "
        f"{attach_seconds:.2f} s")
    log(f"- weight copy kept by fused switching: {copy_text} (the model's weights: {weights / 2**30:.3f} GiB)")
    log(f"- one full switch pass ({shared} shared layers rewritten from their copies, synchronized): "
        f"{switch_pass * 1000:.1f} ms; in its last image K-LoRA rewrote {switches} layers "
        f"({switches / max(1, shared):.2f} passes)")


def measure_switch_pass(bench, klora, repeats: int = 5) -> float:
    """set_method content -> style rewrites every shared layer from its W0 copy."""
    times = []
    for _ in range(repeats):
        klora.set_method("content")
        times.append(bench.seconds(lambda: klora.set_method("style")))
    klora.set_method("klora")
    return statistics.median(times)


if __name__ == "__main__":
    main()
