import pytest
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


def test_cosine_decay_after_warmup_reaches_zero_at_decay_steps():
    f = warmup_lambda(2, decay_steps=6)
    got = [f(s) for s in range(8)]
    assert got[:3] == [0.5, 1.0, 1.0] and got[4] == pytest.approx(0.5)
    assert got[6] == pytest.approx(0.0, abs=1e-12) and got[7] == got[6]
    assert all(a >= b for a, b in zip(got[1:], got[2:]))


def test_tag_augmentation_keeps_the_first_tags_and_shuffles_or_drops_the_rest():
    from ldm.training.module import augment_tags

    torch.manual_seed(0)
    caption = "sks, red, circle, blue, background, flat"
    shuffled = {augment_tags(caption, True, 1, 0.0) for _ in range(30)}
    assert len(shuffled) > 5 and all(s.startswith("sks, ") for s in shuffled)
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in shuffled)
    dropped = [augment_tags(caption, False, 2, 0.5).split(", ") for _ in range(200)]
    assert all(d[:2] == ["sks", "red"] for d in dropped)
    rate = 1 - sum(len(d) - 2 for d in dropped) / (4 * len(dropped))
    assert abs(rate - 0.5) < 0.1
    assert augment_tags(caption, False, 0, 0.0) == caption


def test_sample_weights_scale_each_sample_loss(tiny_module, batch):
    plain = tiny_module.training_step(batch, 0)
    tiny_module.calls = 0  # the same draws again
    doubled = tiny_module.training_step({**batch, "loss_weight": torch.full((4,), 2.0)}, 0)
    torch.testing.assert_close(doubled, 2 * plain)


def test_textual_inversion_trains_the_new_word_only(batch):
    import functools

    from conftest import tiny_parts
    from ldm.diffusion.objective import DiffusionObjective
    from ldm.diffusion.schedule import NoiseSchedule
    from ldm.training.module import LatentDiffusion

    unet, vae, text = tiny_parts()
    module = LatentDiffusion(
        unet,
        vae,
        text,
        DiffusionObjective(NoiseSchedule(zero_terminal_snr=True), "v"),
        functools.partial(torch.optim.AdamW, lr=1e-2),
        ema_decay=None,
        new_word="<pastel>",
        new_word_vectors=2,
        new_word_init="red",
    )
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable == ["word_vectors"]
    start = text.embedding("<pastel>").detach().clone()
    assert start.shape == (2, text.width)
    opt = module.configure_optimizers()["optimizer"]
    words = {**batch, "caption": ["a <pastel> circle on a blue background"] * 4}
    module.caption_dropout = 0.0
    module.training_step(words, 0).backward()
    opt.step()
    assert not torch.equal(text.embedding("<pastel>"), start)


def test_a_non_finite_gradient_skips_the_step_and_too_many_in_a_row_stop_the_run(tiny_module):
    tiny_module.max_nonfinite_in_a_row = 3
    opt = torch.optim.AdamW(tiny_module.trainable_parameters(), lr=1e-3)
    params = tiny_module.trainable_parameters()
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    params[0].grad[0] = torch.nan
    tiny_module.on_before_optimizer_step(opt)
    opt.step()  # no gradient left: nothing moves, no optimizer state made
    assert all(torch.equal(a, p) for a, p in zip(before, params)) and not opt.state
    assert tiny_module.nonfinite_steps == 1
    assert tiny_module.all_finite(torch.ones(2)) and tiny_module.nonfinite_in_a_row == 0
    tiny_module.all_finite(torch.tensor(float("inf")))
    tiny_module.all_finite(torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="3 batches in a row.*last checkpoint"):
        tiny_module.all_finite(torch.tensor(float("nan")))


def test_under_fp16_autocast_the_vae_encodes_in_float32(tiny_module, batch):
    seen = []
    tiny_module.vae.encoder.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.float16):
        mean, std = tiny_module.posterior(batch)
    assert seen == [torch.float32] and mean.dtype == std.dtype == torch.float32


def test_a_checkpoint_of_another_model_or_objective_is_a_clear_error(tiny_module):
    from ldm.checkpoints.files import CheckpointError

    state = {k: v.clone() for k, v in tiny_module.state_dict().items()}
    checkpoint = {"state_dict": dict(state)}
    tiny_module.on_save_checkpoint(checkpoint)
    tiny_module.on_load_checkpoint({**checkpoint, "state_dict": dict(checkpoint["state_dict"])})
    wider = dict(checkpoint["state_dict"])
    wider["unet.out.2.weight"] = torch.zeros(5, 1, 1, 1)
    with pytest.raises(CheckpointError, match="another model or config: 1 of another shape"):
        tiny_module.on_load_checkpoint({**checkpoint, "state_dict": wider})
    fewer = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("ema.")}
    with pytest.raises(CheckpointError, match="tensors it lacks"):
        tiny_module.on_load_checkpoint({**checkpoint, "state_dict": fewer})
    with pytest.raises(CheckpointError, match="trained for 'eps' prediction, configured 'v'"):
        tiny_module.on_load_checkpoint(
            {**checkpoint, "state_dict": dict(checkpoint["state_dict"]), "prediction": "eps"}
        )
