"""The sampler defaults are SamplerConfig's field defaults, and every other place that reads or
states them agrees: `sample()`'s keyword defaults, the `configs/sampler/` group as sample.py and
the training callbacks compose it, and the diffusers scheduler config we export."""

import dataclasses
import inspect

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.checkpoints.diffusers_configs import scheduler_config
from ldm.config import ROOT, register_resolvers
from ldm.diffusion.samplers import SAMPLERS, SamplerConfig, sample

register_resolvers()
DEFAULTS = dataclasses.asdict(SamplerConfig())


def composed(config: str, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return compose(config, overrides=list(overrides))


def own_keys(option: str) -> dict:
    """What configs/sampler/OPTION.yaml sets itself (beside its defaults): all it may change."""
    node = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "sampler" / f"{option}.yaml"))
    return {k: v for k, v in node.items() if k != "defaults"}


def test_sample_takes_its_option_defaults_from_the_config():
    params = inspect.signature(sample).parameters
    shared = {
        k: p.default for k, p in params.items() if k in DEFAULTS and k not in ("name", "steps")
    }
    assert set(shared) == {"spacing", "sigmas", "eta", "steps_offset", "set_alpha_to_one"}
    assert shared == {k: DEFAULTS[k] for k in shared}


def test_the_exported_scheduler_config_has_the_sampler_defaults():
    sched = scheduler_config({"schedule": {}, "prediction": "eps"})
    assert sched["steps_offset"] == DEFAULTS["steps_offset"]
    assert sched["set_alpha_to_one"] == DEFAULTS["set_alpha_to_one"]


@pytest.mark.parametrize("option", list(SAMPLERS))
def test_each_sampler_option_is_the_config_defaults_but_what_it_sets(option):
    """sample.py's composition (its top-level steps= and cfg_scale= at their defaults)."""
    sampler = instantiate(composed("sample", "ckpt=x", "prompt=y", f"sampler={option}").sampler)
    assert dataclasses.asdict(sampler) == {**DEFAULTS, **own_keys(option)}


@pytest.mark.parametrize("key,option", [("sample_grid", "dpmpp_2m"), ("adherence", "ddim")])
def test_the_training_callbacks_samplers_are_the_group_options(key, option):
    cfg = composed("train", "experiment=shapes")
    sampler = instantiate(cfg.callbacks[key].sampler)
    assert dataclasses.asdict(sampler) == {**DEFAULTS, **own_keys(option)}


def test_the_class_images_sampler_is_the_group_option():
    cfg = composed("train", "experiment=shapes_dreambooth", "init=x")
    sampler = instantiate(cfg.class_images.sampler)
    assert dataclasses.asdict(sampler) == {**DEFAULTS, **own_keys("dpmpp_2m")}
