import pytest
import torch

from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.sigmas import (
    discrete_sigmas,
    dpm_solver_timesteps,
    exponential_sigmas,
    interp_sigmas,
    karras_sigmas,
    sigma_to_t,
)


def test_sigma_to_t_inverts_the_log_sigma_interpolation():
    table = discrete_sigmas(NoiseSchedule().alphas_cumprod)
    ts = torch.tensor([0.0, 1.0, 17.25, 500.5, 998.9, 999.0], dtype=torch.float64)
    log_table = table.log().double()
    low = ts.floor().long().clamp(max=998)
    w = ts - low
    log_sigma = (1 - w) * log_table[low] + w * log_table[low + 1]
    torch.testing.assert_close(sigma_to_t(log_sigma.exp(), table.log()), ts, atol=1e-9, rtol=0)
    assert sigma_to_t(torch.tensor([1e-6, 1e6]), table.log()).tolist() == [0.0, 999.0]  # clamped
    torch.testing.assert_close(
        interp_sigmas(torch.tensor([3.0, 3.5]), table),
        torch.stack([table[3], (table[3] + table[4]) / 2]).double(),
    )


def test_zero_terminal_snr_gets_a_finite_sigma_max():
    table = discrete_sigmas(NoiseSchedule(zero_terminal_snr=True).alphas_cumprod)
    assert torch.isfinite(table).all() and table[-1].item() == pytest.approx(4096, rel=1e-6)


@pytest.mark.parametrize("make", [karras_sigmas, exponential_sigmas])
def test_respaced_sigmas_run_from_max_to_min(make):
    s = make(0.03, 14.6, 12)
    assert (
        len(s) == 12 and s[0].item() == pytest.approx(14.6) and s[-1].item() == pytest.approx(0.03)
    )
    assert (s[1:] < s[:-1]).all()


def test_dpm_solver_spacings():
    assert dpm_solver_timesteps(1000, 4, "linspace") == [999, 749, 500, 250]
    assert dpm_solver_timesteps(1000, 4, "leading", steps_offset=1) == [801, 601, 401, 201]
    assert dpm_solver_timesteps(1000, 4, "trailing") == [999, 749, 499, 249]
