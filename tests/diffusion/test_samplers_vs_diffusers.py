"""Every sampler against its diffusers scheduler, step by step: the same model function, the same
timesteps and sigmas, the same starting latent and the same noise (the same generator seeds)."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from ldm.diffusion.guidance import make_denoiser
from ldm.diffusion.samplers import SIGMA_SAMPLERS, sample_ddim, sample_ddpm
from ldm.diffusion.schedule import NoiseSchedule, sampling_timesteps
from ldm.diffusion.sigmas import dpm_solver_schedule, sigma_schedule

DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction"}
STEPS = 10
B = 2


def toy_model_for(prediction, schedule):
    """A stand-in for a U-Net that keeps latents at unit scale, as a trained one does: the exact
    denoiser of N(0, I) data plus a smooth, nonlinear, timestep- and context-dependent part."""
    alphas_cumprod = schedule.alphas_cumprod

    def model(x, t, context):
        t = t.float().reshape(-1, 1, 1, 1)
        low = t.floor().long().clamp(max=len(alphas_cumprod) - 2)
        ab = alphas_cumprod[low] + (t - low) * (alphas_cumprod[low + 1] - alphas_cumprod[low])
        wiggle = 0.3 * torch.tanh(2 * x) * (0.5 + t / 1000) + 0.2 * context.mean(
            dim=(1, 2)
        ).reshape(-1, 1, 1, 1)
        return ((1 - ab).sqrt() * x if prediction == "eps" else 0) + wiggle

    return model


def scheduler_kwargs(prediction, spacing, zero_snr):
    kw = dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        timestep_spacing=spacing,
    )
    if zero_snr:
        kw["rescale_betas_zero_snr"] = True
    return kw


def run_diffusers(
    scheduler, toy_model, x, context, generator, completed=lambda s: True, **step_kwargs
):
    """diffusers' own sampling loop; the state after each completed step."""
    states = []
    stochastic = isinstance(
        scheduler,
        (
            DDPMScheduler,
            DDIMScheduler,
            EulerAncestralDiscreteScheduler,
            DPMSolverMultistepScheduler,
        ),
    )
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        out = toy_model(model_in, t.reshape(1).repeat(x.shape[0]), context)
        kwargs = {"generator": generator} if stochastic else {}
        x = scheduler.step(out, t, x, **kwargs, **step_kwargs).prev_sample
        if completed(scheduler):
            states.append(x / vp_scale(scheduler) if isinstance(scheduler, SIGMA_SPACE) else x)
    return states


SIGMA_SPACE = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler)


def vp_scale(scheduler):
    """sqrt(1 + sigma^2) at the state just reached: states are compared at the network's input
    scale (x_t), where float32 resolves 1e-5 even when sigma_max is 4096 (zero terminal SNR)."""
    sigma = scheduler.sigmas[scheduler.step_index]
    return (sigma**2 + 1) ** 0.5


def assert_states_close(ours, ref):
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        err = (a - b).abs().max().item()
        assert err <= 1e-5, f"step {i}: max abs difference {err:.2e}"


# ---- alpha_bar space ----------------------------------------------------------------------------

ALPHA_BAR_CASES = [
    ("eps", "trailing", False),
    ("v", "trailing", False),
    ("eps", "leading", False),
    ("eps", "linspace", False),
    ("v", "trailing", True),
]


@pytest.mark.parametrize("prediction,spacing,zero_snr", ALPHA_BAR_CASES)
@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_alpha_bar_samplers_match_diffusers(name, prediction, spacing, zero_snr):
    if name == "ddim" and spacing == "linspace":
        pytest.skip(
            "diffusers' DDIM steps to t - T // steps, not to the next linspace timestep; "
            "we step to the next visited timestep"
        )
    schedule = NoiseSchedule("scaled_linear", zero_terminal_snr=zero_snr)
    kw = scheduler_kwargs(prediction, spacing, zero_snr)
    if name == "ddpm":
        ref = DDPMScheduler(**kw, clip_sample=False)
    else:
        ref = DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(STEPS)
    ts = sampling_timesteps(1000, STEPS, spacing)
    assert ts == ref.timesteps.tolist()
    context = torch.randn(B, 3, 8, generator=torch.Generator().manual_seed(2))
    x = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    toy_model = toy_model_for(prediction, schedule)
    denoiser = make_denoiser(toy_model, schedule, prediction, context)
    ours = []
    record = lambda i, x_, x0: ours.append(x_)
    if name == "ddpm":
        sample_ddpm(
            denoiser,
            x.clone(),
            ts,
            schedule.alphas_cumprod,
            generator=torch.Generator().manual_seed(1),
            callback=record,
        )
    else:
        sample_ddim(
            denoiser,
            x.clone(),
            ts,
            schedule.alphas_cumprod,
            eta=0.5,
            generator=torch.Generator().manual_seed(1),
            callback=record,
        )
    step_kwargs = {"eta": 0.5} if name == "ddim" else {}
    ref_states = run_diffusers(
        ref, toy_model, x.clone(), context, torch.Generator().manual_seed(1), **step_kwargs
    )
    assert_states_close(ours, ref_states)


