import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddim import (
    rescale_zero_terminal_snr as diffusers_rescale,
)

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


def test_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="beta schedule"):
        NoiseSchedule("quadratic")
    with pytest.raises(ValueError, match="spacing"):
        sampling_timesteps(1000, 10, "sideways")
    with pytest.raises(ValueError, match="steps"):
        sampling_timesteps(1000, 0)
