import pytest
import torch
from diffusers import DDIMScheduler

from ldm.diffusion.guidance import guide, make_denoiser
from ldm.diffusion.samplers import sample_ddim
from ldm.diffusion.schedule import NoiseSchedule, sampling_timesteps


def toy_model(x, t, context):
    """A smooth, timestep- and context-dependent stand-in for a U-Net."""
    scale = (t.float() / 1000).reshape(-1, 1, 1, 1)
    return torch.tanh(x) * (0.5 + scale) + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction,diffusers_type", [("eps", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers_step_by_step(prediction, diffusers_type, eta):
    schedule = NoiseSchedule("scaled_linear")
    ref = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=diffusers_type,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
    )
    ref.set_timesteps(10)
    ts = sampling_timesteps(1000, 10, "trailing")
    assert ts == ref.timesteps.tolist()
    context = torch.randn(2, 3, 8)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    denoiser = make_denoiser(toy_model, schedule, prediction, context)

    # The same noise for both: diffusers draws its variance noise from the generator too.
    ours_states, ref_states = [], []
    sample_ddim(
        denoiser,
        x.clone(),
        ts,
        schedule.alphas_cumprod,
        eta=eta,
        generator=torch.Generator().manual_seed(1),
        callback=lambda i, x_, _: ours_states.append(x_),
    )
    g, y = torch.Generator().manual_seed(1), x.clone()
    for t in ref.timesteps:
        out = toy_model(y, t.repeat(2), context)
        y = ref.step(out, t, y, eta=eta, generator=g).prev_sample
        ref_states.append(y)
    for a, b in zip(ours_states[:-1], ref_states[:-1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_two_step_sampling_is_deterministic_for_a_seed():
    schedule = NoiseSchedule(zero_terminal_snr=True)
    denoiser = make_denoiser(toy_model, schedule, "v", torch.randn(2, 3, 8))
    run = lambda seed: sample_ddim(
        denoiser,
        torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)),
        sampling_timesteps(1000, 2),
        schedule.alphas_cumprod,
        eta=1.0,
        generator=torch.Generator().manual_seed(seed),
    )
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_guided_denoiser_batches_cond_and_uncond_in_one_call():
    calls = []

    def model(x, t, c):
        calls.append(x.shape[0])
        return toy_model(x, t, c)

    schedule = NoiseSchedule()
    cond, uncond = torch.randn(2, 3, 8), torch.zeros(2, 3, 8)
    x = torch.randn(2, 4, 8, 8)
    x0, eps = make_denoiser(model, schedule, "eps", cond, uncond, cfg_scale=3.0)(x, 500)
    assert calls == [4]
    t = torch.full((2,), 500)
    expected = toy_model(x, t, uncond) + 3.0 * (toy_model(x, t, cond) - toy_model(x, t, uncond))
    torch.testing.assert_close(eps, expected)


def test_guidance_rescale_restores_the_conditional_std():
    cond, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    full = guide(cond, uncond, 7.0, rescale=1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    torch.testing.assert_close(guide(cond, uncond, 7.0, 0.0), uncond + 7.0 * (cond - uncond))


def test_denoiser_takes_fractional_timesteps_at_the_noise_level_it_is_given():
    seen = []

    def model(x, t, c):
        seen.append(t)
        return toy_model(x, t, c)

    x = torch.randn(2, 4, 8, 8)
    denoiser = make_denoiser(model, NoiseSchedule(), "eps", torch.randn(2, 3, 8))
    x0, eps = denoiser(x, torch.tensor(412.37), torch.tensor(0.3))
    assert seen[0].dtype == torch.float32 and torch.allclose(seen[0], torch.full((2,), 412.37))
    torch.testing.assert_close(x0, (x - 0.7**0.5 * eps) / 0.3**0.5)
    with pytest.raises(ValueError, match="alpha_bar is needed at the fractional timestep 412.5"):
        denoiser(x, 412.5)
