"""What every sampler must do, checked against closed forms rather than another implementation:
sample a known Gaussian, depend on each image's seed only, batch guidance into one network call."""

import math

import pytest
import torch

from ldm.diffusion.guidance import make_denoiser
from ldm.diffusion.samplers import SAMPLERS, SIGMA_SAMPLERS, sample
from ldm.diffusion.schedule import NoiseSchedule

VARIANTS = [(name, None) for name in SAMPLERS] + [
    (name, s) for name in SIGMA_SAMPLERS for s in ("karras", "exponential")
]


def gaussian_denoiser(mu: torch.Tensor, std: torch.Tensor):
    """The exact E[x0 | x_t] (and the eps it implies) for data x0 ~ N(mu, diag(std^2)): per
    dimension, x0 and x_t = a x0 + b eps are jointly Gaussian, so the posterior mean is linear."""

    def denoiser(x_t, t, alpha_bar):
        a, b2 = alpha_bar**0.5, 1 - alpha_bar
        x0 = mu + a * std**2 / (a**2 * std**2 + b2) * (x_t - a * mu)
        return x0, (x_t - a * x0) / b2**0.5

    return denoiser


# First-order samplers shrink the data's spread by O(1/steps) (6% for DDIM at 50 steps here),
# second-order ones by O(1/steps^2): each gets the steps that bring it under the tolerance.
STEPS = {
    "ddpm": 500,
    "ddim": 500,
    "euler": 500,
    "euler_ancestral": 500,
    "heun": 50,
    "dpmpp_2m": 50,
    "dpmpp_2m_sde": 200,
}


@pytest.mark.parametrize("name,sigmas", VARIANTS)
def test_samplers_reproduce_a_gaussian_with_the_exact_denoiser(name, sigmas):
    # DDPM's linear schedule ends at alpha_bar = 4e-5, so N(0, I) is the true prior at T up to
    # a mean of 0.006 mu: the only error left is the sampler's (and Monte Carlo's).
    schedule = NoiseSchedule("linear", beta_start=1e-4, beta_end=0.02)
    mu, std = torch.tensor([1.0, -0.5, 0.0]), torch.tensor([0.5, 1.5, 0.8])
    n = 10000
    noise = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    x = sample(
        name,
        gaussian_denoiser(mu, std),
        noise,
        schedule.alphas_cumprod,
        STEPS[name],
        sigmas=sigmas,
        generator=torch.Generator().manual_seed(1),
    )
    # 4 standard errors of each estimate for n samples, plus 1% of std for discretisation
    assert ((x.mean(0) - mu).abs() < 4 * std / math.sqrt(n) + 0.01 * std).all(), (x.mean(0), mu)
    assert ((x.std(0) / std - 1).abs() < 4 / math.sqrt(2 * n) + 0.01).all(), (x.std(0), std)
    corr = torch.corrcoef(x.T)
    assert (corr - torch.eye(3)).abs().max() < 4 / math.sqrt(n), corr


def test_first_order_sampling_error_shrinks_with_steps():
    """The check above can fail: DDIM's spread shrinks visibly at 10 steps, far less at 100."""
    schedule = NoiseSchedule("linear", beta_start=1e-4, beta_end=0.02)
    mu, std = torch.zeros(1), torch.ones(1)
    noise = torch.randn(10000, 1, generator=torch.Generator().manual_seed(0))
    shrink = {
        n: 1
        - sample("ddim", gaussian_denoiser(mu, std), noise, schedule.alphas_cumprod, n).std().item()
        for n in (10, 100)
    }
    assert shrink[10] > 0.1 and abs(shrink[100]) < 0.3 * shrink[10], shrink


def rowwise_denoiser():
    """A nonlinear denoiser that treats each batch row on its own (so batching cannot change
    a row's numbers), in the (x_t, t, alpha_bar) interface."""

    def denoiser(x_t, t, alpha_bar):
        eps = torch.tanh(x_t) * (0.5 + float(t) / 1000)
        return (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5, eps

    return denoiser


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_an_image_depends_on_its_seed_only_not_on_its_batch(name):
    schedule = NoiseSchedule()

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.cat([torch.randn(1, 4, 6, 6, generator=g) for g in gens])
        return sample(
            name,
            rowwise_denoiser(),
            noise,
            schedule.alphas_cumprod,
            5,
            eta=1.0 if name == "ddim" else 0.0,
            generator=gens,
        )

    alone, batched, again = run([3]), run([5, 3, 7]), run([3, 9])
    assert torch.equal(alone[0], batched[1]) and torch.equal(alone[0], again[0])
    assert not torch.equal(batched[0], batched[1])


def test_stochastic_samplers_use_their_noise():
    """Same starting noise, other per-step noise: another image (else the noise is unused)."""
    schedule = NoiseSchedule()
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    for name, extra in [
        ("ddpm", {}),
        ("ddim", {"eta": 1.0}),
        ("euler_ancestral", {}),
        ("dpmpp_2m_sde", {}),
    ]:
        a, b = (
            sample(
                name,
                rowwise_denoiser(),
                noise,
                schedule.alphas_cumprod,
                5,
                generator=torch.Generator().manual_seed(s),
                **extra,
            )
            for s in (1, 2)
        )
        assert not torch.allclose(a, b), name


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_guidance_is_one_batched_network_call_per_evaluation(name):
    calls = []

    def model(x, t, context):
        calls.append((x.shape[0], t.dtype))
        return torch.tanh(x) * context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    schedule = NoiseSchedule()
    cond, uncond = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    denoiser = make_denoiser(model, schedule, "eps", cond, uncond, cfg_scale=5.0, cfg_rescale=0.7)
    sample(name, denoiser, torch.randn(3, 4, 6, 6), schedule.alphas_cumprod, 4, sigmas=None)
    evaluations = 7 if name == "heun" else 4  # Heun: two per step except the last
    assert calls == [(6, torch.float32)] * evaluations


def test_bad_sampler_options_are_clear_errors():
    ab = NoiseSchedule().alphas_cumprod
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="unknown sampler 'eulr'.*euler"):
        sample("eulr", rowwise_denoiser(), x, ab, 4)
    with pytest.raises(ValueError, match="sigmas='karras' applies to the sigma-space samplers"):
        sample("ddim", rowwise_denoiser(), x, ab, 4, sigmas="karras")
    with pytest.raises(ValueError, match="eta=0.5 applies to ddim only"):
        sample("euler", rowwise_denoiser(), x, ab, 4, eta=0.5)
    with pytest.raises(ValueError, match="unknown sigma spacing 'karas'"):
        sample("heun", rowwise_denoiser(), x, ab, 4, sigmas="karas")
    with pytest.raises(ValueError, match="steps must be in 1..1000"):
        sample("dpmpp_2m", rowwise_denoiser(), x, ab, 0)
