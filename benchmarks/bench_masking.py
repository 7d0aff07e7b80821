"""Does deferred masking turn saved FLOPs into saved training time?

Times a MicroDiT training step (forward, loss over the kept patches, backward, fused AdamW step) with 75% of the
patches masked and without masking, alternating the two, and counts the FLOPs of the same forward+backward with
`torch.utils.flop_counter.FlopCounterMode` in the same run. How to read the output:

* FLOP ratio = masked / unmasked FLOPs: what masking can save. It is well above `1 - mask_ratio` because the patch
  mixer always sees every patch and the caption refiner, conditioning and cross-attention keys/values do not depend
  on the patch count; the forward FLOP breakdown in the output shows these parts.
* time ratio = masked / unmasked time: what masking does save. The headline is best round / best round (noise from
  other processes only adds time); the median of back-to-back round ratios is printed next to it, and the two agree
  on a quiet machine. The last line says how much CPU other processes took while timing.
* Goal: `|time ratio / FLOP ratio - 1| <= 0.15` for the whole training step. The fwd+bwd line leaves out the AdamW
  step, which costs the same in both modes and is not counted in the FLOPs.
Absolute times are secondary: they depend on the machine and on how busy it is.

    python benchmarks/bench_masking.py                  # MicroDiT_Tiny_2, batch 8, 256 px, float32, CPU (~1.5 min)
    python benchmarks/bench_masking.py --batch_size 4 --repeats 3 --json masking.json
"""

import argparse
import json
import math
import os
import statistics
import time

import diffusers
import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusers_microdit import MicroDiTTransformer2DModel, get_random_keep_ids
from diffusers_microdit.training.cost import CPU_ATTENTION_FLOPS