# ---- sigma space --------------------------------------------------------------------------------


def diffusers_scheduler(name, prediction, spacing, sigmas, zero_snr):
    kw = scheduler_kwargs(prediction, spacing, zero_snr)
    if sigmas is not None:
        kw["use_karras_sigmas" if sigmas == "karras" else "use_exponential_sigmas"] = True
    if name == "euler":
        return EulerDiscreteScheduler(**kw)
    if name == "euler_ancestral":
        return EulerAncestralDiscreteScheduler(**kw)
    if name == "heun":
        return HeunDiscreteScheduler(**kw)
    algorithm = "sde-dpmsolver++" if name == "dpmpp_2m_sde" else "dpmsolver++"
    return DPMSolverMultistepScheduler(
        **kw, algorithm_type=algorithm, solver_order=2, solver_type="midpoint"
    )


# (sampler, prediction, spacing, sigmas, zero SNR): every option diffusers offers for it
SIGMA_CASES = [
    *[(n, p, "trailing", None, False) for n in SIGMA_SAMPLERS for p in ("eps", "v")],
    *[
        (n, p, "trailing", s, False)
        for n in ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde")
        for p in ("eps", "v")
        for s in ("karras", "exponential")
    ],
    *[
        (n, "eps", sp, None, False)
        for n in ("euler", "heun", "dpmpp_2m")
        for sp in ("linspace", "leading")
    ],
    ("euler", "eps", "linspace", "karras", False),
    *[
        (n, "v", "trailing", None, True)
        for n in ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde")
    ],
    ("dpmpp_2m", "v", "trailing", "karras", True),
]


@pytest.mark.parametrize("name,prediction,spacing,sigmas,zero_snr", SIGMA_CASES)
def test_sigma_samplers_match_diffusers(name, prediction, spacing, sigmas, zero_snr):
    ref = diffusers_scheduler(name, prediction, spacing, sigmas, zero_snr)
    ref.set_timesteps(STEPS)
    schedule = NoiseSchedule("scaled_linear", zero_terminal_snr=zero_snr)
    dpm = name.startswith("dpmpp")
    make = dpm_solver_schedule if dpm else sigma_schedule
    sig, ts = make(schedule.alphas_cumprod, STEPS, spacing, sigmas)
    if name == "heun":  # diffusers lists each inner sigma/timestep twice (one per Heun stage)
        ref_sig, ref_ts = torch.cat([ref.sigmas[0::2], ref.sigmas[-1:]]), ref.timesteps[0::2]
    else:
        ref_sig, ref_ts = ref.sigmas, ref.timesteps
    torch.testing.assert_close(sig, ref_sig, rtol=1e-6, atol=0)
    torch.testing.assert_close(ts, ref_ts.float(), rtol=0, atol=1e-4)

    context = torch.randn(B, 3, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x_ref = noise * ref.init_noise_sigma
    # DPM-Solver carries the variance-preserving x_t; the others x_t / sqrt(alpha_bar), as we do.
    x = noise * (sig[0] ** 2 + 1) ** 0.5 if dpm else x_ref.clone()
    ours = []

    def record(i, x_, x0):
        ours.append(x_ / (sig[i + 1] ** 2 + 1) ** 0.5)

    toy_model = toy_model_for(prediction, schedule)
    denoiser = make_denoiser(toy_model, schedule, prediction, context)
    SIGMA_SAMPLERS[name](
        denoiser, x, sig, ts, generator=torch.Generator().manual_seed(1), callback=record
    )
    # a Heun step is complete after its second stage, or after the last (Euler) one
    completed = (
        (lambda s: s.state_in_first_order or s.step_index == len(s.timesteps))
        if name == "heun"
        else (lambda s: True)
    )
    ref_states = run_diffusers(
        ref, toy_model, x_ref, context, torch.Generator().manual_seed(1), completed
    )
    assert_states_close(ours, ref_states)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde"])
def test_per_image_generators_match_diffusers_generator_lists(name):
    """A list of generators gives row i its own noise stream, exactly as diffusers' randn_tensor."""
    ref = diffusers_scheduler(name, "eps", "trailing", None, False)
    ref.set_timesteps(STEPS)
    schedule = NoiseSchedule("scaled_linear")
    make = dpm_solver_schedule if name.startswith("dpmpp") else sigma_schedule
    sig, ts = make(schedule.alphas_cumprod, STEPS, "trailing")
    context = torch.randn(B, 3, 8)
    noise = torch.randn(B, 4, 8, 8)
    x_ref = noise * ref.init_noise_sigma
    x = noise * (sig[0] ** 2 + 1) ** 0.5 if name.startswith("dpmpp") else x_ref.clone()
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]
    toy_model = toy_model_for("eps", schedule)
    ours = SIGMA_SAMPLERS[name](
        make_denoiser(toy_model, schedule, "eps", context), x, sig, ts, generator=gens()
    )
    ref_out = run_diffusers(ref, toy_model, x_ref, context, gens())[-1]
    assert (ours - ref_out).abs().max().item() <= 1e-5
