import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddim import (
    rescale_zero_terminal_snr as diffusers_rescale,
)

from ldm.checkpoints.diffusers_configs import diffusion_from_scheduler, scheduler_config
from ldm.diffusion.schedule import (
    NoiseSchedule,
    rescale_zero_terminal_snr,
    sampling_timesteps,
)

DIFFUSERS_KIND = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
}


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_betas_and_alphas_cumprod_match_diffusers(kind):
    ours = NoiseSchedule(kind, 1000, 0.00085, 0.012)
    ref = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=DIFFUSERS_KIND[kind],
    )
    torch.testing.assert_close(ours.betas, ref.betas, rtol=0, atol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_schedules_match_diffusers_and_end_at_exactly_zero(kind):
    ours = NoiseSchedule(kind, 1000, 0.00085, 0.012, zero_terminal_snr=True)
    ref = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=DIFFUSERS_KIND[kind],
        rescale_betas_zero_snr=True,
    )
    torch.testing.assert_close(ours.betas, ref.betas, rtol=0, atol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)
    assert ours.alphas_cumprod[-1].item() == 0.0 and ours.betas[-1].item() == 1.0
    assert (ours.alphas_cumprod[:-1] > 0).all()  # only the last step has SNR 0
    assert (ours.alphas_cumprod.diff() < 0).all()


def test_zero_terminal_snr_ends_at_exactly_zero_and_matches_diffusers():
    ours = NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    assert ours.alphas_cumprod[-1].item() == 0.0
    ref = diffusers_rescale(NoiseSchedule("scaled_linear").betas)
    torch.testing.assert_close(rescale_zero_terminal_snr(NoiseSchedule("scaled_linear").betas), ref)
    # First step keeps its SNR: only the end of the schedule moves.
    plain = NoiseSchedule("scaled_linear")
    torch.testing.assert_close(ours.alphas_cumprod[0], plain.alphas_cumprod[0])


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_sampling_timesteps_match_diffusers(spacing, offset, steps):
    ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(steps)
    assert sampling_timesteps(1000, steps, spacing, offset) == ref.timesteps.tolist()


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("factor", [0.25, 4.0, 64.0])
def test_snr_shift_multiplies_every_steps_snr(factor, zero_terminal_snr):
    plain = NoiseSchedule(zero_terminal_snr=zero_terminal_snr).alphas_cumprod.double()
    shifted = NoiseSchedule(zero_terminal_snr=zero_terminal_snr, snr_shift=factor)
    ab = shifted.alphas_cumprod.double()
    torch.testing.assert_close(ab, factor * plain / (1 + (factor - 1) * plain), rtol=0, atol=5e-6)
    # As an SNR ratio, where float32's alpha_bar still resolves 1 - alpha_bar to 1e-4.
    resolved = (plain > 0) & (ab < 0.995)
    ratio = (ab / (1 - ab))[resolved] / (plain / (1 - plain))[resolved]
    torch.testing.assert_close(ratio, torch.full_like(ratio, factor), rtol=2e-4, atol=0)
    assert (ab.diff() < 0).all()
    if zero_terminal_snr:  # SNR 0 stays 0
        assert shifted.betas[-1].item() == 1.0 and ab[-1].item() == 0.0


def test_an_snr_shifted_schedule_round_trips_through_a_diffusers_scheduler_config():
    diffusion = {"schedule": {"zero_terminal_snr": True, "snr_shift": 16.0}, "prediction": "v"}
    sched = scheduler_config(diffusion)
    ours = NoiseSchedule(zero_terminal_snr=True, snr_shift=16.0)
    # diffusers takes the betas (its zero-SNR rescale of a table that already ends at SNR 0
    # changes them only by float32 rounding).
    ref = DDIMScheduler.from_config(sched)
    torch.testing.assert_close(ref.alphas_cumprod, ours.alphas_cumprod, rtol=1e-5, atol=1e-7)
    assert ref.alphas_cumprod[-1].item() == 0.0
    back = diffusion_from_scheduler(sched)
    assert back["schedule"]["snr_shift"] == 16.0 and back["schedule"]["zero_terminal_snr"]
    sched["trained_betas"][500] *= 1.01  # a table we did not write
    with pytest.raises(ValueError, match="trained_betas"):
        diffusion_from_scheduler(sched)
    assert "trained_betas" not in scheduler_config({"schedule": {}, "prediction": "eps"})


def test_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="beta schedule"):
        NoiseSchedule("quadratic")
    with pytest.raises(ValueError, match="spacing"):
        sampling_timesteps(1000, 10, "sideways")
    with pytest.raises(ValueError, match="steps"):
        sampling_timesteps(1000, 0)
    with pytest.raises(ValueError, match="snr_shift"):
        NoiseSchedule(snr_shift=0.0)
