import pytest
import torch

from ldm.diffusion.objective import DiffusionObjective, q_sample
from ldm.diffusion.prediction import Prediction
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.weighting import (
    WEIGHTINGS,
    get_weighting,
    min_snr,
    register,
    snr_from_alpha_bar,
)

SNR = torch.tensor([0.0, 1.0, 4.0, 9.0, 100.0])


def test_snr_from_alpha_bar_closed_form():
    ab = torch.tensor([0.0, 0.5, 0.8, 0.9])
    torch.testing.assert_close(snr_from_alpha_bar(ab), torch.tensor([0.0, 1.0, 4.0, 9.0]))


@pytest.mark.parametrize(
    "prediction,expected",
    [
        # min(SNR, 5) / SNR, with its limit 1 at SNR = 0
        ("eps", [1.0, 1.0, 1.0, 5 / 9, 5 / 100]),
        # min(SNR, 5) / (SNR + 1)
        ("v", [0.0, 1 / 2, 4 / 5, 5 / 10, 5 / 101]),
        # min(SNR, 5)
        ("x0", [0.0, 1.0, 4.0, 5.0, 5.0]),
    ],
)
def test_min_snr_matches_hand_computed_values(prediction, expected):
    torch.testing.assert_close(min_snr(SNR, prediction, 5.0), torch.tensor(expected))


def test_min_snr_gamma_moves_the_clip():
    torch.testing.assert_close(min_snr(SNR, "x0", 1.0), torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(
        min_snr(SNR, "eps", 1.0), torch.tensor([1.0, 1.0, 0.25, 1 / 9, 0.01])
    )


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_uniform_is_one(prediction):
    torch.testing.assert_close(get_weighting("uniform")(SNR, prediction, 5.0), torch.ones(5))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_every_weighting_is_finite_on_a_zero_terminal_snr_schedule(prediction):
    schedule = NoiseSchedule(zero_terminal_snr=True)
    snr = snr_from_alpha_bar(schedule.alphas_cumprod)
    assert snr[-1].item() == 0.0
    for name, fn in WEIGHTINGS.items():
        assert torch.isfinite(fn(snr, prediction, 5.0)).all(), name


def test_min_snr_is_one_x0_space_loss_in_three_parameterisations():
    """Hang et al.'s weight is min(SNR, gamma) on the x0 error: the eps and v forms must give the
    same number for the same denoiser output (here a noisy guess of x0, converted to each space)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    ab = torch.tensor([0.999, 0.8, 0.5, 0.1, 0.001])
    x_t = q_sample(x0, eps, ab)
    x0_guess = x0 + 0.3 * torch.randn(x0.shape, generator=g)
    eps_guess = (x_t - ab.sqrt().view(-1, 1, 1, 1) * x0_guess) / (1 - ab).sqrt().view(-1, 1, 1, 1)
    snr = snr_from_alpha_bar(ab)
    losses = {}
    for prediction in ("eps", "v", "x0"):
        out = Prediction(prediction).target(
            x0_guess, eps_guess, ab
        )  # this guess in `prediction` space
        err = (out - Prediction(prediction).target(x0, eps, ab)).pow(2).flatten(1).mean(1).double()
        losses[prediction] = min_snr(snr, prediction, 5.0).double() * err
    torch.testing.assert_close(losses["eps"], losses["x0"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["v"], losses["x0"], rtol=1e-4, atol=1e-6)


def test_objective_applies_the_weight_per_sample():
    schedule = NoiseSchedule()
    objective = DiffusionObjective(
        schedule, prediction="eps", weighting="min_snr", min_snr_gamma=5.0
    )
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 300, 999])
    zero_model = lambda x, t, c: torch.zeros_like(x)
    w = min_snr(snr_from_alpha_bar(schedule.alpha_bar(t)), "eps", 5.0)
    expected = (w * eps.pow(2).flatten(1).mean(1)).mean()
    assert objective(zero_model, x0, None, t=t, eps=eps).item() == pytest.approx(
        expected.item(), rel=1e-6
    )
    assert w[0] < 0.01 and w[2] == 1.0  # t=0 is nearly clean: SNR ~ 1000, eps weight ~ 5/1000


def test_a_new_weighting_is_one_registered_function():
    @register("test_snr_plus_one")
    def snr_plus_one(snr, prediction, gamma):
        return snr + 1

    try:
        objective = DiffusionObjective(NoiseSchedule(), weighting="test_snr_plus_one")
        t = torch.tensor([999])
        ab = NoiseSchedule().alpha_bar(t)
        assert objective.loss_weight(t).item() == pytest.approx(
            (ab / (1 - ab)).item() + 1, rel=1e-6
        )
    finally:
        del WEIGHTINGS["test_snr_plus_one"]


def test_unknown_weighting_is_a_clear_error():
    with pytest.raises(ValueError, match="loss weighting 'snr_squared'.*min_snr"):
        DiffusionObjective(NoiseSchedule(), weighting="snr_squared")
