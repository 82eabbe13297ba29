"""Every config composes and instantiates, and the shipped shapes VAE is what its record says."""
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm.config import ROOT, register_resolvers
from ldm.data.shapes import render_sample, sample_rng
from ldm.vae_module import psnr

register_resolvers()


def compose_train(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("overrides", [(), ("experiment=shapes_vae",),
                                       ("unet=tiny", "vae=tiny", "text_encoder=tiny")])
def test_train_configs_instantiate(overrides):
    cfg = compose_train(*overrides)
    module = instantiate(cfg.model)
    assert module.configure_optimizers() is not None
    assert instantiate(cfg.data).batch_size > 0


def test_experiments_override_the_primary_config():
    cfg = compose_train("experiment=shapes_vae")
    assert cfg.export_dtype == "float16" and cfg.data.batch_size == 32


@pytest.fixture(scope="module")
def shipped_vae():
    return instantiate(compose_train().vae).eval()


def test_shipped_shapes_vae_reconstructs_at_its_recorded_quality(shipped_vae):
    images = [np.asarray(render_sample(sample_rng(7, "val", i))[0]) for i in range(64)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (64, 3, 64, 64)
    with torch.no_grad():
        latents = shipped_vae.encode(x, sample=False)
        recon = shipped_vae.decode(latents)
    assert latents.shape == (64, 4, 8, 8)
    assert psnr(recon, x).mean() > 26.0  # recorded: 26.87 dB on the validation shards
    # The configured scale/shift whiten the latents for the diffusion model.
    assert abs(latents.std().item() - 1) < 0.1 and abs(latents.mean().item()) < 0.1
