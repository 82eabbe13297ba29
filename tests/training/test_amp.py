"""Every precision trains with the default fused AdamW and gradient clipping (ldm/training/amp.py):
a tiny run's steps against an unfused, explicitly clipped reference loop, per precision."""

import functools

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from conftest import make_tiny_module
from ldm.config import ConfigError
from ldm.training.amp import ClippingMixedPrecision
from ldm.training.options import Captions, EMASettings
from ldm.training.trainer import make_trainer

CLIP = 0.05  # below the tiny model's gradient norms (~0.3-3): every step clips
STEPS = 3
DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "bf16-true": torch.bfloat16}
# How far 3 steps of Lightning's fused AdamW may move the weights from the unfused reference's
# (the error of the whole update, relative to its size): the same float32 maths in another order
# (32-true and the mixed precisions, whose weights and optimizer are float32); for bf16-true,
# torch's unfused AdamW does its arithmetic in bf16 where the fused kernel computes in float32
# and rounds once: ~10% of the update apart, so that run is also checked against the fused kernel
# stepped and clipped by hand, which it must equal exactly.
UPDATE_TOLERANCE = {"bf16-true": 0.15}
FLOAT32 = 1e-4


class RecordingAdamW(torch.optim.AdamW):
    """AdamW recording the total gradient norm each step sees (after clipping)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norms = []

    def step(self, closure=None):
        if closure is not None:  # Lightning's closure runs the backward and the clipping
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            self.norms.append(float(torch.nn.utils.get_total_norm(grads)))
        super().step()
        return loss if closure is not None else None


class PreClipNorms(L.Callback):
    """The total gradient norm Lightning's hooks see before clipping (unscaled, under 16-mixed)."""

    def __init__(self) -> None:
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.nn.utils.get_total_norm(grads)))


def batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    captions = ["a red circle on a blue background", "a green square on a white background"]
    return [
        {"image": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "caption": captions}
        for _ in range(n)
    ]


def module(fused: bool):
    optimizer = functools.partial(RecordingAdamW, lr=1e-2, fused=fused, foreach=False)
    return make_tiny_module(
        optimizer=optimizer, ema=EMASettings(decay=None), captions=Captions(dropout=0.0)
    )


def trainer_config(precision: str) -> dict:
    return OmegaConf.create(
        {
            "_target_": "lightning.Trainer",
            "accelerator": "cpu",
            "devices": 1,
            "precision": precision,
            "max_steps": STEPS,
            "gradient_clip_val": CLIP,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
        }
    )


def lightning_run(precision: str, data: list[dict]):
    """The tiny module trained by make_trainer's trainer, fused AdamW, clipping on."""
    m, seen = module(fused=True), PreClipNorms()
    trainer = make_trainer(trainer_config(precision), callbacks=[seen])
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer.fit(m, train_dataloaders=loader)
    return m, seen.norms, trainer


def reference_run(precision: str, data: list[dict], fused: bool = False):
    """The same steps by hand: unfused AdamW, autocast, a GradScaler for fp16, unscale, clip."""
    m = module(fused=fused)
    dtype = DTYPES.get(precision, torch.float32)
    if precision.endswith("-true") and dtype != torch.float32:
        m = m.to(dtype)
    opt = m.configure_optimizers()["optimizer"]
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, m.lr_schedule.factor())
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    mixed = precision.endswith("-mixed")
    norms = []
    m.train()
    for i, batch in enumerate(data):
        if precision == "bf16-true":  # what Lightning's HalfPrecision does to inputs and draws
            batch = {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in batch.items()}
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype if precision == "bf16-true" else default)
        try:
            with torch.autocast("cpu", dtype=dtype, enabled=mixed):
                loss = m.training_step(batch, i)
        finally:
            torch.set_default_dtype(default)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)))
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
        schedule.step()
    return m, norms


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
def test_each_precision_steps_like_an_unfused_explicitly_clipped_reference(precision):
    """Fused AdamW and clip_val under Lightning (through make_trainer's plugins) give the weights
    an unfused AdamW and torch's clip_grad_norm_ give by hand; clipping is real: it sees unscaled
    gradients (the reference's norms) and leaves their norm at most the clip value."""
    data = batches(STEPS)
    ours, seen, trainer = lightning_run(precision, data)
    ref, ref_norms = reference_run(precision, data)
    assert str(trainer.precision) == precision
    assert trainer.global_step == STEPS and ours.nonfinite_steps == 0
    torch.testing.assert_close(torch.tensor(seen), torch.tensor(ref_norms), rtol=2e-2, atol=0)
    assert all(n > CLIP for n in seen)  # each step's gradients did need clipping
    stepped = trainer.optimizers[0].norms
    # bf16-true's gradients are bf16: the norm, the clip coefficient, each clipped gradient and
    # the norm measured here are each rounded to it (eps / 2 apiece, 4 roundings), which
    # native bf16 arithmetic (AVX-512 BF16, AMX, GPUs) and the emulated kind round differently
    slack = 2 * torch.finfo(torch.bfloat16).eps if precision == "bf16-true" else 1e-3
    assert len(stepped) == STEPS and all(n <= CLIP * (1 + slack) for n in stepped), stepped
    start = list(module(fused=False).unet.parameters())
    error = update_error(ours.unet, ref.unet, start)
    assert error < UPDATE_TOLERANCE.get(precision, FLOAT32)
    assert all(p.dtype == q.dtype for p, q in zip(ours.unet.parameters(), ref.unet.parameters()))
    if precision == "bf16-true":
        fused, _ = reference_run(precision, data, fused=True)
        assert update_error(ours.unet, fused.unet, start) == 0


@torch.no_grad()
def update_error(ours: torch.nn.Module, ref: torch.nn.Module, start: list) -> float:
    """|ours' update - the reference's| / |the reference's update|, over all the weights."""
    d_ours = torch.cat([(p.float() - s).flatten() for p, s in zip(ours.parameters(), start)])
    d_ref = torch.cat([(p.float() - s).flatten() for p, s in zip(ref.parameters(), start)])
    assert d_ref.norm() > 1.0  # the steps moved the weights: not a comparison of two inits
    return float((d_ours - d_ref).norm() / d_ref.norm())


def test_an_fp16_overflow_skips_the_fused_step_and_lowers_the_scale():
    """16-mixed with a loss scale that overflows fp16: the fused step changes nothing (weights,
    optimizer state), the scale halves, the step is counted as skipped, and the run goes on."""
    m = module(fused=True)
    before = {k: v.clone() for k, v in m.unet.state_dict().items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    plugin = ClippingMixedPrecision("16-mixed", "cpu", scaler=scaler)
    config = trainer_config("16-mixed")
    config.max_steps = 1
    options = {k: v for k, v in config.items() if k not in ("_target_", "precision")}
    trainer = L.Trainer(**options, plugins=[plugin])
    trainer.fit(m, train_dataloaders=torch.utils.data.DataLoader(batches(1), batch_size=None))
    assert scaler.get_scale() == 2.0**59
    assert m.nonfinite_steps == 1
    assert all(torch.equal(v, m.unet.state_dict()[k]) for k, v in before.items())
    assert not trainer.optimizers[0].state


def test_a_cast_precision_with_an_ema_is_refused_before_the_first_step():
    m = make_tiny_module()  # with its EMA
    trainer = make_trainer(trainer_config("bf16-true"))
    loader = torch.utils.data.DataLoader(batches(1), batch_size=None)
    with pytest.raises(ConfigError, match="model.ema.decay=null"):
        trainer.fit(m, train_dataloaders=loader)
    assert trainer.global_step == 0
