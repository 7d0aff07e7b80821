"""Cost meter: parameters, training FLOPs per image, throughput, MFU and dollars (the paper's headline is cost).

FLOPs are counted, not estimated from a formula: `flop_counter()` (torch's `FlopCounterMode`) records every matmul,
convolution and attention op of the run's first real training step (forward+backward, see `DiffusionTrainer.train`)
at its resolution, mask ratio and caption length, so the patch mixer seeing all patches, expert-choice capacity and
cross-attention are all included as executed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten
# FlopCounterMode only knows the CUDA attention kernels; without these entries attention on CPU counts 0 FLOPs.
CPU_ATTENTION_FLOPS = {}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
    CPU_ATTENTION_FLOPS = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v)
        ),
    }

# FlopCounterMode runs an op it has no formula for through its Python decomposition when one exists; for these
# pointwise backward ops that gives gradients a few ULPs off the kernel's, so a counted step would not be the step
# an uncounted run takes (a resumed run counts a different step than the uninterrupted one: no longer bit-identical).
# Keyed by overload, which is what the mode checks before decomposing; pointwise ops count 0 FLOPs either way.
NOT_DECOMPOSED = {aten.silu_backward.default: lambda *_, **__: 0, aten.mish_backward.default: lambda *_, **__: 0}
COUNTED_OPS = {**CPU_ATTENTION_FLOPS, **NOT_DECOMPOSED}

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) of common training GPUs, matched against the device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active per token). An expert-choice MoE layer processes each token with `capacity` experts on
    average (each of the E experts takes capacity * T / E tokens), so it counts its router plus `capacity` experts'
    worth of weights as active; every other parameter is active for every token."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if hasattr(module, "w_in") and hasattr(module, "num_experts"):
            expert_params = module.w_in.numel() + module.w_out.numel()
            inactive += expert_params - round(expert_params * min(module.capacity, module.num_experts) / module.num_experts)
    return total, total - inactive


def flop_counter() -> FlopCounterMode:
    """A silent `FlopCounterMode` that also counts CPU attention and leaves every op's numerics as they are: run a
    forward+backward inside `with`, then read `get_total_flops()`."""
    return FlopCounterMode(display=False, custom_mapping=COUNTED_OPS)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `override_tflops` if given, the table for known GPUs, otherwise unknown."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
    return None


@dataclass
class CostMeter:
    """Accumulates images and wall-clock time of training steps and turns them into images/s, MFU and dollars.

    `flops_per_image` is the counted forward+backward FLOPs of one training image (None until a step counted it);
    `num_devices` the processes; `gpu_hour_cost` the price of one device-hour (0 = not priced).
    """

    total_params: int
    active_params: int
    flops_per_image: float | None = None
    num_devices: int = 1
    peak_flops_per_device: float | None = None
    gpu_hour_cost: float = 0.0
    images: int = 0
    seconds: float = 0.0
    _last: float | None = field(default=None, repr=False)

    def start_step(self) -> None:
        self._last = time.perf_counter()

    def end_step(self, global_images: int) -> None:
        if self._last is not None:
            self.seconds += time.perf_counter() - self._last
            self.images += global_images
        self._last = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def mfu(self) -> float | None:
        if not self.peak_flops_per_device or not self.seconds or self.flops_per_image is None:
            return None
        return self.images_per_second * self.flops_per_image / (self.peak_flops_per_device * self.num_devices)

    def cost_of(self, num_images: int) -> tuple[float, float]:
        """(device-hours, dollars) to train on `num_images` images at the measured throughput."""
        if not self.images_per_second:
            return float("nan"), float("nan")
        seconds = num_images / self.images_per_second
        return seconds / 3600 * self.num_devices, self.dollars_of(seconds)

    def dollars_of(self, wall_seconds: float) -> float:
        """Dollars of `wall_seconds` of the run on all its devices at `gpu_hour_cost` per device-hour."""
        return wall_seconds / 3600 * self.num_devices * self.gpu_hour_cost

    def wall_seconds_for(self, dollars: float) -> float:
        """Wall-clock seconds of the run that `dollars` pay for on all its devices (the inverse of `dollars_of`)."""
        return dollars / (self.gpu_hour_cost * self.num_devices) * 3600

    def as_dict(self, planned_images: int) -> dict[str, object]:
        """The figures of `summary` as a table for the model card."""
        hours, dollars = self.cost_of(planned_images)
        figures = {
            "parameters (total)": f"{self.total_params / 1e6:.2f}M",
            "parameters (active per token)": f"{self.active_params / 1e6:.2f}M",
            "training GFLOP per image (fwd+bwd)": (
                "not counted" if self.flops_per_image is None else round(self.flops_per_image / 1e9, 3)
            ),
            "training images": planned_images,
            "devices": self.num_devices,
            "images/s (measured)": round(self.images_per_second, 2),
            "device-hours": round(hours, 4),
        }
        if self.mfu is not None:
            figures["MFU"] = f"{self.mfu:.1%}"
        if self.gpu_hour_cost:
            figures["USD (estimated)"] = round(dollars, 2)
        return figures

    def summary(self, planned_images: int) -> str:
        lines = [f"parameters: {self.total_params / 1e6:.2f}M total, {self.active_params / 1e6:.2f}M active per token"]
        if self.flops_per_image is None:
            lines.append("training FLOPs per image: not counted (this run trained no step)")
        else:
            lines.append(
                f"training FLOPs per image (counted fwd+bwd): {self.flops_per_image / 1e9:.3f} GFLOP; "
                f"planned {planned_images} images = {planned_images * self.flops_per_image / 1e15:.4f} PFLOP"
            )
        if self.seconds:
            hours, dollars = self.cost_of(planned_images)
            mfu = f"{self.mfu:.1%}" if self.mfu is not None else "n/a (device peak unknown; pass --peak_tflops)"
            price = f"${dollars:.2f} at ${self.gpu_hour_cost}/device-hour" if self.gpu_hour_cost else "pass --gpu_hour_cost to price it"
            lines += [
                f"measured {self.images_per_second:.2f} images/s on {self.num_devices} device(s), MFU {mfu}",
                f"estimated cost of the planned run: {hours:.4f} device-hours, {price}",
            ]
        return "\n".join(lines)
