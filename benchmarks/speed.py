"""Side-by-side timing of K-LoRA against the base model, one LoRA, direct merge and
a re-implementation of the original per-call recompute, in one process.

    python benchmarks/speed.py                 # SDXL-shaped UNet scaled to fit a CPU
    python benchmarks/speed.py --device cuda --dtype fp16 --full_size --height 1024 --width 1024

The UNet has SDXL's layout (70 transformer blocks, 560 attention linears,
1/2/10 transformer layers per level); by default its widths are divided by 8
so one generation takes seconds on a CPU. Timings rotate through the methods
for several rounds and report the median, so a busy machine hurts every
method alike; the table gives ratios to the base model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from klora import rule  # noqa: E402
from klora.fusion import KLoRA  # noqa: E402
from klora.tiny import write_demo_loras  # noqa: E402


def sdxl_shaped_unet(full_size: bool):
    from diffusers import UNet2DConditionModel

    div = 1 if full_size else 8
    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320 // div, 640 // div, 1280 // div),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        norm_num_groups=8 if not full_size else 32,
    )


def build_pipeline(folder: Path, full_size: bool):
    from diffusers import StableDiffusionXLPipeline

    from klora.tiny import build_tiny_sdxl

    build_tiny_sdxl(folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    torch.manual_seed(0)
    pipe.unet = sdxl_shaped_unet(full_size).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


class OriginalStyleLayer(torch.nn.Module):
    """What the original implementation did in every layer on every call: rebuild both
    dense B @ A products, run top-K over them, pick one with a global call counter, and
    apply it as a full-rank matmul. Re-implemented here only to be timed."""

    def __init__(self, base, content, style, gamma, counter, total_calls):
        super().__init__()
        self.base = base
        self.content, self.style = content, style  # (A, B, scale)
        self.gamma, self.counter, self.total_calls = gamma, counter, total_calls

    def forward(self, x):
        (Ac, Bc, sc), (As, Bs, ss) = self.content, self.style
        dc, ds = sc * (Bc @ Ac), ss * (Bs @ As)
        k = Ac.shape[0] * As.shape[0]
        top_c = dc.abs().flatten().topk(k).values.sum()
        top_s = ds.abs().flatten().topk(k).values.sum()
        self.counter[0] += 1
        p = (self.counter[0] % self.total_calls) / self.total_calls
        chosen = dc if top_c / self.gamma > top_s * (1.5 * p + 1.275) % 1.5 else ds
        return self.base(x) + torch.nn.functional.linear(x, chosen.to(x.dtype))


def install_original_style(unet, klora: KLoRA, steps: int):
    """Replace K-LoRA's adapter layers by OriginalStyleLayer (after reading their weights)."""
    modules = dict(unet.named_modules())
    counter = [0]
    total = len(klora.paths) * steps
    replaced = []
    for path in klora.paths:
        layer = modules[path]
        weights = []
        for name in ("klora_content", "klora_style"):
            weights.append((layer.lora_A[name].weight.detach().clone(), layer.lora_B[name].weight.detach().clone(),
                            float(layer.scaling[name])))
        replaced.append((path, weights))
    klora.detach()
    modules = dict(unet.named_modules())
    for path, (content, style) in replaced:
        parent_name, _, child = path.rpartition(".")
        setattr(modules[parent_name], child, OriginalStyleLayer(modules[path], content, style, klora.gamma,
                                                                counter, total))


