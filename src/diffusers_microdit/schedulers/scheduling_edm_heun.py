# Copyright 2026 The diffusers-microdit authors. Apache-2.0.
"""Deterministic second-order (Heun) EDM sampler as a diffusers scheduler.

This is the sampler used by MicroDiT (``edm_sampler_loop`` in Sony's micro_diffusion), i.e. Algorithm 2 of Karras et
al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models") with ``S_churn = 0``:

* noise levels ``s_i = (s_max^(1/rho) + i/(N-1) * (s_min^(1/rho) - s_max^(1/rho)))^rho`` for ``i = 0..N-1`` and
  ``s_N = 0``;
* ``x = latents * s_0``;
* per step ``d = (x - D(x, s_i)) / s_i``, ``x' = x + (s_{i+1} - s_i) d`` and, except on the last step,
  ``x' = x + (s_{i+1} - s_i) (d + (x' - D(x', s_{i+1})) / s_{i+1}) / 2``;
* ``D(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s))`` is the EDM preconditioned denoiser.

That is ``2N - 1`` network evaluations. To fit the one-evaluation-per-``step()`` contract of diffusers pipelines the
timesteps are interleaved like in [`~diffusers.HeunDiscreteScheduler`]: every noise level except the first appears
twice (first as the target of a predictor step whose corrector is evaluated there, then as the start of the next
predictor step), so ``len(timesteps) == 2N - 1`` and ``order == 2``.

The sigma schedule, the timesteps (``c_noise = ln(sigma) / 4``), ``scale_model_input`` (``c_in``),
``precondition_outputs`` (``D = c_skip x + c_out F``) and ``add_noise`` are inherited from
[`~diffusers.EDMEulerScheduler`].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_edm_euler import EDMEulerScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (see the package docstring)
from diffusers.utils import BaseOutput


@dataclass
class EDMHeunSchedulerOutput(BaseOutput):
    """Output of [`EDMHeunScheduler.step`].

    Args:
        prev_sample: the sample for the next `scale_model_input` / `step` call: after a predictor call the Euler
            estimate at the next noise level, after a corrector call the Heun-corrected sample.
        pred_original_sample: the EDM denoiser output `D(x, sigma)` of the evaluation passed to this call.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class EDMHeunScheduler(EDMEulerScheduler):
    """Deterministic second-order Heun sampler in the EDM formulation (Karras et al. 2022, Algorithm 2 with
    `S_churn = 0`); the defaults reproduce MicroDiT's `edm_sampler_loop`.

    A drop-in replacement for [`~diffusers.EDMEulerScheduler`] and [`~diffusers.EDMDPMSolverMultistepScheduler`]
    (same config keys, timesteps in `c_noise = ln(sigma) / 4` units, same `scale_model_input`) with `order = 2`:
    `set_timesteps(N)` yields `2N - 1` timesteps, one per network evaluation; the last step (to sigma 0) is a plain
    Euler step. The solver runs in the dtype of the sample it is given (the original keeps a float64 state; float32
    stays within ~2e-5 relative of it for 1-3 steps and ~4e-7 for 10-50 steps).

    Args:
        sigma_min: smallest non-zero noise level.
        sigma_max: largest noise level; also `init_noise_sigma` (the original starts at `latents * sigma_max`).
        sigma_data: data standard deviation of the EDM preconditioning (0.9 for MicroDiT).
        sigma_schedule: "karras" or "exponential" spacing, as in [`~diffusers.EDMEulerScheduler`].
        num_train_timesteps: length of the schedule built at construction (used by `add_noise`).
        prediction_type: "epsilon" (the EDM F-parameterisation `D = c_skip x + c_out F`) or "v_prediction".
        rho: exponent of the Karras schedule.
        final_sigmas_type: noise level after the last step, "zero" or "sigma_min".
    """

    _compatibles = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]
    order = 2

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.9,
        sigma_schedule: Literal["karras", "exponential"] = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
    ) -> None:
        super().__init__(
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            sigma_data=sigma_data,
            sigma_schedule=sigma_schedule,
            num_train_timesteps=num_train_timesteps,
            prediction_type=prediction_type,
            rho=rho,
            final_sigmas_type=final_sigmas_type,
        )
        # `from_config` lets the target class re-apply its own defaults for keys listed here. Ours are MicroDiT's
        # (sigma_data 0.9 where the diffusers EDM schedulers default to 0.5), so every key must always travel.
        self.register_to_config(_use_default_values=[])
        self.step_sigmas: torch.Tensor | None = None
        self._reset_solver_state()

    @property
    def init_noise_sigma(self) -> float:
        return float(self.config.sigma_max)

    @property
    def state_in_first_order(self) -> bool:
        """`True` when the next `step()` is a predictor (Euler) step, `False` when it is the Heun correction."""
        return self.dt is None

    def _reset_solver_state(self) -> None:
        self.prev_derivative = None
        self.dt = None
        self.sample = None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: torch.Tensor | list[float] | None = None,
        timesteps: torch.Tensor | list[float] | None = None,
    ) -> None:
        """Noise levels and timesteps for `num_inference_steps` Heun steps (`2N - 1` network evaluations).

        `sigmas`, as in [`~diffusers.EDMEulerScheduler.set_timesteps`], are positions in [0, 1] along the
        schedule (0 = sigma_max, 1 = sigma_min), not noise levels. `timesteps` are the noise levels themselves in
        timestep units (`c_noise = ln(sigma) / 4`, decreasing), one per solver step; the final level (0 or
        sigma_min) is appended as usual. Either overrides `num_inference_steps`.
        """
        if sigmas is not None and timesteps is not None:
            raise ValueError("Pass either `sigmas` or `timesteps`, not both.")
        if timesteps is not None:
            noise_conditioning = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
            self._set_noise_levels(torch.exp(4 * noise_conditioning), device)  # inverts c_noise = ln(sigma) / 4
            return
        if sigmas is not None:
            ramp = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
        else:
            if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
            # i / (N - 1) exactly as the original sampler (torch.linspace differs in the last bits).
            ramp = torch.arange(num_inference_steps, dtype=torch.float64) / max(num_inference_steps - 1, 1)
        if self.config.sigma_schedule == "karras":
            levels = self._compute_karras_sigmas(ramp)
        else:
            levels = self._compute_exponential_sigmas(ramp)
        self._set_noise_levels(levels.to(torch.float64), device)

    def _set_noise_levels(self, levels: torch.Tensor, device: str | torch.device | None) -> None:
        """Build the interleaved evaluation schedule from the solver's noise levels s_0 > ... > s_{N-1} > 0."""
        if levels.numel() < 1:
            raise ValueError("A custom schedule must contain at least one noise level.")
        if not (torch.isfinite(levels).all() and (levels > 0).all() and (levels[1:] < levels[:-1]).all()):
            raise ValueError("Custom noise levels must be finite, positive and strictly decreasing.")
        self.num_inference_steps = levels.numel()
        final = levels[-1:] if self.config.final_sigmas_type == "sigma_min" else torch.zeros(1, dtype=torch.float64)
        step_sigmas = torch.cat([levels, final])
        self.step_sigmas = step_sigmas  # s_0 .. s_N (float64), one per solver step plus the final level

        # One entry per network evaluation: the predictor at s_i (entry 2i) lands on s_{i+1} (entry 2i + 1), where
        # the corrector is evaluated; the final step to s_N has no corrector.
        self.sigmas = torch.cat([step_sigmas[:1], step_sigmas[1:-1].repeat_interleave(2), step_sigmas[-1:]]).float()
        timesteps = self.precondition_noise(levels.float())
        self.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]).to(device=device)
        self._step_index = None
        self._begin_index = None
        self._reset_solver_state()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        pred_original_sample: torch.Tensor | None = None,
    ) -> EDMHeunSchedulerOutput | tuple:
        """Consume one network evaluation `model_output = F(scale_model_input(sample, timestep), timestep)`.

        In first-order state this is the Euler (predictor) step from s_i to s_{i+1}; unless it is the last step the
        next call, which must get the network output at the returned sample, replaces the prediction by the
        Heun-corrected sample. `s_churn` must be 0 (deterministic sampler); the other churn arguments and
        `generator` are accepted for signature compatibility with `EDMEulerScheduler.step`.
        """
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                f"Pass one of `scheduler.timesteps` to `{type(self).__name__}.step()`, not an integer index."
            )
        if s_churn != 0:
            raise ValueError(f"{type(self).__name__} is the deterministic EDM Heun sampler; got s_churn={s_churn}.")
        if self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if self.step_index is None:
            self._init_step_index(timestep)

        index = self.step_index
        sigma = self.sigmas[index].to(sample.device, sample.dtype)
        if pred_original_sample is None:
            pred_original_sample = self.precondition_outputs(sample, model_output.to(sample.dtype), sigma)
        derivative = (sample - pred_original_sample) / sigma

        if self.state_in_first_order:
            dt = self.sigmas[index + 1].to(sample.device, sample.dtype) - sigma
            prev_sample = sample + dt * derivative
            if index + 2 < len(self.sigmas):  # a correction at s_{i+1} follows
                self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:
            prev_sample = self.sample + self.dt * (self.prev_derivative + derivative) / 2
            self._reset_solver_state()

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return EDMHeunSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
