#!/usr/bin/env python
"""Pipeline-level LiT against PixArt-Σ: time per image and peak memory at 512², 1024² (2048²), and the T5 text
encoder's memory in float32, bfloat16 and torchao int8 weight-only.

Both pipelines use the same XL-width transformer weights (1152 channels, 16 cross-attention heads of 72, 4096-channel
T5 captions of 300 tokens) at a reduced depth (`--depth`, default 2 on CPU): PixArt-Σ is diffusers'
`PixArtSigmaPipeline` (SDPA self-attention), LiT is [`LiTPipeline`] with [`LiTTransformer2DModel.from_pixart`]
(2 linear-attention heads). Each call samples one image with classifier-free guidance (transformer batch 2), DPM-Solver,
`--steps` steps, from fixed prompt embeddings, and returns latents: the T5 encoder and the VAE are the same in both
pipelines, so they are measured apart (T5 below) or not at all (the VAE). Times are medians of interleaved repeats;
ratios come from the same run.

Peak memory of one pipeline call is measured in a fresh subprocess per pipeline and resolution, as in
`bench_linear_attention.py`: `alloc` is the peak of PyTorch allocator memory during the call above the level before
it (`torch.cuda.max_memory_allocated`, or on CPU the torch profiler's allocation events), `rss` (Linux CPU) the peak
resident set during the call above the resident set before it. Neither counts the weights, which were loaded before.
On CPU, where PyTorch's SDPA kernel never holds the attention matrix, the peak of a call is set by the feed-forward
and the loop's temporaries, which the two pipelines share in kind but not in code (diffusers' loop and the
package's), so the peaks differ by little; the layer benchmark isolates the attention.

The T5 table builds a T5-XXL-width encoder (d_model 4096, d_ff 10240, 64 heads, gated-GELU, 32128 tokens) with
`--t5_layers` of its 24 layers, measures the bytes of its weights in each format (int8 counts the int8 data and the
per-channel scales) and projects them to the 24-layer encoder of PixArt-Σ: embedding plus 24 x the per-layer bytes.

    python benchmarks/bench_lit_pipeline.py --threads 1                       # CPU: depth 2, 512 and 1024 px
    python benchmarks/bench_lit_pipeline.py --resolutions 512,1024,2048       # CUDA: depth 28, float16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch
from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from transformers import T5Config, T5EncoderModel

from diffusers_microdit import LiTPipeline, LiTTransformer2DModel

# The sibling scripts in this directory: same peak-memory methods, so the benchmarks' numbers compare.
from bench_kv_compression import peak_memory  # isort: skip
from bench_linear_attention import process_status_kib, seconds  # isort: skip

PIPELINES = ("pixart", "lit")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, feed_forward_proj="gated-gelu")
T5_XXL_LAYERS = 24
CAPTION_TOKENS = 300


def parse_args() -> argparse.Namespace:
    on_cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", default="512,1024", help="square image sizes in pixels, comma separated")
    parser.add_argument("--depth", type=int, default=None, help="transformer blocks (default 28 on CUDA, 2 on CPU)")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps per image")
    parser.add_argument("--repeats", type=int, default=3, help="timed images per pipeline and resolution")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="transformer dtype (default: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="cuda" if on_cuda else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--t5_layers", type=int, default=2, help="T5-XXL-width layers built for the T5 table (0: skip)")
    parser.add_argument("--no-memory", action="store_true", help="skip the pipeline peak-memory subprocesses")
    parser.add_argument("--memory-probe", nargs=2, metavar=("PIPELINE", "RESOLUTION"), help=argparse.SUPPRESS)
    return parser.parse_args()


def build_pipelines(depth: int, device: torch.device, dtype: torch.dtype) -> dict:
    """PixArt-Σ and its LiT student (same inherited weights), without text encoder and VAE."""
    torch.manual_seed(0)
    pixart = PixArtTransformer2DModel(
        num_layers=depth, caption_channels=4096, sample_size=128, interpolation_scale=2, use_additional_conditions=False
    ).eval()
    lit = LiTTransformer2DModel.from_pixart(pixart, num_attention_heads=2)
    pipelines = {
        "pixart": PixArtSigmaPipeline(None, None, None, pixart, DPMSolverMultistepScheduler()),
        "lit": LiTPipeline(None, None, None, lit, DPMSolverMultistepScheduler()),
    }
    for pipe in pipelines.values():
        pipe.to(device)
        if dtype != torch.float32:  # cast only when needed: diffusers warns on every dtype cast
            pipe.to(dtype)
        pipe.set_progress_bar_config(disable=True)
    return pipelines


def prompt_inputs(device: torch.device, dtype: torch.dtype) -> dict:
    """Fixed stand-ins for T5 embeddings of a prompt (40 real tokens) and of the empty negative prompt (1 token)."""
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 1, CAPTION_TOKENS, 4096, generator=generator).to(device, dtype)
    mask = torch.zeros(2, 1, CAPTION_TOKENS, dtype=torch.long, device=device)
    mask[0, :, :40], mask[1, :, :1] = 1, 1
    return dict(prompt_embeds=embeds[0], prompt_attention_mask=mask[0],
                negative_prompt_embeds=embeds[1], negative_prompt_attention_mask=mask[1])


def image_call(pipe, resolution: int, steps: int, prompt: dict):
    """One image of `resolution`² as latents, with the same noise every call."""
    return lambda: pipe(
        **prompt, negative_prompt=None, height=resolution, width=resolution, num_inference_steps=steps,
        output_type="latent", use_resolution_binning=False, generator=torch.Generator().manual_seed(0),
    )


class PipelineCall(torch.nn.Module):
    """A pipeline call as a module, for `peak_memory`."""

    def __init__(self, call):
        super().__init__()
        self.call = call

    def forward(self):
        return self.call()


def memory_probe(args, device: torch.device, dtype: torch.dtype, depth: int) -> None:
    """Child process: one call of one pipeline at one resolution; prints {"alloc": bytes, "rss": bytes}."""
    name, resolution = args.memory_probe[0], int(args.memory_probe[1])
    call = image_call(build_pipelines(depth, device, dtype)[name], resolution, args.steps, prompt_inputs(device, dtype))
    result = {}
    if device.type == "cpu":  # first, before the profiler's pass: the resident-set peak of the first call
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
        before = process_status_kib("VmRSS")
        seconds(call, device)
        result["rss"] = 1024 * (process_status_kib("VmHWM") - before)
    result["alloc"] = peak_memory(PipelineCall(call), {}, device)
    print(json.dumps(result))


def measure_memory_in_subprocess(name: str, resolution: int) -> dict[str, int]:
    command = [sys.executable, __file__, *sys.argv[1:], "--memory-probe", name, str(resolution)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's weights; a torchao int8 weight counts its int8 data and its scales."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if hasattr(tensor, "__tensor_flatten__"):  # torchao tensor subclass: its inner tensors hold the storage
            total += sum(getattr(tensor, name).nbytes for name in tensor.__tensor_flatten__()[0])
        else:
            total += tensor.nbytes
    return total


def t5_table(args, device: torch.device) -> None:
    """Weight memory of a T5-XXL-width encoder in float32 / bfloat16 / int8, projected to 24 layers, and the time
    of encoding a batch of two 300-token captions (bfloat16 against int8 weights with bfloat16 activations)."""
    torch.manual_seed(0)
    encoders = {"float32": T5EncoderModel(T5Config(**T5_XXL, num_layers=args.t5_layers)).eval()}
    embedding = weight_bytes(encoders["float32"].shared)
    encoders["bfloat16"] = encoders.pop("float32").to(torch.bfloat16)
    measured = {"float32": 2 * weight_bytes(encoders["bfloat16"])}  # the same tensors at 4 bytes an element
    measured["bfloat16"] = weight_bytes(encoders["bfloat16"])
    int8 = T5EncoderModel(T5Config(**T5_XXL, num_layers=args.t5_layers)).eval().to(torch.bfloat16)
    int8.load_state_dict(encoders["bfloat16"].state_dict())
    quantize_(int8, Int8WeightOnlyConfig())  # what TorchAoConfig(Int8WeightOnlyConfig()) does on load
    encoders["int8 weights, bf16 activations"] = int8
    measured["int8 weights, bf16 activations"] = weight_bytes(int8)
    # The token embedding is not a linear layer: int8 weight-only leaves it in bfloat16.
    embeddings = {"float32": embedding, "bfloat16": embedding / 2, "int8 weights, bf16 activations": embedding / 2}

    ids = torch.randint(0, T5_XXL["vocab_size"], (2, CAPTION_TOKENS), generator=torch.Generator().manual_seed(0))
    encoders = {name: model.to(device) for name, model in encoders.items()}
    calls = {name: (lambda m=model: m(ids.to(device))) for name, model in encoders.items()}
    times = {name: [] for name in calls}
    for name, call in calls.items():
        seconds(call, device)  # warm-up
    for _ in range(args.repeats):
        for name, call in calls.items():
            times[name].append(seconds(call, device))

    print(f"\nT5 encoder, XXL width, {args.t5_layers} of {T5_XXL_LAYERS} layers built; weights projected to "
          f"{T5_XXL_LAYERS} layers; encode = 2 x {CAPTION_TOKENS} tokens, median of {args.repeats}")
    print(f"{'format':>31} {'built GiB':>10} {'24-layer GiB':>13} {'vs float32':>11} {'encode s':>9}")
    projected = {
        name: embeddings[name] + T5_XXL_LAYERS * (size - embeddings[name]) / args.t5_layers
        for name, size in measured.items()
    }
    for name, size in measured.items():
        encode = f"{statistics.median(times[name]):>9.2f}" if name in times else f"{'-':>9}"  # float32: not built
        ratio = projected[name] / projected["float32"]
        print(f"{name:>31} {size / 2**30:>10.2f} {projected[name] / 2**30:>13.2f} {ratio:>11.2f} {encode}")


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    depth = args.depth or (28 if device.type == "cuda" else 2)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    if args.memory_probe:
        memory_probe(args, device, dtype, depth)
        return
    resolutions = [int(r) for r in args.resolutions.split(",")]
    pipelines, prompt = build_pipelines(depth, device, dtype), prompt_inputs(device, dtype)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"PixArt-Σ vs LiT pipelines, XL width, depth {depth}, {dtype}, CFG (batch 2), {args.steps} DPM-Solver "
          f"steps, latents out; {name}, torch {torch.__version__}")
    print(f"time: median of {args.repeats} interleaved images after 1 warm-up; speedup = PixArt / LiT; memory: fresh "
          "subprocess per cell, ratio = LiT / PixArt")
    memory_kinds = ("alloc", "rss") if device.type == "cpu" else ("alloc",)
    header = f"{'px':>5} {'tokens':>7} {'PixArt s':>9} {'LiT s':>8} {'speedup':>8}"
    if not args.no_memory:
        header += "".join(f" {f'PixArt {k} MiB':>16} {f'LiT {k} MiB':>13} {f'{k} ratio':>11}" for k in memory_kinds)
    print(header)
    for resolution in resolutions:
        calls = {n: image_call(pipelines[n], resolution, args.steps, prompt) for n in PIPELINES}
        for call in calls.values():
            seconds(call, device)  # warm-up
        times = {n: [] for n in PIPELINES}
        for _ in range(args.repeats):
            for n, call in calls.items():
                times[n].append(seconds(call, device))
        pixart, lit = (statistics.median(times[n]) for n in PIPELINES)
        tokens = (resolution // 16) ** 2  # VAE factor 8, patch 2
        row = f"{resolution:>5} {tokens:>7} {pixart:>9.2f} {lit:>8.2f} {pixart / lit:>7.2f}x"
        if not args.no_memory:
            memory = {n: measure_memory_in_subprocess(n, resolution) for n in PIPELINES}
            for kind in memory_kinds:
                row += (f" {memory['pixart'][kind] / 2**20:>16.1f} {memory['lit'][kind] / 2**20:>13.1f} "
                        f"{memory['lit'][kind] / max(memory['pixart'][kind], 1):>11.2f}")
        print(row, flush=True)
    if args.t5_layers:
        t5_table(args, device)


if __name__ == "__main__":
    main()
