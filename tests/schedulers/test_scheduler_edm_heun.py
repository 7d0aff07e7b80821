"""Tests for `EDMHeunScheduler`, the diffusers form of MicroDiT's EDM Heun sampler (EDM Algorithm 2, S_churn = 0).

All references below are written from the published algorithm; the network is a deterministic analytic toy.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from helpers import MICRODIT_FIXTURES
from safetensors.torch import load_file

from diffusers_microdit.schedulers.scheduling_edm_heun import EDMHeunScheduler, EDMHeunSchedulerOutput


SIGMA_MIN, SIGMA_MAX, SIGMA_DATA, RHO = 0.002, 80.0, 0.9, 7.0
FIXTURE = MICRODIT_FIXTURES / "microdit_public_io.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------------
def toy_net(x_in: torch.Tensor, t) -> torch.Tensor:
    """A smooth, nonlinear, spatially coupled stand-in for the DiT: F(c_in * x, c_noise)."""
    t = torch.as_tensor(t, dtype=x_in.dtype, device=x_in.device)
    return (
        torch.tanh(1.3 * x_in + 0.2 * t)
        - 0.4 * torch.roll(x_in, 1, -1) * torch.exp(-0.5 * t.abs())
        + 0.1 * torch.sin(2.0 * x_in)
    )


def reference_sigmas(n: int) -> torch.Tensor:
    """s_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i < N, then s_N = 0 (float64)."""
    i = torch.arange(n, dtype=torch.float64)
    ramp = i / (n - 1) if n > 1 else i
    s = (SIGMA_MAX ** (1 / RHO) + ramp * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def denoiser_f64(x: torch.Tensor, s: float) -> torch.Tensor:
    """EDM denoiser D(x, s) = c_skip x + c_out F(c_in x, ln(s)/4), everything in float64."""
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s * SIGMA_DATA / math.sqrt(s**2 + SIGMA_DATA**2)
    c_in = 1.0 / math.sqrt(SIGMA_DATA**2 + s**2)
    return c_skip * x + c_out * toy_net(c_in * x, math.log(s) / 4)


def reference_heun(x: torch.Tensor, n: int, denoiser=denoiser_f64, sigmas: torch.Tensor | None = None):
    """EDM Algorithm 2 with S_churn = 0 on a float64 state, starting from x (already at noise level s_0)."""
    t = reference_sigmas(n) if sigmas is None else sigmas
    x = x.to(torch.float64)
    evals = 0
    for i in range(len(t) - 1):
        s_cur, s_next = t[i], t[i + 1]
        d = (x - denoiser(x, s_cur.item())) / s_cur
        evals += 1
        x_next = x + (s_next - s_cur) * d
        if i < len(t) - 2:
            d_prime = (x_next - denoiser(x_next, s_next.item())) / s_next
            evals += 1
            x_next = x + (s_next - s_cur) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x, evals


def run_scheduler(scheduler, latents: torch.Tensor, n: int, start: torch.Tensor | None = None):
    """The standard diffusers denoising loop, unchanged for any scheduler."""
    scheduler.set_timesteps(n, device="cpu")
    x = latents * scheduler.init_noise_sigma if start is None else start
    evals = 0
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        out = toy_net(model_in, t)
        evals += 1
        x = scheduler.step(out, t, x).prev_sample
    return x, evals


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g)


# ----------------------------------------------------------------------------------------------------------------
# schedule
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,n", [("sampler.sigmas_cfg", 3), ("sampler.sigmas_nocfg", 2)])
def test_sigmas_match_fixture(key, n):
    expected = load_file(str(FIXTURE))[key]  # float64, N + 1 values ending in 0
    sched = EDMHeunScheduler()
    sched.set_timesteps(n)
    assert sched.step_sigmas.dtype == torch.float64
    torch.testing.assert_close(sched.step_sigmas, expected, rtol=0, atol=1e-12)
    # the float32 interleaved schedule is the float32 cast of the same values
    deinterleaved = torch.cat([sched.sigmas[0::2], sched.sigmas[-1:]])
    torch.testing.assert_close(deinterleaved, expected.to(torch.float32), rtol=0, atol=0)


def test_sigmas_match_formula_n30():
    sched = EDMHeunScheduler()
    sched.set_timesteps(30)
    ref = reference_sigmas(30)
    torch.testing.assert_close(sched.step_sigmas, ref, rtol=1e-15, atol=0)
    assert sched.step_sigmas[0].item() == SIGMA_MAX
    assert sched.step_sigmas[-1].item() == 0.0
    torch.testing.assert_close(sched.sigmas[0::2], ref[:-1].to(torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 2, 3, 18, 30])
def test_timesteps_layout(n):
    sched = EDMHeunScheduler()
    sched.set_timesteps(n)
    assert sched.order == 2
    assert sched.num_inference_steps == n
    assert len(sched.timesteps) == 2 * n - 1
    assert len(sched.sigmas) == 2 * n
    assert sched.timesteps.dtype == torch.float32
    levels = sched.step_sigmas[:-1].to(torch.float32)
    c_noise = torch.log(levels) / 4  # MicroDiT's c_noise, on float32 sigma
    expected = torch.cat([c_noise[:1], c_noise[1:].repeat_interleave(2)])
    torch.testing.assert_close(sched.timesteps, expected, rtol=0, atol=0)
    # evaluation k is at noise level sigmas[k]; the predictor at index 2i starts at s_i
    torch.testing.assert_close(sched.sigmas[0::2], levels, rtol=0, atol=0)
    # same noise levels / timesteps as the stock EDM Euler scheduler with the MicroDiT config
    euler = EDMEulerScheduler(sigma_data=SIGMA_DATA)
    euler.set_timesteps(n)
    torch.testing.assert_close(sched.timesteps[0::2], euler.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([sched.sigmas[0::2], sched.sigmas[-1:]]), euler.sigmas, rtol=0, atol=0)


def test_init_noise_sigma_and_defaults():
    sched = EDMHeunScheduler()
    assert sched.init_noise_sigma == 80.0
    cfg = sched.config
    assert (cfg.sigma_min, cfg.sigma_max, cfg.sigma_data, cfg.rho) == (SIGMA_MIN, SIGMA_MAX, SIGMA_DATA, RHO)
    assert cfg.sigma_schedule == "karras"
    assert cfg.prediction_type == "epsilon"
    assert cfg.final_sigmas_type == "zero"


@pytest.mark.parametrize("bad", [0, -1, -30])
def test_invalid_num_inference_steps(bad):
    sched = EDMHeunScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(bad)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps()


def test_scale_model_input_is_c_in():
    sched = EDMHeunScheduler()
    sched.set_timesteps(5)
    x = torch.randn(1, 4, 8, 8)
    for k, t in enumerate(sched.timesteps):
        sched._step_index = k
        s = sched.sigmas[k]
        torch.testing.assert_close(sched.scale_model_input(x, t), x / torch.sqrt(s**2 + SIGMA_DATA**2))


# ----------------------------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 10, 30])
def test_loop_matches_float64_reference(latents, n):
    sched = EDMHeunScheduler()
    out, evals = run_scheduler(sched, latents, n)
    ref, ref_evals = reference_heun(latents.to(torch.float64) * SIGMA_MAX, n)
    assert evals == ref_evals == 2 * n - 1
    assert out.dtype == latents.dtype and out.shape == latents.shape
    # The network sees float32 inputs (as in MicroDiT), which alone moves few-step results by up to ~2e-5.
    tol = 5e-5 if n <= 3 else 1e-5
    assert rel_err(out, ref) < tol


def test_float64_inputs_match_float64_reference(latents):
    """A float64 loop (float64 latents and network) checks the algorithm itself, free of float32 rounding."""
    lat64 = latents.to(torch.float64)
    out, _ = run_scheduler(EDMHeunScheduler(), lat64, 12)
    ref, _ = reference_heun(lat64 * SIGMA_MAX, 12)
    assert out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-6  # only the float32 sigmas/timesteps remain


def test_single_step_is_euler_to_zero(latents):
    sched = EDMHeunScheduler()
    sched.set_timesteps(1)
    assert len(sched.timesteps) == 1
    torch.testing.assert_close(sched.step_sigmas, torch.tensor([SIGMA_MAX, 0.0], dtype=torch.float64))
    out, evals = run_scheduler(sched, latents, 1)
    assert evals == 1
    x = latents.to(torch.float64) * SIGMA_MAX
    expected = x + (0.0 - SIGMA_MAX) * (x - denoiser_f64(x, SIGMA_MAX)) / SIGMA_MAX  # == D(x, 80)
    assert rel_err(out, expected) < 5e-5  # float32 cancellation of x - D at sigma 80
    assert sched.state_in_first_order


def test_step_bookkeeping(latents):
    n = 4
    sched = EDMHeunScheduler()
    sched.set_timesteps(n)
    assert sched.step_index is None and sched.begin_index is None
    x = latents * sched.init_noise_sigma
    phases = []
    for k, t in enumerate(sched.timesteps):
        phases.append(sched.state_in_first_order)
        model_in = sched.scale_model_input(x, t)
        assert sched.step_index == k
        out = sched.step(toy_net(model_in, t), t, x)
        assert isinstance(out, EDMHeunSchedulerOutput)
        assert out.pred_original_sample is not None and out.pred_original_sample.shape == x.shape
        x = out.prev_sample
        assert sched.step_index == k + 1
    # predictor, corrector, predictor, ..., final predictor without correction
    assert phases == [True, False] * (n - 1) + [True]
    assert sched.state_in_first_order
    # set_timesteps resets everything
    sched.set_timesteps(n)
    assert sched.step_index is None and sched.state_in_first_order


def test_return_tuple_and_pred_original_sample(latents):
    sched_a, sched_b = EDMHeunScheduler(), EDMHeunScheduler()
    for s in (sched_a, sched_b):
        s.set_timesteps(3)
    x = latents * SIGMA_MAX
    t = sched_a.timesteps[0]
    f = toy_net(sched_a.scale_model_input(x, t), t)
    sched_b.scale_model_input(x, t)
    prev, denoised = sched_a.step(f, t, x, return_dict=False)
    expected_d = denoiser_f64(x.to(torch.float64), SIGMA_MAX)
    assert rel_err(denoised, expected_d) < 1e-6
    prev_b = sched_b.step(f, t, x, pred_original_sample=denoised).prev_sample
    torch.testing.assert_close(prev, prev_b)


def test_rejects_integer_timestep_and_churn(latents):
    sched = EDMHeunScheduler()
    sched.set_timesteps(3)
    x = latents * SIGMA_MAX
    with pytest.raises(ValueError, match="integer"):
        sched.step(x, 0, x)
    t = sched.timesteps[0]
    with pytest.raises(ValueError, match="s_churn"):
        sched.step(x, t, x, s_churn=1.0)


def test_inference_mode_matches_no_grad(latents):
    with torch.no_grad():
        a, _ = run_scheduler(EDMHeunScheduler(), latents, 6)
    with torch.inference_mode():
        b, _ = run_scheduler(EDMHeunScheduler(), latents.clone(), 6)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_begin_index_and_add_noise_img2img(latents):
    """img2img: start at solver step k (timestep index k * order) from add_noise, as diffusers pipelines do."""
    n, k = 8, 3
    sched = EDMHeunScheduler()
    sched.set_timesteps(n)
    sched.set_begin_index(k * sched.order)
    assert sched.begin_index == k * sched.order
    timesteps = sched.timesteps[k * sched.order :]
    assert len(timesteps) == 2 * (n - k) - 1
    x0 = torch.tanh(latents)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    x = sched.add_noise(x0, noise, timesteps[:1].repeat(latents.shape[0]))
    s_k = sched.step_sigmas[k]
    torch.testing.assert_close(x, x0 + noise * s_k.to(torch.float32))
    for t in timesteps:
        x = sched.step(toy_net(sched.scale_model_input(x, t), t), t, x).prev_sample
    ref, _ = reference_heun((x0 + noise * s_k.to(torch.float32)).to(torch.float64), n - k,
                            sigmas=sched.step_sigmas[k:])
    assert rel_err(x, ref) < 1e-5


def test_begin_index_without_set_begin_index_uses_timestep_lookup(latents):
    """Starting mid-schedule without set_begin_index picks the predictor copy of a repeated timestep."""
    n, k = 6, 2
    sched = EDMHeunScheduler()
    sched.set_timesteps(n)
    t = sched.timesteps[2 * k]
    sched.scale_model_input(latents, t)
    assert sched.step_index == 2 * k
    assert sched.state_in_first_order


# ----------------------------------------------------------------------------------------------------------------
# config: swapping and save / load
# ----------------------------------------------------------------------------------------------------------------
def test_compatibles():
    names = {c.__name__ for c in EDMHeunScheduler().compatibles}
    assert {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"} <= names


@pytest.mark.parametrize("other_cls", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler])
def test_swap_via_from_config(other_cls):
    heun = EDMHeunScheduler()  # defaults: sigma_data 0.9, which differs from the stock EDM defaults (0.5)
    other = other_cls.from_config(heun.config)
    for key in ("sigma_min", "sigma_max", "sigma_data", "sigma_schedule", "prediction_type", "rho",
                "final_sigmas_type", "num_train_timesteps"):
        assert other.config[key] == heun.config[key], key
    back = EDMHeunScheduler.from_config(other.config)
    for key in ("sigma_min", "sigma_max", "sigma_data", "sigma_schedule", "prediction_type", "rho",
                "final_sigmas_type", "num_train_timesteps"):
        assert back.config[key] == heun.config[key], key
    # swapped schedulers see the same noise levels at the same evaluation points
    heun.set_timesteps(10)
    other.set_timesteps(10)
    torch.testing.assert_close(heun.timesteps[0::2], other.timesteps)


def test_from_config_of_stock_euler_config():
    euler = EDMEulerScheduler(sigma_data=SIGMA_DATA, sigma_min=0.01, final_sigmas_type="sigma_min")
    heun = EDMHeunScheduler.from_config(euler.config)
    assert heun.config.sigma_data == SIGMA_DATA
    assert heun.config.sigma_min == 0.01
    assert heun.config.final_sigmas_type == "sigma_min"
    heun.set_timesteps(4)
    assert heun.step_sigmas[-1] == heun.step_sigmas[-2]  # final step has zero length
    x = torch.randn(1, 4, 8, 8) * heun.init_noise_sigma
    for t in heun.timesteps:
        x = heun.step(toy_net(heun.scale_model_input(x, t), t), t, x).prev_sample
    assert torch.isfinite(x).all()


def test_save_load_round_trip(tmp_path, latents):
    sched = EDMHeunScheduler(sigma_max=60.0, rho=5.0)
    sched.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").exists()
    loaded = EDMHeunScheduler.from_pretrained(tmp_path)
    assert isinstance(loaded, EDMHeunScheduler)
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert strip(loaded.config) == strip(sched.config)
    a, _ = run_scheduler(sched, latents, 5)
    b, _ = run_scheduler(loaded, latents, 5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    default_dir = tmp_path / "default"
    EDMHeunScheduler().save_pretrained(default_dir)
    reloaded = EDMHeunScheduler.from_pretrained(default_dir)
    assert strip(reloaded.config) == strip(EDMHeunScheduler().config)
    assert EDMEulerScheduler.from_pretrained(default_dir).config.sigma_data == SIGMA_DATA
