"""Our Pipeline against diffusers' StableDiffusionXLPipeline on a small SDXL folder diffusers
wrote itself (two text towers, micro-conditioned U-Net, the SDXL VAE scale): same folder, prompt
and starting noise, the empty negative prompt read as zeros by both (force_zeros_for_empty_prompt),
default micro-conditioning ((H, W), (0, 0), (H, W)). Then the same through our exporter: the folder
we write loads in StableDiffusionXLPipeline and gives the same images. Offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.checkpoints import load_model
from ldm.checkpoints.export import save_diffusers
from ldm.diffusion.samplers import SamplerConfig
from ldm.models.text_encoder import DualTextEncoder
from ldm.pipeline import Pipeline, initial_noise, seed_generators
from sd_fixtures import SDXL_POOLED, sdxl_diffusers_folder

diffusers = pytest.importorskip("diffusers")

PROMPT, SEED, STEPS, CFG, SIZE = "a red circle on a blue background", 0, 10, 5.0, 32
SCHEDULERS = {  # our sampler -> the diffusers scheduler it reproduces
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, single_thread):
    root = tmp_path_factory.mktemp("sdxl")
    ref = sdxl_diffusers_folder(root / "pipe")
    ref.set_progress_bar_config(disable=True)
    return root, ref


def reference_images(ref, noise: torch.Tensor, name: str, output_type: str):
    # SDXL's published scheduler_config.json says clip_sample and set_alpha_to_one false (an
    # Euler config has neither, and DDIM's defaults are true)
    ref.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(
        ref.scheduler.config, clip_sample=False, set_alpha_to_one=False
    )
    return ref(
        PROMPT,
        latents=noise.clone(),
        output_type=output_type,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
    ).images


def compare(ours: Pipeline, ref, name: str) -> None:
    c, f = ours.vae.post_quant_conv.in_channels, ours.vae.downsample_factor
    noise = initial_noise(seed_generators([SEED]), (c, SIZE // f, SIZE // f), torch.device("cpu"))
    sampler = SamplerConfig(name=name, steps=STEPS, cfg_scale=CFG, spacing="leading")
    with torch.no_grad():
        got = ours.latents([PROMPT], [SEED], sampler, [""], SIZE, SIZE)
        torch.testing.assert_close(
            got, reference_images(ref, noise, name, "latent"), atol=1e-4, rtol=1e-4
        )
        image = ours([PROMPT], [SEED], sampler, [""], SIZE, SIZE)[0].numpy().astype(np.int32)
        ref_image = reference_images(ref, noise, name, "np")[0]
    diff = np.abs(image - np.round(ref_image * 255).astype(np.int32))
    assert diff.max() <= 1, f"{name}: images differ by up to {diff.max()}/255"  # uint8 rounding


def test_a_diffusers_sdxl_folder_is_read_as_sdxl(folders):
    root, _ = folders
    model = load_model(root / "pipe")
    assert isinstance(model.text_encoder, DualTextEncoder)
    first, second = model.text_encoder.embedders
    assert (first.pad_with_eot, second.pad_with_eot) == (True, False)
    assert (first.layer, first.final_norm, second.model.text_projection.shape) == (
        "penultimate",
        False,
        (48, 48),
    )
    assert model.config["unet"]["adm_in_channels"] == SDXL_POOLED + 6 * 256
    assert model.vae.scale_factor == pytest.approx(0.13025)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_sdxl_latents_and_images_match_diffusers_pipeline(folders, name):
    root, ref = folders
    ours, _ = Pipeline.load(str(root / "pipe"), "cpu", "32-true")
    compare(ours, ref, name)


def test_our_sdxl_folder_loads_in_diffusers_and_round_trips(folders):
    root, _ = folders
    model = load_model(root / "pipe")
    out = save_diffusers(root / "ours", model)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(
        out, local_files_only=True, dtype=torch.float32
    )
    ref.set_progress_bar_config(disable=True)
    assert ref.config.force_zeros_for_empty_prompt
    ours, _ = Pipeline.load(str(out), "cpu", "32-true")
    compare(ours, ref, "euler")
    again = load_model(out)
    for name, part in model.parts().items():
        theirs = again.parts()[name].state_dict()
        for key, value in part.state_dict().items():
            assert torch.equal(value, theirs[key]), f"{name}.{key} changed in the round trip"
