import torch

from ldm.training.module import keep_mask, warmup_lambda


def test_frozen_vae_gets_no_gradient_and_no_optimizer_state(tiny_module, batch):
    opt = tiny_module.configure_optimizers()["optimizer"]
    optimized = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in tiny_module.vae.parameters())
    assert not any(id(p) in optimized for p in tiny_module.ema.parameters())
    tiny_module.train()
    assert not tiny_module.vae.training and tiny_module.unet.training
    loss = tiny_module.training_step(batch, 0)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in tiny_module.vae.parameters())
    assert all(id(p) not in opt.state for p in tiny_module.vae.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_module.unet.parameters())


def test_caption_dropout_rate_is_honoured():
    n = 20000
    for p in (0.0, 0.1, 0.5, 1.0):
        dropped = n - int(keep_mask(n, p, torch.Generator().manual_seed(0)).sum())
        assert abs(dropped / n - p) < 0.01


def test_training_step_drops_captions_at_the_configured_rate(tiny_module, batch, monkeypatch):
    seen = []
    encode = tiny_module.text_encoder.forward
    monkeypatch.setattr(tiny_module.text_encoder, "forward", lambda c: seen.extend(c) or encode(c))
    tiny_module.caption_dropout = 0.5
    for i in range(50):
        tiny_module.training_step(batch, i)
    assert 0.35 < seen.count("") / len(seen) < 0.65


def test_ema_tracks_the_unet(tiny_module):
    shadow = tiny_module.ema.shadow
    p, e = next(tiny_module.unet.parameters()), next(shadow.parameters())
    with torch.no_grad():
        p.add_(1.0)
    before = e.clone()
    tiny_module.ema.update(tiny_module.unet)  # first update: decay (1 + 0) / 10 = 0.1
    torch.testing.assert_close(e, before + 0.9 * (p - before))
    assert not any(q.requires_grad for q in shadow.parameters())


def test_warmup_is_linear_then_constant():
    f = warmup_lambda(4)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
