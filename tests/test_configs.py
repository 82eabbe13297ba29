"""Every config composes and instantiates, and the shipped shapes VAE is what its record says."""

import contextlib

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.config import ROOT, register_resolvers
from ldm.shapes.render import render_sample, sample_rng
from ldm.training.vae_module import psnr

register_resolvers()


def compose_train(*overrides: str, hydra: bool = False):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("experiment=shapes_vae",),
        ("unet=tiny", "vae=tiny", "text_encoder=tiny"),
        ("vae=shapes_f4", "unet=shapes_f4"),
        ("debug=tiny_parts",),
        ("experiment=shapes_lora", "debug=tiny_parts", "init=weights.safetensors"),
    ],
)
def test_train_configs_instantiate(overrides):
    cfg = compose_train(*overrides)
    module = instantiate(cfg.model)
    assert module.configure_optimizers() is not None
    assert instantiate(cfg.data).batch_size > 0


EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
# values a recipe asks the user for (besides init= and the shards)
REQUIRED = {
    "sd15_dreambooth": ["instance_shards=shards/00000.tar", "class_prompt=a photo of a dog"],
    "sd15_textual_inversion": ["model.trains.word='<my-style>'"],
}
SAMPLERS = sorted(p.stem for p in (ROOT / "configs" / "sampler").glob("*.yaml") if p.stem != "base")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds(experiment):
    """Every recipe resolves, and its model and data module build (SD sizes on the meta device:
    no memory, no weights; `init` is the only value a user must give)."""
    cfg = compose_train(
        f"experiment={experiment}",
        *REQUIRED.get(experiment, []),
        "init=weights.safetensors",
        "data.train_shards=shards/00000.tar",
        hydra=True,
    )
    HydraConfig.instance().set_config(cfg)  # as a run would: ${hydra:...} resolves
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # Hydra's own node aside
    OmegaConf.to_container(plain, resolve=True)  # every interpolation resolves
    big = cfg.unet.model_channels >= 320
    with torch.device("meta") if big else contextlib.nullcontext():
        parts = {k: instantiate(cfg[k]) for k in ("unet", "vae", "text_encoder") if k in cfg.model}
    module = instantiate(cfg.model, **parts)
    assert module.configure_optimizers() is not None
    assert instantiate(cfg.data).batch_size > 0


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_config_composes(name):
    from ldm.diffusion.samplers import SamplerConfig

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("sample", overrides=[f"sampler={name}", "ckpt=x", "prompt=y", "steps=7"])
    sampler = instantiate(cfg.sampler)
    assert isinstance(sampler, SamplerConfig) and sampler.name == name and sampler.steps == 7


def test_experiments_override_the_primary_config():
    cfg = compose_train("experiment=shapes_vae")
    assert cfg.export_dtype == "float16" and cfg.data.batch_size == 32


# The shipped shapes first stages: (config, latent side, PSNR floor below the recorded value
# on the palette validation images, data/shapes/VAE.md).
SHIPPED_VAES = {"shapes": (8, 26.0), "shapes_f4": (16, 27.5)}  # recorded 26.32 / 28.25 dB


@pytest.fixture(scope="module", params=sorted(SHIPPED_VAES))
def shipped_vae(request):
    return request.param, instantiate(compose_train(f"vae={request.param}").vae).eval()


def test_shipped_shapes_vae_reconstructs_at_its_recorded_quality(shipped_vae):
    name, vae = shipped_vae
    side, floor = SHIPPED_VAES[name]
    images = [np.asarray(render_sample(sample_rng(7, "val", i))[0]) for i in range(64)]
    x = (
        torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    )  # (64, 3, 64, 64)
    with torch.no_grad():
        latents = vae.encode(x, sample=False)
        recon = vae.decode(latents)
    assert latents.shape == (64, 4, side, side)
    assert psnr(recon, x).mean() > floor
    # The configured scale/shift whiten the latents for the diffusion model.
    assert abs(latents.std().item() - 1) < 0.1 and abs(latents.mean().item()) < 0.1


def test_shipped_shapes_vae_keeps_pastel_colours(shipped_vae):
    """Fine-tunes to a style need a first stage that can draw it (data/shapes/VAE.md)."""
    from ldm.shapes.pastel import pastel_image, styled
    from ldm.shapes.pastel_judge import score_style
    from ldm.shapes.render import caption

    _, vae = shipped_vae
    samples = [render_sample(sample_rng(7, "val", i)) for i in range(64)]
    images = [np.asarray(pastel_image(im)) for im, _ in samples]
    prompts = [styled(caption(m["shape_colour"], m["shape"], m["background"])) for _, m in samples]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        recon = vae.decode(vae.encode(x, sample=False))
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    result = score_style(list(recon.numpy()), prompts)
    assert result["pastel"] >= 0.95 and result["background"] >= 0.95  # recorded: 1.00 / 1.00


def test_the_sdxl_parts_configs():
    """unet=sdxl, vae=sdxl and text_encoder=sdxl compose; built on the meta device, the U-Net is
    SDXL base's (2,567,463,684 parameters) and the VAE SD's shape scaled by 0.13025."""
    cfg = compose_train("unet=sdxl", "vae=sdxl", "text_encoder=sdxl")
    with torch.device("meta"):
        unet, vae = instantiate(cfg.unet), instantiate(cfg.vae)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert hasattr(unet, "label_emb") and unet.transformer_depth == (0, 2, 10)
    assert vae.scale_factor == 0.13025 and sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert [e.model_name for e in cfg.text_encoder.embedders] == ["ViT-L-14", "ViT-bigG-14"]
