#!/usr/bin/env python
"""Forward time and peak memory of one LiT linear self-attention layer against PixArt-Σ softmax self-attention.

Both layers are XL width (1152 channels) on a square token grid and include their q/k/v/output projections:
PixArt-Σ's self-attention is diffusers' `Attention` with 16 heads of 72 and `AttnProcessor2_0` (PyTorch SDPA);
LiT's is [`LiTLinearAttention`] with 2 heads (ReLU linear attention plus the 5x5 depthwise conv on V), which under
inference runs the in-place `linear_attention_`. The `core` columns time only what LiT replaces, given the
projected q/k/v: SDPA against `linear_attention_` plus the conv (LiT's core includes restoring its q and k work
buffers, two copies, since it overwrites them). Variants run interleaved, repeat by repeat; medians are reported
and ratios (softmax / LiT) come from the same run.

Peak memory is measured for every variant and token count in a fresh subprocess that builds the layer and its
input and runs one forward (no warm-up), in two ways: `alloc`, the maximum of allocated tensor memory during the
forward above what was allocated before it (`torch.cuda.max_memory_allocated` on CUDA; on CPU, as in
`bench_kv_compression.py`, the running sum of the allocation/free events that `torch.profiler` records from
PyTorch's CPU allocator, so it excludes memory oneDNN allocates on its own); and on Linux CPUs `rss`, the peak
resident set during that first forward above the resident set before it (`VmHWM` after resetting it through
`/proc/self/clear_refs`, minus `VmRSS`), which includes everything (oneDNN scratch, first-call kernel set-up) and so
is noisier. PyTorch's CPU SDPA kernel is itself memory-efficient (it never holds
the full attention matrix), so softmax memory grows slowly on CPU; `--sdpa-backend math` materialises the matrix.

Paper anchor (LiT, reported, not verified): about 9x faster than softmax self-attention at 2048 px (DiT-S/2,
GPU), peak memory 14 GB -> 4 GB.

    python benchmarks/bench_linear_attention.py                        # CPU default: 256 ... 4096 tokens
    python benchmarks/bench_linear_attention.py --max_tokens 16384 --threads 1   # CPU, up to 16384 tokens
    python benchmarks/bench_linear_attention.py --max_tokens 16384     # CUDA default: 256 ... 16384 tokens
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusers_microdit.models.transformer_lit import LiTLinearAttention, linear_attention_

# The sibling script in this directory: same peak-memory method, so the two benchmarks' numbers compare.
from bench_kv_compression import peak_memory, synchronize  # isort: skip

TOKEN_COUNTS = (256, 1024, 4096, 16384)


def parse_args() -> argparse.Namespace:
    on_cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_tokens", type=int, default=16384 if on_cuda else 4096,
                        help=f"largest token count of {TOKEN_COUNTS} to run (default 16384 on CUDA, 4096 on CPU)")
    parser.add_argument("--width", type=int, default=1152, help="channels (PixArt-Σ XL: 1152)")
    parser.add_argument("--softmax_heads", type=int, default=16)
    parser.add_argument("--lit_heads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 3 CPU, 20 CUDA)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant and token count")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default="cuda" if on_cuda else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--sdpa-backend", choices=["default", "math"], default="default",
                        help="PyTorch SDPA kernel for the softmax layer; 'math' materialises the attention matrix")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--memory-probe", nargs=2, metavar=("VARIANT", "TOKENS"), help=argparse.SUPPRESS)
    return parser.parse_args()


def build_layers(args, device: torch.device, dtype: torch.dtype) -> tuple[Attention, LiTLinearAttention]:
    torch.manual_seed(0)
    softmax = Attention(
        query_dim=args.width,
        heads=args.softmax_heads,
        dim_head=args.width // args.softmax_heads,
        bias=True,
        out_bias=True,
        processor=AttnProcessor2_0(),
    )
    lit = LiTLinearAttention(args.width, heads=args.lit_heads)
    return softmax.to(device, dtype).eval(), lit.to(device, dtype).eval()


@torch.inference_mode()
def seconds(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_interleaved(variants: dict, repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per variant, the variants alternating within every repeat."""
    for fn in variants.values():
        for _ in range(warmup):
            seconds(fn, device)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(seconds(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def layer_inputs(args, tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(tokens)
    return torch.randn(args.batch, tokens, args.width, generator=generator).to(device, dtype)


def layer_call(softmax: Attention, lit: LiTLinearAttention, variant: str, x: torch.Tensor):
    side = math.isqrt(x.shape[1])
    return (lambda: softmax(x)) if variant == "softmax" else (lambda: lit(x, height=side, width=side))


def process_status_kib(field: str) -> int:
    """A KiB field of /proc/self/status (Linux), e.g. VmRSS (resident set) or VmHWM (its peak)."""
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def memory_probe(args, device: torch.device, dtype: torch.dtype) -> None:
    """Child process: one forward of one variant at one token count; prints {"alloc": bytes, "rss": bytes}."""
    variant, tokens = args.memory_probe[0], int(args.memory_probe[1])
    softmax, lit = build_layers(args, device, dtype)
    forward = layer_call(softmax, lit, variant, layer_inputs(args, tokens, device, dtype))
    result = {}
    if device.type == "cpu":  # first, before the profiler's pass: the resident-set peak of the first forward
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
        before = process_status_kib("VmRSS")
        with torch.inference_mode():
            forward()
        result["rss"] = 1024 * (process_status_kib("VmHWM") - before)
    module = softmax if variant == "softmax" else lit
    x = layer_inputs(args, tokens, device, dtype)
    side = math.isqrt(tokens)
    inputs = {"hidden_states": x} if variant == "softmax" else {"hidden_states": x, "height": side, "width": side}
    result["alloc"] = peak_memory(module, inputs, device)
    print(json.dumps(result))


def measure_memory_in_subprocess(variant: str, tokens: int) -> dict[str, int]:
    """Peak memory of one variant at one token count, measured in a fresh interpreter (see the module docstring)."""
    command = [sys.executable, __file__, *sys.argv[1:], "--memory-probe", variant, str(tokens)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    kernel = sdpa_kernel(SDPBackend.MATH) if args.sdpa_backend == "math" else contextlib.nullcontext()
    if args.memory_probe:
        with kernel:
            memory_probe(args, device, dtype)
        return
    softmax, lit = build_layers(args, device, dtype)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"width {args.width}; softmax: {args.softmax_heads} heads, SDPA ({args.sdpa_backend} kernel); LiT: "
          f"{args.lit_heads} heads + 5x5 depthwise conv on V; batch {args.batch}, {dtype}, {name}, "
          f"torch {torch.__version__}")
    print(f"time: median of {repeats} interleaved repeats after {args.warmup} warm-up; speedup = softmax / LiT; "
          "memory: fresh subprocess per cell, mem ratio = LiT / softmax")
    header = (f"{'tokens':>7} {'grid':>7} {'softmax ms':>10} {'LiT ms':>8} {'speedup':>8} "
              f"{'core sm ms':>10} {'core LiT ms':>11} {'core speedup':>12}")
    memory_kinds = ("alloc", "rss") if device.type == "cpu" else ("alloc",)
    if not args.no_memory:
        header += "".join(f" {f'sm {kind} MiB':>14} {f'LiT {kind} MiB':>15} {f'{kind} ratio':>11}"
                          for kind in memory_kinds)
    print(header)

    with kernel:
        for tokens in (n for n in TOKEN_COUNTS if n <= args.max_tokens):
            side = math.isqrt(tokens)
            x = layer_inputs(args, tokens, device, dtype)
            with torch.inference_mode():
                q, k, v = lit.to_q(x), lit.to_k(x), lit.to_v(x)
            q_work, k_work = q.clone(), k.clone()  # linear_attention_ overwrites its q and k
            heads = args.softmax_heads
            q_h, k_h, v_h = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))

            def lit_core():
                out = linear_attention_(q_work.copy_(q), k_work.copy_(k), v, args.lit_heads)
                return out.add_(lit.value_conv(v, side, side))

            layer = time_interleaved(
                {name: layer_call(softmax, lit, name, x) for name in ("softmax", "lit")}, repeats, args.warmup, device
            )
            core = time_interleaved(
                {"softmax": lambda: F.scaled_dot_product_attention(q_h, k_h, v_h), "lit": lit_core},
                repeats, args.warmup, device,
            )
            row = (f"{tokens:>7} {f'{side}x{side}':>7} {1e3 * layer['softmax']:>10.2f} {1e3 * layer['lit']:>8.2f} "
                   f"{layer['softmax'] / layer['lit']:>7.2f}x {1e3 * core['softmax']:>10.2f} "
                   f"{1e3 * core['lit']:>11.2f} {core['softmax'] / core['lit']:>11.2f}x")
            if not args.no_memory:
                memory = {variant: measure_memory_in_subprocess(variant, tokens) for variant in ("softmax", "lit")}
                for kind in memory_kinds:
                    softmax_bytes, lit_bytes = memory["softmax"][kind], memory["lit"][kind]
                    row += (f" {softmax_bytes / 2**20:>14.1f} {lit_bytes / 2**20:>15.1f} "
                            f"{lit_bytes / max(softmax_bytes, 1):>11.2f}")
            print(row, flush=True)
    print("paper anchor (reported): ~9x faster than softmax self-attention at 2048 px (DiT-S/2, GPU); "
          "memory 14 GB -> 4 GB")


if __name__ == "__main__":
    main()
