"""configs/trainer/*.yaml (the device) and configs/strategy/*.yaml (how a run spreads): each
composes into a Trainer setup, either strategy with either device; FSDP (which needs a GPU to run)
is checked for what it wraps and what it leaves whole."""

import pytest
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from ldm.models.attention import BasicTransformerBlock
from ldm.models.unet import ResBlock
from ldm.training.strategies import UNetFSDP
from ldm.training.trainer import split_global_batch


def test_fsdp_wraps_unet_blocks_and_leaves_the_frozen_parts_and_ema_whole(tiny_module, monkeypatch):
    strategy = UNetFSDP(sharding_strategy="SHARD_GRAD_OP")
    assert strategy.kwargs["use_orig_params"] and strategy.sharding_strategy.name == "SHARD_GRAD_OP"
    seen = {}
    monkeypatch.setattr(FSDPStrategy, "_setup_model", lambda self, m: seen.update(self.kwargs))
    monkeypatch.setattr(UNetFSDP, "lightning_module", property(lambda self: tiny_module))
    tiny_module.text_encoder.requires_grad_(False)  # frozen: left whole too
    strategy._setup_model(tiny_module)
    ignored = seen["ignored_modules"]
    assert any(m is tiny_module.vae for m in ignored) and any(m is tiny_module.ema for m in ignored)
    assert any(m is tiny_module.text_encoder for m in ignored)
    assert not any(m is tiny_module.unet for m in ignored)
    assert set(seen["auto_wrap_policy"]._module_classes) == {ResBlock, BasicTransformerBlock}


def test_fsdp_refuses_an_ema_kept_on_the_cpu(tiny_module, monkeypatch):
    from ldm.config import ConfigError
    from ldm.training.ema import EMA

    strategy, module = UNetFSDP(), tiny_module
    module.ema = EMA(module.unet, 0.9, device="cpu")
    monkeypatch.setattr(UNetFSDP, "lightning_module", property(lambda self: module))
    with pytest.raises(ConfigError, match="ema.device=cpu works on one device and with DDP"):
        strategy._setup_model(module)


@pytest.mark.parametrize("device", ["default", "cpu", "gpu"])
@pytest.mark.parametrize("strategy", [None, "ddp", "fsdp"])
def test_each_device_and_strategy_config_composes(device, strategy):
    from hydra import compose, initialize_config_dir

    from ldm.config import ROOT, register_resolvers

    register_resolvers()
    overrides = [f"trainer={device}", *([f"strategy={strategy}"] if strategy else [])]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=False)
    trainer = cfg.trainer
    if strategy == "ddp":
        assert isinstance(instantiate(trainer.strategy), DDPStrategy)
    elif strategy == "fsdp":
        assert trainer.strategy._target_ == "ldm.training.strategies.UNetFSDP"
    else:
        assert trainer.strategy == "auto"
    # the strategy leaves the device as the trainer config chose it; FSDP shards over GPUs only
    expected = "gpu" if strategy == "fsdp" else {"default": "auto"}.get(device, device)
    assert trainer.accelerator == expected


@pytest.mark.parametrize(
    "global_batch, cap, world, expected",
    [(64, 64, 1, (64, 1)), (64, 16, 2, (16, 2)), (64, 64, 8, (8, 1)), (60, 16, 2, (15, 2))],
)
def test_a_global_batch_splits_into_device_batches_and_accumulation(
    global_batch, cap, world, expected
):
    per_device, accumulate = split_global_batch(global_batch, cap, world)
    assert (per_device, accumulate) == expected and per_device * accumulate * world == global_batch


def test_a_global_batch_that_does_not_divide_is_a_clear_error():
    from ldm.config import ConfigError

    with pytest.raises(ConfigError, match="does not divide over 3 devices"):
        split_global_batch(64, 64, 3)
