import pytest
import torch

from ldm.diffusion.objective import DiffusionObjective, q_sample, sample_noise
from ldm.diffusion.prediction import Prediction
from ldm.diffusion.schedule import NoiseSchedule


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_exact_target_recovers_x0_and_eps(prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    alpha_bar = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.01, 0.3])
    x_t = q_sample(x0, eps, alpha_bar)
    x0_hat, eps_hat = Prediction(prediction).to_x0_eps(
        Prediction(prediction).target(x0, eps, alpha_bar), x_t, alpha_bar
    )
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=1e-4, rtol=1e-4)


def test_v_target_closed_form():
    x0, eps, ab = torch.ones(1, 1, 1, 1), 2 * torch.ones(1, 1, 1, 1), torch.tensor([0.36])
    # v = sqrt(ab) eps - sqrt(1 - ab) x0 = 0.6 * 2 - 0.8 * 1
    assert Prediction("v").target(x0, eps, ab).item() == pytest.approx(0.4)


def test_v_prediction_is_exact_at_zero_terminal_snr():
    """At alpha_bar = 0 the v form still gives x0 = -v and eps = x_t without dividing by zero."""
    x_t, v = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    x0, eps = Prediction("v").to_x0_eps(v, x_t, torch.zeros(2))
    torch.testing.assert_close(x0, -v)
    torch.testing.assert_close(eps, x_t)


def test_offset_noise_adds_a_per_channel_constant():
    x0 = torch.zeros(512, 3, 8, 8)
    plain = sample_noise(x0, 0.0, torch.Generator().manual_seed(0))
    offset = sample_noise(x0, 1.0, torch.Generator().manual_seed(0))
    channel_means = offset.mean(dim=(2, 3))
    assert plain.mean(dim=(2, 3)).std() < 0.2  # 64 samples per mean: std 1/8
    assert 0.9 < channel_means.std() < 1.15  # variance 1 + 1/64 with the offset


def test_objective_is_mse_to_the_target_at_given_points():
    schedule = NoiseSchedule()
    objective = DiffusionObjective(schedule, prediction="v")
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    zero_model = lambda x, t, c: torch.zeros_like(x)
    expected = Prediction("v").target(x0, eps, schedule.alpha_bar(t)).pow(2).mean()
    assert objective(zero_model, x0, None, t=t, eps=eps).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


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


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_v_and_x0_round_trips_stay_finite_and_exact_at_zero_snr(prediction):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ab = torch.zeros(3)  # the last step of a zero-terminal-SNR schedule: x_t = eps
    x_t = q_sample(x0, eps, ab)
    x0_hat, eps_hat = Prediction(prediction).to_x0_eps(
        Prediction(prediction).target(x0, eps, ab), x_t, ab
    )
    assert torch.isfinite(x0_hat).all() and torch.isfinite(eps_hat).all()
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_eps_prediction_gives_eps_but_no_x0_at_zero_snr():
    """x_t = eps carries nothing of x0, and an eps output cannot say what x0 was: undefined (0/0),
    which is why zero-terminal-SNR schedules are paired with v (or x0) prediction."""
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    ab = torch.zeros(2)
    x0_hat, eps_hat = Prediction("eps").to_x0_eps(eps, q_sample(x0, eps, ab), ab)
    torch.testing.assert_close(eps_hat, eps)
    assert not torch.isfinite(x0_hat).any()


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_guidance_commutes_with_the_conversion_to_x0_eps(prediction):
    """Guiding in the network's own space equals guiding x0 and eps: the conversions are affine,
    so classifier-free guidance means the same thing for every prediction target."""
    from ldm.diffusion.guidance import guide

    g = torch.Generator().manual_seed(2)
    x_t, cond, uncond = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    ab = torch.tensor([0.9, 0.5, 0.05])
    guided = Prediction(prediction).to_x0_eps(guide(cond, uncond, 4.0), x_t, ab)
    c, u = (
        Prediction(prediction).to_x0_eps(cond, x_t, ab),
        Prediction(prediction).to_x0_eps(uncond, x_t, ab),
    )
    for got, want in zip(guided, (guide(c[0], u[0], 4.0), guide(c[1], u[1], 4.0))):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_input_perturbation_changes_x_t_but_not_the_target():
    schedule = NoiseSchedule()
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([10, 200, 600, 900])
    seen = []

    def zero_model(x, t, c):
        seen.append(x)
        return torch.zeros_like(x)

    plain = DiffusionObjective(schedule, "eps")(zero_model, x0, None, t=t, eps=eps)
    perturbed = DiffusionObjective(schedule, "eps", input_perturbation=0.1)(
        zero_model, x0, None, t=t, eps=eps, generator=torch.Generator().manual_seed(3)
    )
    assert perturbed.item() == pytest.approx(plain.item(), rel=1e-6)  # the target is still eps
    xi = torch.randn(eps.shape, generator=torch.Generator().manual_seed(3))
    ab = schedule.alpha_bar(t)
    torch.testing.assert_close(seen[0], q_sample(x0, eps, ab))
    torch.testing.assert_close(seen[1], q_sample(x0, eps + 0.1 * xi, ab))