def busy_cpu_seconds() -> float:
    """CPU seconds all processes on the machine have used so far (Linux `/proc/stat`), NaN elsewhere."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="MicroDiT_Tiny_2")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, each one masked + one unmasked step")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--sample_size", type=int, default=32, help="latent height/width (32 = 256 px)")
    parser.add_argument("--caption_tokens", type=int, default=77)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    return parser.parse_args()


def main():
    args = parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    model = MicroDiTTransformer2DModel.from_preset(args.preset, sample_size=args.sample_size).to(device).train()
    if dtype != torch.float32:
        diffusers.utils.logging.set_verbosity_error()  # no warning about casting with .to(): all weights may be bf16
        model.to(dtype)
    # Fused AdamW: on CPU the default per-tensor loop takes ~5x longer (~0.46 s vs ~0.1 s for Tiny_2), a fixed cost
    # that masking cannot shrink; a real training setup would pick the fused kernel.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    cfg, batch = model.config, args.batch_size
    p, grid = cfg.patch_size, args.sample_size // cfg.patch_size
    num_tokens = grid * grid

    latents = torch.randn(batch, cfg.in_channels, args.sample_size, args.sample_size, device=device, dtype=dtype)
    target = torch.randn_like(latents)
    sigma = (torch.randn(batch, device=device) * 1.2 - 1.2).exp()  # EDM training noise levels
    timestep = sigma.log() / 4
    captions = torch.randn(batch, args.caption_tokens, cfg.caption_channels, device=device, dtype=dtype)

    def loss_fn(masked):
        keep_ids = get_random_keep_ids(batch, num_tokens, args.mask_ratio, device=device) if masked else None
        out = model(latents, timestep, captions, keep_ids=keep_ids)
        # Per-patch squared error (row-major patches, as keep_ids), averaged over the kept patches like the EDM loss.
        err = (out.sample.float() - target.float()).square()
        err = err.view(batch, -1, grid, p, grid, p).mean(dim=(1, 3, 5)).flatten(1)
        keep = torch.ones_like(err) if out.mask is None else 1 - out.mask.float()
        return (err * keep).sum() / keep.sum()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(masked):
        sync()
        start = time.perf_counter()
        loss_fn(masked).backward()
        sync()
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return middle - start, time.perf_counter() - middle

    # FLOPs of the timed forward+backward. The forward alone is also split into the patch mixer (all tokens), the
    # backbone (kept tokens) and the rest (captions, conditioning, embedding, output); forward-only because
    # FlopCounterMode does not attribute backward ops to modules reliably.
    flops, parts = {}, {}
    for masked in (False, True):
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as forward_counter:
            loss = loss_fn(masked)
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as backward_counter:
            loss.backward()
        optimizer.zero_grad(set_to_none=True)
        forward, by_module = forward_counter.get_total_flops(), forward_counter.get_flop_counts()
        flops[masked] = forward + backward_counter.get_total_flops()
        mixer, backbone = (
            sum(sum(c.values()) for name, c in by_module.items() if name.count(".") == 2 and f".{blocks}." in name)
            for blocks in ("patch_mixer_blocks", "transformer_blocks")
        )
        parts[masked] = {"patch mixer": mixer, "backbone": backbone, "rest": forward - mixer - backbone}

    for _ in range(args.warmup):
        train_step(False), train_step(True)
    times = {False: [], True: []}  # per round: (forward+backward seconds, AdamW seconds)
    machine_start, own_start, wall_start = busy_cpu_seconds(), time.process_time(), time.perf_counter()
    for i in range(args.repeats):
        # Alternate which mode goes first so that slow drifts of the machine do not favour one of them.
        for masked in (False, True) if i % 2 == 0 else (True, False):
            times[masked].append(train_step(masked))
    # How much of the machine's cores other processes used while we timed: they slow both modes, unevenly.
    wall = time.perf_counter() - wall_start
    others = (busy_cpu_seconds() - machine_start - (time.process_time() - own_start)) / (wall * os.cpu_count())

    def time_ratios(phase):
        """Masked / unmasked time as (best round / best round, median of back-to-back round ratios). Interference
        only ever adds time, so the best rounds are the closest to the machine's undisturbed speed."""
        masked, unmasked = [phase(*t) for t in times[True]], [phase(*t) for t in times[False]]
        return min(masked) / min(unmasked), statistics.median(m / u for m, u in zip(masked, unmasked))

    flop_ratio = flops[True] / flops[False]
    step, fwd_bwd = time_ratios(lambda fb, opt: fb + opt), time_ratios(lambda fb, opt: fb)
    modes = (("unmasked", False), ("masked", True))
    results = {
        "preset": args.preset, "batch_size": batch, "mask_ratio": args.mask_ratio, "tokens": num_tokens,
        "kept_tokens": int(num_tokens * (1 - args.mask_ratio)), "dtype": args.dtype, "device": str(device),
        "threads": torch.get_num_threads(), "repeats": args.repeats, "other_processes_cpu_share": others,
        "gflops": {mode: flops[masked] / 1e9 for mode, masked in modes},
        "flop_ratio": flop_ratio,
        "time_ratio_step": step[0], "time_ratio_step_median": step[1],
        "time_ratio_fwd_bwd": fwd_bwd[0], "time_ratio_fwd_bwd_median": fwd_bwd[1],
        "deviation_step": abs(step[0] / flop_ratio - 1), "deviation_fwd_bwd": abs(fwd_bwd[0] / flop_ratio - 1),
        "best_ms": {
            mode: {"fwd_bwd": 1e3 * min(t[0] for t in times[masked]), "adamw": 1e3 * min(t[1] for t in times[masked])}
            for mode, masked in modes
        },
        "forward_gflops_by_part": {mode: {k: v / 1e9 for k, v in parts[masked].items()} for mode, masked in modes},
    }

    print(f"{args.preset}, batch {batch}, {num_tokens} -> {results['kept_tokens']} tokens (mask ratio "
          f"{args.mask_ratio}), {args.dtype} on {device}, {torch.get_num_threads()} threads, {args.repeats} rounds")
    print(f"FLOP ratio, fwd+bwd           {flop_ratio:.3f}  ({flops[True] / 1e9:.1f} / {flops[False] / 1e9:.1f} GFLOP)")
    for name, (best, median), deviation in (
        ("time ratio, training step   ", step, results["deviation_step"]),
        ("time ratio, fwd+bwd only    ", fwd_bwd, results["deviation_fwd_bwd"]),
    ):
        print(f"{name}  {best:.3f}  (median of rounds {median:.3f})  |time/flop - 1| = {deviation:.3f}")
    verdict = "met" if results["deviation_step"] <= 0.15 else "NOT met"
    print(f"goal |time/flop - 1| <= 0.15 for the training step: {verdict}")
    for mode, ms in results["best_ms"].items():
        print(f"  best ms {mode:9s} fwd+bwd {ms['fwd_bwd']:7.0f}  AdamW {ms['adamw']:5.0f}")
    print("  forward GFLOP by part, unmasked -> masked:")
    for part, gflop in results["forward_gflops_by_part"]["unmasked"].items():
        print(f"    {part:12s} {gflop:7.2f} -> {results['forward_gflops_by_part']['masked'][part]:6.2f}")
    if not math.isnan(others):
        print(f"  other processes used {others:.0%} of the {os.cpu_count()} cores while timed"
              + (" -- the times are disturbed; rerun on a quieter machine" if others > 0.1 else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
