#!/usr/bin/env python
"""Forward or training-step time and peak memory of the PixArt-Σ transformer with and without KV compression.

Compression follows the released configuration: the deeper half of the blocks, ratio 2, 'conv' sampling. The
model is XL width (1152 channels, 16 heads of 72, 4096-channel T5 captions of 300 tokens); depth defaults to 28 on
CUDA and 4 on CPU (`--depth`), and grids above 128x128 tokens use `--big_grid_depth` (default 2), since only the
relative cost matters and the compressed layers stay half of the blocks. The two variants are two models with the
same weights (the compressed one adds its average-initialised conv + LayerNorm), timed in the same run,
interleaved repeat by repeat; the median is reported. Paper anchor (PixArt-Σ, KV compression): about -34% time at
high resolution (2K-4K px, i.e. 128x128-256x256 tokens).

`--mode forward` times one inference forward; `--mode train` one training step: forward, MSE loss against a fixed
random target, backward, AdamW step and `zero_grad(set_to_none=True)`, each variant with its own optimizer. The
table ends with the token grid at which the time ratio first falls to 0.70 or below (interpolated in log tokens
between the two measured grids around it), or the largest grid measured if it never does. The FLOP ratio is
counted on the meta device (free, so also for grids skipped by `--max_tokens`); on CPU the `CPU ratio` is the time
ratio from process CPU time, which other processes' load disturbs far less than the wall clock.

Peak memory is the maximum of allocated tensor memory during one forward pass or training step, above what was
allocated before it (weights, optimizer state and inputs): `torch.cuda.max_memory_allocated` on CUDA; on CPU, the
running sum of the allocation/free events that `torch.profiler` (profile_memory=True) records from PyTorch's CPU
allocator (so it excludes memory that libraries such as oneDNN allocate on their own, and interpreter overhead).
In training it holds the activations saved for backward, the gradients and the optimizer's temporaries; one untimed
step before it allocates the AdamW state, so that is not counted. The peak of an inference pass is the maximum over
blocks, so with only the deeper half compressed it is set by the uncompressed blocks and does not move; pass
`--attention-backend _native_math` to see attention-matrix memory in the timings.

    python benchmarks/bench_kv_compression.py                      # CPU default: grids 32,48,64, depth 4
    python benchmarks/bench_kv_compression.py --grids 64,96,128     # CUDA: depth 28, fp16
    python benchmarks/bench_kv_compression.py --mode train          # grids 64,96,128,256 up to --max_tokens
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from diffusers.models.attention_dispatch import attention_backend

from diffusers_microdit.models.transformer_pixart_kv import PixArtSigmaKVTransformer2DModel
from diffusers_microdit.training.cost import flop_counter

DEFAULT_GRIDS = {"forward": "32,48,64", "train": "64,96,128,256"}
BIG_GRID_TOKENS = 128 * 128  # grids above this many tokens use --big_grid_depth
CROSSOVER_RATIO = 0.70  # the threshold: the paper's -34% is a ratio of about 0.66


def parse_args() -> argparse.Namespace:
    on_cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["forward", "train"], default="forward",
                        help="time an inference forward, or a training step (forward + backward + AdamW step)")
    parser.add_argument("--grids", default=None,
                        help="square token grids (side length), comma separated "
                        f"(default: {DEFAULT_GRIDS['forward']} forward, {DEFAULT_GRIDS['train']} train)")
    parser.add_argument("--max_tokens", type=int, default=65536 if on_cuda else 16384,
                        help="skip grids with more tokens than this (default 65536 on CUDA, 16384 on CPU)")
    parser.add_argument("--depth", type=int, default=None, help="blocks (default: 28 on CUDA, 4 on CPU)")
    parser.add_argument("--big_grid_depth", type=int, default=2,
                        help=f"blocks for grids above {BIG_GRID_TOKENS} tokens (128x128), default 2")
    parser.add_argument("--ratio", type=int, default=2, help="KV compression ratio per axis")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 3 CPU, 10 CUDA)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs per variant and grid (the peak-memory pass counts as one)")
    parser.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate in train mode (PixArt-Σ's)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="default: float16 (forward) or bfloat16 (train) on CUDA, float32 on CPU")
    parser.add_argument("--device", default="cuda" if on_cuda else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; use 1 when other processes load the cores, "
                        "otherwise every parallel op waits for a descheduled thread)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--attention-backend", default=None,
                        help="diffusers attention backend, e.g. '_native_math' (materialises the attention matrix); "
                        "default: diffusers' active backend (SDPA)")
    args = parser.parse_args()
    try:
        args.grids = [int(g) for g in (args.grids or DEFAULT_GRIDS[args.mode]).split(",")]
    except ValueError:
        parser.error(f"--grids must be comma-separated integers, got {args.grids!r}")
    if min(args.grids) < args.ratio:
        parser.error(f"every grid must be at least --ratio ({args.ratio}) tokens wide")
    return args


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


def build_variants(depth: int, ratio: int, device: torch.device, dtype: torch.dtype) -> dict[bool, torch.nn.Module]:
    """{False: full model, True: the same weights with the deeper half compressed}."""
    full = build_model(depth, device, dtype)
    compressed = copy.deepcopy(full).enable_kv_compression(range(depth // 2, depth), ratio=ratio, sampling="conv")
    return {False: full, True: compressed}


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


def make_step(mode: str, model, inputs: dict, lr: float):
    """A no-argument callable running one forward (inference mode) or one training step of `model`."""
    if mode == "forward":
        return torch.inference_mode()(lambda: model(**inputs))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    hidden = inputs["hidden_states"]
    # Learned sigma doubles the output channels; the target's values do not change the cost.
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(hidden.shape[0], model.out_channels, *hidden.shape[2:], generator=generator)
    target = target.to(hidden.device, torch.float32)

    def train_step() -> None:
        output = model(**inputs)[0]
        F.mse_loss(output.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # between steps no gradients are held, so the memory baseline has none

    return train_step


def counted_flops(mode: str, depth: int, ratio: int, grid: int, batch: int) -> dict[bool, int]:
    """FLOPs per variant of one forward (forward mode) or forward + backward (train mode; AdamW's elementwise
    update is not counted), counted by `cost.flop_counter` on the meta device: no time and no memory, so also for
    grids too large to time."""
    meta = torch.device("meta")
    flops = {}
    with meta:  # tensors created inside the model (embeddings, masks) must be on the meta device too
        inputs = make_inputs(grid, batch, meta, torch.float32)
        variants = build_variants(depth, ratio, meta, torch.float32)
    for enabled, model in variants.items():
        with meta, flop_counter() as counter:
            output = model(**inputs)[0]
            if mode == "train":
                output.float().pow(2).mean().backward()
        flops[enabled] = counter.get_total_flops()
    return flops


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds one call of `step` takes. On a CPU shared with other processes the CPU time
    counts only when this process ran, so it is far less disturbed by their load than the wall clock."""
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    step()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


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


