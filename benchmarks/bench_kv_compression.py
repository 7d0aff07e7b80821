#!/usr/bin/env python
"""Forward time and peak memory of the PixArt-Σ transformer with and without KV compression.

Compression follows the released configuration: the deeper half of the blocks, ratio 2, 'conv' sampling. The
model is XL width (1152 channels, 16 heads of 72, 4096-channel T5 captions of 300 tokens); depth defaults to 28 on
CUDA and 4 on CPU (`--depth`), since only the relative cost matters and the compressed layers stay half of the
blocks. Both variants are timed in the same run on the same weights, interleaved repeat by repeat, and the
median is reported. Paper anchor (PixArt-Σ, KV compression): about -34% time at high resolution.

Peak memory is the maximum of allocated tensor memory during one forward pass, above what was allocated before
it: `torch.cuda.max_memory_allocated` on CUDA; on CPU, the running sum of the allocation/free events that
`torch.profiler` (profile_memory=True) records from PyTorch's CPU allocator (so it excludes memory that libraries
such as oneDNN allocate on their own, and interpreter overhead). The peak of an inference pass is the maximum over
blocks, so with only the deeper half compressed it is set by the uncompressed blocks and does not move; pass
`--attention-backend _native_math` to see attention-matrix memory in the timings.

    python benchmarks/bench_kv_compression.py                      # CPU default: grids 32,48,64, depth 4
    python benchmarks/bench_kv_compression.py --grids 64,96,128     # CUDA: depth 28, fp16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

from diffusers.models.attention_dispatch import attention_backend

from diffusers_microdit.models.transformer_pixart_kv import PixArtSigmaKVTransformer2DModel


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", default="32,48,64", help="square token grids (side length), comma separated")
    parser.add_argument("--depth", type=int, default=None, help="blocks (default: 28 on CUDA, 4 on CPU)")
    parser.add_argument("--ratio", type=int, default=2, help="KV compression ratio per axis")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 3 CPU, 10 CUDA)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs per variant and grid (the peak-memory pass counts as one)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; use 1 when other processes load the cores, "
                        "otherwise every parallel op waits for a descheduled thread)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--attention-backend", default=None,
                        help="diffusers attention backend, e.g. '_native_math' (materialises the attention matrix); "
                        "default: diffusers' active backend (SDPA)")
    return parser.parse_args()


def build_model(depth: int, device: torch.device, dtype: torch.dtype) -> PixArtSigmaKVTransformer2DModel:
    torch.manual_seed(0)
    model = PixArtSigmaKVTransformer2DModel(
        num_layers=depth,
        num_attention_heads=16,
        attention_head_dim=72,
        cross_attention_dim=1152,
        caption_channels=4096,
        sample_size=128,
        interpolation_scale=2.0,
        use_additional_conditions=False,
    )
    model = model.to(device)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def set_compression(model: PixArtSigmaKVTransformer2DModel, enabled: bool, ratio: int) -> None:
    depth = model.config.num_layers
    if enabled:
        model.enable_kv_compression(range(depth // 2, depth), ratio=ratio, sampling="conv")
    else:
        model.disable_kv_compression()


def make_inputs(grid: int, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(grid)
    return dict(
        hidden_states=torch.randn(batch, 4, 2 * grid, 2 * grid, generator=generator).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, 300, 4096, generator=generator).to(device, dtype),
        encoder_attention_mask=torch.ones(batch, 300, device=device, dtype=torch.long),
        timestep=torch.full((batch,), 500, device=device),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def timed_forward(model, inputs: dict, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    model(**inputs)
    synchronize(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler backend's start/stop log lines, which it writes straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@torch.inference_mode()
def peak_memory(model, inputs: dict, device: torch.device) -> int:
    """Bytes allocated at the peak of one forward pass, above the allocation level before it."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model(**inputs)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline

    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**inputs)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return peak


def main() -> None:
    args = parse_args()
    backend = attention_backend(args.attention_backend) if args.attention_backend else contextlib.nullcontext()
    with backend:
        run(args)


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    depth = args.depth or (28 if device.type == "cuda" else 4)
    repeats = args.repeats or (10 if device.type == "cuda" else 3)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    grids = [int(g) for g in args.grids.split(",")]

    model = build_model(depth, device, dtype)
    compressed = list(range(depth // 2, depth))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"PixArt-Σ XL width (1152 ch, 16x72 heads), depth {depth}, KV compression in blocks {compressed} "
          f"(ratio {args.ratio}, conv); batch {args.batch}, {dtype}, {name}, torch {torch.__version__}, "
          f"attention backend {args.attention_backend or 'default (SDPA)'}")
    print(f"time: median of {repeats} interleaved repeats after {args.warmup} warm-up; ratio = KV / full")
    header = f"{'grid':>7} {'tokens':>7} {'KV tok':>7} {'full ms':>9} {'KV ms':>9} {'time ratio':>10} {'change':>8}"
    if not args.no_memory:
        header += f" {'full MiB':>9} {'KV MiB':>9} {'mem ratio':>9}"
    print(header)

    for grid in grids:
        inputs = make_inputs(grid, args.batch, device, dtype)
        times, memory = {False: [], True: []}, {}
        for enabled in (False, True):
            set_compression(model, enabled, args.ratio)
            warmup = args.warmup
            if not args.no_memory:
                if device.type == "cuda" and warmup > 0:  # one-time workspaces outside the measured pass
                    timed_forward(model, inputs, device)
                    warmup -= 1
                memory[enabled] = peak_memory(model, inputs, device)  # untimed: also serves as a warm-up run
                warmup -= 1
            for _ in range(max(warmup, 0)):
                timed_forward(model, inputs, device)
        for _ in range(repeats):
            for enabled in (False, True):
                set_compression(model, enabled, args.ratio)
                times[enabled].append(timed_forward(model, inputs, device))
        full, kv = statistics.median(times[False]), statistics.median(times[True])
        kv_side = grid // args.ratio
        row = (f"{f'{grid}x{grid}':>7} {grid * grid:>7} {kv_side * kv_side:>7} {1e3 * full:>9.1f} {1e3 * kv:>9.1f} "
               f"{kv / full:>10.3f} {100 * (kv / full - 1):>+7.1f}%")
        if not args.no_memory:
            row += (f" {memory[False] / 2**20:>9.1f} {memory[True] / 2**20:>9.1f} "
                    f"{memory[True] / memory[False]:>9.3f}")
        print(row, flush=True)
    print("paper anchor: about -34% time at high resolution (ratio ~0.66)")
    if not args.no_memory:
        print("note: inference peak memory is the maximum over blocks, so it is set by the uncompressed blocks "
              "(and the feed-forward); compressing only the deeper half leaves it unchanged")


if __name__ == "__main__":
    main()
