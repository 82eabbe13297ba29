import pytest
import torch

from ldm.training.options import Captions


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


def test_training_step_drops_captions_at_the_configured_rate(tiny_module, batch, monkeypatch):
    seen = []
    encode = tiny_module.text_encoder.forward
    monkeypatch.setattr(tiny_module.text_encoder, "forward", lambda c: seen.extend(c) or encode(c))
    tiny_module.captions = Captions(dropout=0.5)
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
    from ldm.training.trains import TextualInversion

    unet, vae, text = tiny_parts()
    module = LatentDiffusion(
        unet,
        vae,
        text,
        DiffusionObjective(NoiseSchedule(zero_terminal_snr=True), "v"),
        functools.partial(torch.optim.AdamW, lr=1e-2),
        trains=TextualInversion("<pastel>", vectors=2, init="red"),
    )
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable == ["word_vectors"]
    assert module.ema is None and not module.adapters()
    start = text.embedding("<pastel>").detach().clone()
    assert start.shape == (2, text.width)
    opt = module.configure_optimizers()["optimizer"]
    words = {**batch, "caption": ["a <pastel> circle on a blue background"] * 4}
    module.captions = Captions(dropout=0.0)
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