def test_input_perturbation_is_drawn_fresh_each_training_step():
    objective = DiffusionObjective(NoiseSchedule(), "v", input_perturbation=0.1)
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([100, 500])
    seen = []
    model = lambda x, t, c: seen.append(x) or torch.zeros_like(x)
    objective(model, x0, None, t=t, eps=eps)
    objective(model, x0, None, t=t, eps=eps)
    assert not torch.equal(seen[0], seen[1])


def test_validation_metrics_are_the_same_for_one_denoiser_in_any_prediction_space():
    """mse_x0, mse_eps and loss_min_snr judge the implied (x0, eps), so an eps run and a v run
    that denoise alike score alike; `loss` is each run's own training loss and differs."""
    schedule = NoiseSchedule(zero_terminal_snr=False)  # eps is refused at SNR 0
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 500, 990])
    ab = schedule.alpha_bar(t)
    x0_guess = 0.7 * x0  # a shrinking denoiser; its eps follows from x_t
    x_t = q_sample(x0, eps, ab)
    eps_guess = (x_t - ab.sqrt().view(-1, 1, 1, 1) * x0_guess) / (1 - ab).sqrt().view(-1, 1, 1, 1)
    results = {}
    for prediction in ("eps", "v", "x0"):
        out = Prediction(prediction).target(x0_guess, eps_guess, ab)
        model = lambda x, t, c, out=out: out
        results[prediction] = DiffusionObjective(schedule, prediction).evaluate(
            model, x0, None, t, eps
        )
    torch.testing.assert_close(results["x0"]["mse_x0"], (0.3 * x0).pow(2).mean())
    for prediction in ("eps", "v"):
        for name in ("mse_x0", "mse_eps", "loss_min_snr"):
            torch.testing.assert_close(
                results[prediction][name], results["x0"][name], rtol=2e-3, atol=1e-5
            )
    # eps errors are SNR times x0 errors: 1000x at t=0, so the own-space losses cannot compare runs.
    assert results["eps"]["loss"] > 100 * results["x0"]["loss"]


def test_edm_preconditioning_at_unit_sigma_data_is_v_prediction():
    """Why `diffusion=edm` is not a separate objective here (see README, Ablations): with
    sigma_data = 1 (latents are scaled to unit variance), Karras et al. (2022, Table 1)'s
    c_in x_VE is the VP x_t, their network target (x0 - c_skip x_VE) / c_out is -v, and their
    weighting lambda(sigma) c_out^2 = 1 is uniform; only continuous sigma sampling differs."""
    g = torch.Generator().manual_seed(5)
    x0, n = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    ab = torch.tensor([0.99, 0.7, 0.2, 0.01], dtype=torch.float64)
    sigma = ((1 - ab) / ab).sqrt()  # VP alpha_bar <-> VE sigma
    c_skip, c_out, c_in = (
        1 / (sigma**2 + 1),
        sigma / (sigma**2 + 1).sqrt(),
        1 / (sigma**2 + 1).sqrt(),
    )
    weight = (sigma**2 + 1) / sigma**2  # lambda(sigma) at sigma_data = 1
    b = lambda a: a.view(-1, 1, 1, 1)
    x_ve = x0.double() + b(sigma) * n.double()
    torch.testing.assert_close(b(c_in) * x_ve, q_sample(x0.double(), n.double(), ab))
    torch.testing.assert_close(
        (x0.double() - b(c_skip) * x_ve) / b(c_out),
        -Prediction("v").target(x0.double(), n.double(), ab),
    )
    torch.testing.assert_close(weight * c_out**2, torch.ones_like(ab))


def test_eps_prediction_on_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        DiffusionObjective(NoiseSchedule(zero_terminal_snr=True), prediction="eps")
    DiffusionObjective(NoiseSchedule(zero_terminal_snr=False), prediction="eps")  # SD's setting
