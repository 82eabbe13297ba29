import pytest
import torch

from ldm.diffusion.objective import DiffusionObjective, q_sample, sample_noise, target_for, to_x0_eps
from ldm.diffusion.schedule import NoiseSchedule


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_exact_target_recovers_x0_and_eps(prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    alpha_bar = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.01, 0.3])
    x_t = q_sample(x0, eps, alpha_bar)
    x0_hat, eps_hat = to_x0_eps(prediction, target_for(prediction, x0, eps, alpha_bar), x_t, alpha_bar)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=1e-4, rtol=1e-4)


def test_v_target_closed_form():
    x0, eps, ab = torch.ones(1, 1, 1, 1), 2 * torch.ones(1, 1, 1, 1), torch.tensor([0.36])
    # v = sqrt(ab) eps - sqrt(1 - ab) x0 = 0.6 * 2 - 0.8 * 1
    assert target_for("v", x0, eps, ab).item() == pytest.approx(0.4)


def test_v_prediction_is_exact_at_zero_terminal_snr():
    """At alpha_bar = 0 the v form still gives x0 = -v and eps = x_t without dividing by zero."""
    x_t, v = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    x0, eps = to_x0_eps("v", v, x_t, torch.zeros(2))
    torch.testing.assert_close(x0, -v)
    torch.testing.assert_close(eps, x_t)


def test_offset_noise_adds_a_per_channel_constant():
    x0 = torch.zeros(512, 3, 8, 8)
    plain = sample_noise(x0, 0.0, torch.Generator().manual_seed(0))
    offset = sample_noise(x0, 1.0, torch.Generator().manual_seed(0))
    channel_means = offset.mean(dim=(2, 3))
    assert plain.mean(dim=(2, 3)).std() < 0.2  # 64 samples per mean: std 1/8
    assert 0.9 < channel_means.std() < 1.15     # variance 1 + 1/64 with the offset


def test_objective_is_mse_to_the_target_at_given_points():
    schedule = NoiseSchedule()
    objective = DiffusionObjective(schedule, prediction="v")
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    zero_model = lambda x, t, c: torch.zeros_like(x)
    expected = target_for("v", x0, eps, schedule.alpha_bar(t)).pow(2).mean()
    assert objective(zero_model, x0, None, t=t, eps=eps).item() == pytest.approx(expected.item(), rel=1e-6)


def test_objective_rejects_unknown_prediction():
    with pytest.raises(ValueError, match="prediction"):
        DiffusionObjective(NoiseSchedule(), prediction="score")


def test_timestep_sampling_uniform_and_logit_normal():
    from ldm.diffusion.objective import sample_timesteps
    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(100000, 1000, "uniform", generator=g)
    logit = sample_timesteps(100000, 1000, "logit_normal", generator=g)
    assert uniform.min() == 0 and uniform.max() == 999
    assert abs(uniform.float().mean().item() - 499.5) < 5
    assert 0 <= logit.min() and logit.max() <= 999
    # sigmoid(N(0, 1)): median 0.5, and 15.9% of the mass within 0.45..0.55 (10% if uniform).
    assert abs(logit.float().median().item() - 500) < 5
    assert 0.15 < ((logit >= 450) & (logit < 550)).float().mean().item() < 0.17
    with pytest.raises(ValueError, match="timestep sampling"):
        sample_timesteps(1, 1000, "beta")
