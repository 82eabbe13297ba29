"""Our Pipeline against diffusers' own StableDiffusionPipeline, end to end, on tiny SD 1 (eps) and
SD 2 (v) folders written by our exporter: same folder, prompt and starting noise, each sampler
against its diffusers scheduler built from the folder's scheduler_config.json (set_alpha_to_one
false, steps_offset 1, leading spacing, as in every SD 1.x/2.x folder). Latents are compared
before the VAE (a tiny VAE can hide latent errors) and images after it. Offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.checkpoints import layout, load_model
from ldm.checkpoints.export import save_diffusers
from ldm.diffusion.samplers import SamplerConfig
from ldm.pipeline import Pipeline, initial_noise, seed_generators
from sd_fixtures import sd_parts

diffusers = pytest.importorskip("diffusers")

PROMPT, SEED, STEPS, CFG, SIZE = "a red circle on a blue background", 0, 12, 4.0, 32
SCHEDULERS = {  # our sampler -> the diffusers scheduler it reproduces
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",  # its defaults: dpmsolver++, order 2
}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pipes(request, tmp_path_factory, single_thread):
    """(ours, diffusers') pipelines of one tiny folder written by our exporter."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model = load_model(
        layout.save(root / "m.safetensors", sd_parts(family)),
        prediction="v" if family == "sd2" else None,
    )
    folder = save_diffusers(root / "pipe", model)
    ours, _ = Pipeline.load(str(folder), "cpu", "32-true")
    assert ours.prediction == ("v" if family == "sd2" else "eps")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        folder,
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=True,
        dtype=torch.float32,
    )
    ref.set_progress_bar_config(disable=True)
    sched = ref.scheduler.config
    assert (sched.set_alpha_to_one, sched.steps_offset, sched.timestep_spacing) == (
        False,
        1,
        "leading",
    )
    assert sched.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    return ours, ref


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_latents_and_images_match_diffusers_pipeline(pipes, name):
    ours, ref = pipes
    ref.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(ref.scheduler.config)
    # The starting noise our Pipeline draws for this seed, handed to diffusers as its latents
    # (which scales them by init_noise_sigma, as our sigma-space samplers do).
    c, f = ours.vae.post_quant_conv.in_channels, ours.vae.downsample_factor
    noise = initial_noise(seed_generators([SEED]), (c, SIZE // f, SIZE // f), torch.device("cpu"))
    sampler = SamplerConfig(name=name, steps=STEPS, cfg_scale=CFG, spacing="leading")
    args = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=CFG)
    with torch.no_grad():
        got = ours.latents([PROMPT], [SEED], sampler, None, SIZE, SIZE)
        want = ref(PROMPT, latents=noise.clone(), output_type="latent", **args).images
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        image = ours([PROMPT], [SEED], sampler, None, SIZE, SIZE)[0].numpy().astype(np.int32)
        ref_image = ref(PROMPT, latents=noise.clone(), output_type="np", **args).images[0]
    diff = np.abs(image - np.round(ref_image * 255).astype(np.int32))
    assert diff.max() <= 1, f"{name}: images differ by up to {diff.max()}/255"  # uint8 rounding
