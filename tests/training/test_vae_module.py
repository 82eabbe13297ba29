"""Tests of the autoencoder training module on tiny models and random data."""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.models.autoencoder import AutoencoderKL
from ldm.training.vae_module import AutoencoderTraining, psnr

pytestmark = pytest.mark.usefixtures("single_thread")


class RandomImages(Dataset):
    """Smooth random images in [-1, 1] (low-frequency, so a tiny model can fit them)."""

    def __init__(self, n: int, size: int = 16, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.rand(n, 3, size // 4, size // 4, generator=generator) * 2 - 1
        self.images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "caption": f"image {i}"}


def tiny_module(**overrides) -> AutoencoderTraining:
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(
        ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, resolution=16
    )
    kwargs = dict(optimizer=functools.partial(torch.optim.Adam, lr=2e-3))
    kwargs.update(overrides)
    return AutoencoderTraining(autoencoder, **kwargs)


def make_trainer(**overrides) -> L.Trainer:
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def loader(n: int = 8, batch_size: int = 4) -> DataLoader:
    return DataLoader(RandomImages(n), batch_size=batch_size)


def test_psnr_known_values():
    target = torch.zeros(2, 3, 4, 4)
    # An error of 0.2 in [-1, 1] is 0.1 in [0, 1]: MSE 0.01 -> 20 dB.
    torch.testing.assert_close(psnr(target + 0.2, target), torch.full((2,), 20.0))
    assert psnr(target, target).min() >= 99.0  # perfect reconstruction stays finite


def test_training_reduces_loss():
    module = tiny_module()
    trainer = make_trainer()
    before = trainer.validate(module, loader(), verbose=False)[0]

    trainer = make_trainer(max_steps=20)
    trainer.fit(module, train_dataloaders=loader())
    assert {"train/rec_loss", "train/kl", "train/loss"} <= set(trainer.callback_metrics)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])

    after = make_trainer().validate(module, loader(), verbose=False)[0]
    assert after["val/rec_loss"] < 0.75 * before["val/rec_loss"]
    assert after["val/psnr"] > before["val/psnr"] + 1.0


def test_validation_latent_statistics_match_manual_computation():
    module = tiny_module()
    data = loader(n=6, batch_size=4)  # uneven batches: the stats must weight by element
    metrics = make_trainer().validate(module, data, verbose=False)[0]

    with torch.no_grad():
        z = torch.cat([module.autoencoder.posterior(b["image"]).mode() for b in data]).double()
    assert metrics["val/latent_mean"] == pytest.approx(z.mean().item(), rel=1e-5, abs=1e-6)
    assert metrics["val/latent_std"] == pytest.approx(z.std(unbiased=False).item(), rel=1e-5)
    scale, shift = module.latent_scale_and_shift()
    assert scale == pytest.approx(1 / metrics["val/latent_std"], rel=1e-6)
    assert shift == pytest.approx(metrics["val/latent_mean"], rel=1e-6, abs=1e-9)
    assert math.isfinite(metrics["val/psnr"])


def test_lr_scheduler_steps_every_step():
    halve_every_step = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    module = tiny_module(lr_scheduler=halve_every_step)
    trainer = make_trainer(max_steps=3)
    trainer.fit(module, train_dataloaders=loader())
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(2e-3 * 0.5**3)


def test_fast_dev_run_with_validation():
    module = tiny_module(kl_weight=1e-3, l1_weight=0.0, l2_weight=1.0)
    trainer = make_trainer(fast_dev_run=2)
    trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader())
    expected = {"val/psnr", "val/rec_loss", "val/latent_std", "val/latent_mean"}
    assert expected <= set(trainer.callback_metrics)
    assert module.latent_std is not None and module.latent_std > 0