def peak_step_memory(step, device: torch.device) -> int:
    """Bytes allocated at the peak of one call of `step`, above the allocation level before it."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline

    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
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


def peak_memory(model, inputs: dict, device: torch.device) -> int:
    """Bytes allocated at the peak of one inference forward of `model(**inputs)`, above the level before it."""
    return peak_step_memory(torch.inference_mode()(lambda: model(**inputs)), device)


def crossover(rows: list[tuple[int, float]]) -> str:
    """Where a KV/full ratio first reaches CROSSOVER_RATIO, from (tokens, ratio) rows in grid order."""
    if not rows:
        return "no grid measured"
    if rows[0][1] <= CROSSOVER_RATIO:
        return f"at or below the smallest grid measured ({math.isqrt(rows[0][0])}x{math.isqrt(rows[0][0])})"
    for (tokens_a, ratio_a), (tokens_b, ratio_b) in zip(rows, rows[1:]):
        if ratio_b <= CROSSOVER_RATIO < ratio_a:
            fraction = (ratio_a - CROSSOVER_RATIO) / (ratio_a - ratio_b)
            tokens = math.exp(math.log(tokens_a) + fraction * (math.log(tokens_b) - math.log(tokens_a)))
            side = math.sqrt(tokens)
            return f"~{side:.0f}x{side:.0f} tokens (~{tokens:.0f}; interpolated in log tokens between grids)"
    side = math.isqrt(rows[-1][0])
    return f"not reached up to {side}x{side} ({rows[-1][0]} tokens; ratio there {rows[-1][1]:.3f})"


def main() -> None:
    args = parse_args()
    backend = attention_backend(args.attention_backend) if args.attention_backend else contextlib.nullcontext()
    with backend:
        run(args)


def measure_grid(args, variants: dict, grid: int, device, dtype, repeats: int) -> tuple[dict, dict, dict]:
    """Median wall seconds, median CPU seconds and peak bytes per variant ({False: full, True: compressed})."""
    inputs = make_inputs(grid, args.batch, device, dtype)
    steps = {enabled: make_step(args.mode, model, inputs, args.lr) for enabled, model in variants.items()}
    times, cpu_times, memory = {False: [], True: []}, {False: [], True: []}, {}
    for enabled, step in steps.items():
        warmup = args.warmup
        if not args.no_memory:
            # One-time CUDA workspaces, and in training the AdamW state, stay outside the measured pass.
            if (device.type == "cuda" and warmup > 0) or args.mode == "train":
                timed(step, device)
                warmup -= 1
            memory[enabled] = peak_step_memory(step, device)  # untimed: also serves as a warm-up run
            warmup -= 1
        for _ in range(max(warmup, 0)):
            timed(step, device)
    for _ in range(repeats):
        for enabled, step in steps.items():
            wall, cpu = timed(step, device)
            times[enabled].append(wall)
            cpu_times[enabled].append(cpu)
    medians = [{enabled: statistics.median(values) for enabled, values in samples.items()}
               for samples in (times, cpu_times)]
    return *medians, memory


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    depth = args.depth or (28 if device.type == "cuda" else 4)
    repeats = args.repeats or (10 if device.type == "cuda" else 3)
    default_dtype = "float32" if device.type != "cuda" else ("bfloat16" if args.mode == "train" else "float16")
    dtype = getattr(torch, args.dtype or default_dtype)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    what = "forward (inference)" if args.mode == "forward" else f"training step (fwd + bwd + AdamW lr {args.lr})"
    print(f"PixArt-Σ XL width (1152 ch, 16x72 heads), {what}; depth {depth} (grids above 128x128: "
          f"{args.big_grid_depth}), KV compression in the deeper half (ratio {args.ratio}, conv); batch {args.batch}, "
          f"{dtype}, {name}, torch {torch.__version__}, attention backend {args.attention_backend or 'default (SDPA)'}")
    print(f"time: median of {repeats} interleaved repeats after {args.warmup} warm-up; ratio = KV / full")
    on_cpu = device.type == "cpu"
    if on_cpu:
        print("CPU ratio: the same from process CPU time, which other processes' load disturbs far less")
    print(f"FLOP ratio: {'forward' if args.mode == 'forward' else 'forward + backward'} FLOPs counted on the meta "
          "device (also for skipped grids)")
    header = (f"{'grid':>7} {'tokens':>7} {'KV tok':>7} {'depth':>5} {'FLOP ratio':>10} {'full ms':>10} "
              f"{'KV ms':>10} {'time ratio':>10} {'change':>8}")
    if on_cpu:
        header += f" {'CPU ratio':>9}"
    if not args.no_memory:
        header += f" {'full MiB':>9} {'KV MiB':>9} {'mem ratio':>9}"
    print(header)

    variants, measured, cpu_measured, counted = {}, [], [], []
    for grid in args.grids:
        tokens, kv_side = grid * grid, grid // args.ratio
        grid_depth = args.big_grid_depth if tokens > BIG_GRID_TOKENS else depth
        flops = counted_flops(args.mode, grid_depth, args.ratio, grid, args.batch)
        counted.append((tokens, flops[True] / flops[False]))
        start = (f"{f'{grid}x{grid}':>7} {tokens:>7} {kv_side * kv_side:>7} {grid_depth:>5} "
                 f"{flops[True] / flops[False]:>10.3f}")
        if tokens > args.max_tokens:
            print(f"{start}  skipped: more than --max_tokens {args.max_tokens}", flush=True)
            continue
        if grid_depth not in variants:
            variants.clear()  # free the other depth's models before building these
            variants[grid_depth] = build_variants(grid_depth, args.ratio, device, dtype)
        times, cpu_times, memory = measure_grid(args, variants[grid_depth], grid, device, dtype, repeats)
        full, kv = times[False], times[True]
        measured.append((tokens, kv / full))
        row = f"{start} {1e3 * full:>10.1f} {1e3 * kv:>10.1f} {kv / full:>10.3f} {100 * (kv / full - 1):>+7.1f}%"
        if on_cpu:
            cpu_ratio = cpu_times[True] / cpu_times[False]
            cpu_measured.append((tokens, cpu_ratio))
            row += f" {cpu_ratio:>9.3f}"
        if not args.no_memory:
            row += (f" {memory[False] / 2**20:>9.1f} {memory[True] / 2**20:>9.1f} "
                    f"{memory[True] / memory[False]:>9.3f}")
        print(row, flush=True)
    print(f"time ratio <= {CROSSOVER_RATIO:.2f}: {crossover(measured)}")
    if on_cpu:
        print(f"CPU ratio  <= {CROSSOVER_RATIO:.2f}: {crossover(cpu_measured)}")
    print(f"FLOP ratio <= {CROSSOVER_RATIO:.2f}: {crossover(counted)}")
    print("paper anchor: about -34% time at high resolution (ratio ~0.66)")
    if not args.no_memory and args.mode == "forward":
        print("note: inference peak memory is the maximum over blocks, so it is set by the uncompressed blocks "
              "(and the feed-forward); compressing only the deeper half leaves it unchanged")


if __name__ == "__main__":
    main()
