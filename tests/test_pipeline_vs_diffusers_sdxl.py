"""Our Pipeline against diffusers' StableDiffusionXLPipeline on a small SDXL folder diffusers
wrote itself (two text towers, micro-conditioned U-Net, the SDXL VAE scale): same folder, prompt
and starting noise, the empty negative prompt read as zeros by both (force_zeros_for_empty_prompt),
default micro-conditioning ((H, W), (0, 0), (H, W)). Then the same through our exporter: the folder
we write loads in StableDiffusionXLPipeline and gives the same images. Offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

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


def reference_images(ref, noise: torch.Tensor, name: str, output_type: str, **micro):
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
        **micro,
    ).images


def start_noise(ours: Pipeline) -> torch.Tensor:
    c, f = ours.vae.post_quant_conv.in_channels, ours.vae.downsample_factor
    return initial_noise(seed_generators([SEED]), (c, SIZE // f, SIZE // f), torch.device("cpu"))


def compare(ours: Pipeline, ref, name: str) -> None:
    noise = start_noise(ours)
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
    assert model.vae.fp16_safe is False  # diffusers' force_upcast (default true)


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
    assert ref.config.force_zeros_for_empty_prompt and ref.vae.config.force_upcast
    ours, _ = Pipeline.load(str(out), "cpu", "32-true")
    compare(ours, ref, "euler")
    again = load_model(out)
    for name, part in model.parts().items():
        theirs = again.parts()[name].state_dict()
        for key, value in part.state_dict().items():
            assert torch.equal(value, theirs[key]), f"{name}.{key} changed in the round trip"


def sample_py(root, out, *overrides) -> np.ndarray:
    """The image `python sample.py ckpt=FOLDER ...` writes (configs/sample.yaml, as composed)."""
    from hydra import compose, initialize_config_dir

    from ldm.config import ROOT
    from ldm.sampling import sample_from_config

    options = [f"ckpt={root / 'pipe'}", f"prompt={PROMPT}", "n=1", f"seed={SEED}"]
    options += [f"steps={STEPS}", f"cfg_scale={CFG}", f"height={SIZE}", f"width={SIZE}"]
    options += ["device=cpu", "precision=32-true", f"out_dir={out}", "sampler.spacing=leading"]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("sample", overrides=[*options, *overrides])
    sample_from_config(cfg)
    return np.asarray(Image.open(out / f"{SEED:06d}.png")).astype(np.int32)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_sample_py_on_an_sdxl_folder_gives_diffusers_image(folders, name, tmp_path):
    root, ref = folders
    got = sample_py(root, tmp_path, f"sampler={name}", "sampler.sigmas=null")
    ours, _ = Pipeline.load(str(root / "pipe"), "cpu", "32-true")
    expected = reference_images(ref, start_noise(ours), name, "np")[0]
    diff = np.abs(got - np.round(expected * 255).astype(np.int32))
    assert diff.max() <= 3, f"{name}: sample.py's image differs by up to {diff.max()}/255"


def test_the_micro_conditioning_crop_moves_the_image_as_in_diffusers(folders, tmp_path):
    """crop=[16,8] original_size=[64,48]: diffusers' crops_coords_top_left and original_size;
    the image is another than at the default micro-conditioning, and the same as diffusers'."""
    root, ref = folders
    default = sample_py(root, tmp_path / "a", "sampler=euler")
    cropped = sample_py(
        root, tmp_path / "b", "sampler=euler", "crop=[16,8]", "original_size=[64,48]"
    )
    ours, _ = Pipeline.load(str(root / "pipe"), "cpu", "32-true")
    expected = reference_images(
        ref, start_noise(ours), "euler", "np", crops_coords_top_left=(16, 8), original_size=(64, 48)
    )[0]
    assert np.abs(cropped - np.round(expected * 255).astype(np.int32)).max() <= 3
    # (random weights: the size of the change means nothing; that there is one, beyond rounding)
    assert np.abs(cropped - default).mean() > 1.0, "the micro-conditioning changed nothing"
    meta = Image.open(tmp_path / "b" / f"{SEED:06d}.png").text
    assert (meta["crop"], meta["original_size"]) == ("[16, 8]", "[64, 48]")