def time_stats(rank: int) -> tuple[int, float]:
    """One-time statistics for the 560 linears of the real SDXL UNet (shapes from the meta device)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        unet = sdxl_shaped_unet(full_size=True)
        unet.register_to_config(cross_attention_dim=2048)
    shapes = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            in_features = 2048 if ("attn2" in name and name.endswith(("to_k", "to_v"))) else module.in_features
            shapes.append((module.out_features, in_features))
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for out_f, in_f in shapes:
        A1, B1 = torch.randn(rank, in_f, generator=gen), torch.randn(out_f, rank, generator=gen)
        A2, B2 = torch.randn(rank, in_f, generator=gen), torch.randn(out_f, rank, generator=gen)
        rule.layer_stats(rule.dense_delta(A1, B1, 1.0), rule.dense_delta(A2, B2, 1.0), rank, rank)
    return len(shapes), time.perf_counter() - start


def time_one_real_layer(rank: int, tokens: int = 2048, width: int = 1280, repeats: int = 5) -> dict:
    """Per-call cost in one real-size SDXL layer (1280 wide, 2 x 32x32 tokens at 1024 px):
    a rank-r adapter (ours) versus the original's dense rebuild + top-K + full-rank matmul."""
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(width, width)
    x = torch.randn(tokens, width, generator=gen)
    lora = [(torch.randn(rank, width, generator=gen), torch.randn(width, rank, generator=gen), 1.0) for _ in range(2)]
    original = OriginalStyleLayer(base, lora[0], lora[1], 1.0, [0], 1000)

    def adapter():
        A, B, s = lora[0]
        return base(x) + s * ((x @ A.T) @ B.T)

    results = {}
    with torch.no_grad():
        for name, call in (("base linear", lambda: base(x)), ("rank-r adapter (K-LoRA)", adapter),
                           ("original per-call recompute", lambda: original(x))):
            call()
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            results[name] = (time.perf_counter() - start) / repeats
    return results


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--full_size", action="store_true", help="real SDXL widths (GPU)")
    parser.add_argument("--skip_original", action="store_true", help="skip the slow original-style recompute")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    scratch = Path(tempfile.mkdtemp(prefix="klora-bench-"))
    pipe = build_pipeline(scratch / "model", args.full_size)
    content, style = write_demo_loras(pipe.unet, scratch, rank=args.rank, seed=0)
    pipe.to(args.device, dtype)
    n_linears = sum(1 for n, m in pipe.unet.named_modules()
                    if isinstance(m, torch.nn.Linear) and n.endswith(("to_q", "to_k", "to_v", "to_out.0")))

    def generate():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        pipe("a sbu dog in szn style", num_inference_steps=args.steps, height=args.height, width=args.width,
             generator=torch.Generator().manual_seed(0), output_type="latent")
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    start = time.perf_counter()
    klora = KLoRA(pipe, content, style)
    attach_s = time.perf_counter() - start

    def set_mode(mode):
        if mode == "base":
            pipe.unet.disable_lora()
        elif mode == "direct merge (fused)":
            # Both LoRAs fused into the weights: the usual "merged LoRA", base-model cost.
            pipe.unet.enable_lora()
            pipe.unet.set_adapters(["klora_content", "klora_style"])
            pipe.unet.fuse_lora(adapter_names=["klora_content", "klora_style"])
        else:
            pipe.unet.enable_lora()
            klora.set_method({"one LoRA": "content", "direct merge (2 adapters)": "merge",
                              "K-LoRA": "klora"}[mode])

    def unset_mode(mode):
        if mode == "direct merge (fused)":
            pipe.unet.unfuse_lora()

    modes = ["base", "one LoRA", "direct merge (2 adapters)", "direct merge (fused)", "K-LoRA"]
    times = {m: [] for m in modes}
    generate()  # warm-up
    for _ in range(args.rounds):
        for mode in modes:
            set_mode(mode)
            times[mode].append(generate())
            unset_mode(mode)
    klora.set_method("klora")

    if not args.skip_original:
        install_original_style(pipe.unet, klora, args.steps)
        times["original per-call recompute"] = [generate() for _ in range(args.rounds)]

    base = statistics.median(times["base"])
    n_stats, stats_s = time_stats(args.rank)
    print(f"\nSDXL-shaped UNet ({'full' if args.full_size else '1/8'} width, {n_linears} attention linears), "
          f"{args.steps} steps, {args.height}x{args.width}, rank {args.rank}, {args.device} {args.dtype}, "
          f"torch threads {torch.get_num_threads()}, median of {args.rounds}\n")
    print("| method | seconds per image | ratio to base |")
    print("|---|---|---|")
    for mode, values in times.items():
        median = statistics.median(values)
        print(f"| {mode} | {median:.2f} | {median / base:.2f}x |")
    layer = time_one_real_layer(args.rank)
    print(f"\none real-size SDXL layer ({1280}x{1280}, 2048 tokens), per call:")
    print("| layer | milliseconds per call | ratio to base linear |")
    print("|---|---|---|")
    for name, seconds in layer.items():
        print(f"| {name} | {seconds * 1000:.2f} | {seconds / layer['base linear']:.2f}x |")
    print(f"\nattach K-LoRA (load two LoRAs + statistics, scaled model): {attach_s:.2f} s")
    print(f"statistics alone for the {n_stats} attention linears of the real SDXL UNet (rank {args.rank}): "
          f"{stats_s:.2f} s on the CPU")


if __name__ == "__main__":
    main()
