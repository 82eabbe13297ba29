"""Precision chosen for the hardware (ldm.precision), the same way by every entry point."""

import json
import logging

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import tiny_parts
from ldm import precision
from ldm.checkpoints import layout
from ldm.config import ROOT, register_resolvers

register_resolvers()


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set the CPU's kind: cpu_bf16(True) an AMX CPU (bf16 native and faster), cpu_bf16(False)
    an AVX2 one (bf16 emulated), cpu_bf16(True, faster=False) AVX-512 BF16 without AMX."""

    def set_(has: bool, faster: bool | None = None) -> None:
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has)
        monkeypatch.setattr(
            precision, "cpu_bf16_is_faster", lambda: has if faster is None else faster
        )

    return set_


@pytest.mark.parametrize(
    "has, faster, expected, why",
    [
        (False, False, "32-true", "no bf16 instructions"),
        (True, False, "32-true", "no AMX"),
        (True, True, "bf16-mixed", "AMX"),
    ],
)
def test_auto_on_the_cpu_trains_in_bf16_only_where_it_is_faster(
    cpu_bf16, has, faster, expected, why
):
    cpu_bf16(has, faster)
    for requested in ("auto", None):
        chosen = precision.resolve(requested, "cpu")
        assert (
            chosen.value == expected and chosen.reason.startswith("auto:") and why in chosen.reason
        )
    bf16 = expected == "bf16-mixed"
    assert precision.resolve("auto", "cpu").dtype == (torch.bfloat16 if bf16 else torch.float32)


def test_this_cpus_kind_is_read_from_the_hardware(monkeypatch):
    """AMX implies bf16 instructions; the answers match PyTorch's own checks on this CPU."""
    monkeypatch.delenv("LDM_CPU_BF16", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert precision.cpu_has_bf16() == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert precision.cpu_bf16_is_faster() == torch.cpu._is_amx_tile_supported()
    assert precision.cpu_has_bf16() or not precision.cpu_bf16_is_faster()


@pytest.mark.parametrize("has", [False, True])
def test_sampling_on_a_cpu_is_float32_whatever_its_kind(cpu_bf16, has):
    cpu_bf16(has)
    chosen = precision.resolve("auto", "cpu", sampling=True)
    assert chosen.value == "32-true" and "every kind of CPU" in chosen.reason
    assert precision.resolve("bf16", "cpu", sampling=True).value == "bf16-mixed"


def test_sampling_on_a_bf16_gpu_stays_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.resolve("auto", "cuda", sampling=True).value == "bf16-mixed"


@pytest.mark.parametrize("switch, expected", [("1", "bf16-mixed"), ("0", "32-true")])
def test_the_cpu_kind_switch_makes_auto_choose_as_on_that_kind(monkeypatch, switch, expected):
    """LDM_CPU_BF16 (how CI runs the other kind's paths): it wins over the hardware and over
    the oneDNN hold; a value other than 0/1 is a clear error."""
    monkeypatch.setenv("LDM_CPU_BF16", switch)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert precision.resolve("auto", "cpu").value == expected
    monkeypatch.setenv("LDM_CPU_BF16", "yes")
    for check in (precision.cpu_has_bf16, precision.cpu_bf16_is_faster):
        with pytest.raises(ValueError, match="LDM_CPU_BF16='yes'"):
            check()


def test_lightning_aliases_resolve_to_full_names():
    assert precision.resolve("bf16", "cpu").value == "bf16-mixed"
    assert precision.resolve(16, "cpu").value == "16-mixed"
    assert precision.resolve("32", "cpu").value == "32-true"


@pytest.mark.parametrize("bf16_gpu, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_on_a_gpu_follows_its_bf16_support(monkeypatch, bf16_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    assert precision.resolve("auto", "gpu").value == expected
    assert precision.resolve("auto", "auto").value == expected  # auto accelerator: the GPU


def test_explicit_bf16_without_bf16_instructions_runs_but_warns_once(cpu_bf16, caplog):
    cpu_bf16(False)
    precision._warned.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.precision"):
        for _ in range(3):
            assert precision.resolve("bf16-mixed", "cpu").value == "bf16-mixed"
    warnings = [r for r in caplog.records if "emulates bfloat16" in r.message]
    assert len(warnings) == 1
    cpu_bf16(True)
    caplog.clear()
    assert precision.resolve("bf16-mixed", "cpu").value == "bf16-mixed" and not caplog.records
    assert precision.resolve("32-true", "cpu").value == "32-true"


def test_onednn_held_to_avx2_counts_as_no_bf16(monkeypatch):
    """How a fast CPU imitates a slow one (ANCHORS.md): the auto choice follows the cap."""
    monkeypatch.delenv("LDM_CPU_BF16", raising=False)  # the switch, where set, answers instead
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not precision.cpu_has_bf16() and not precision.cpu_bf16_is_faster()
    assert precision.resolve("auto", "cpu").value == "32-true"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # an AMX CPU held to Zen 4's set
    assert not precision.cpu_bf16_is_faster()
    assert precision.resolve("auto", "cpu").value == "32-true"


@pytest.mark.parametrize("has", [False, True])
def test_every_entry_point_resolves_precision_the_same_way(cpu_bf16, has, tmp_path):
    """train.py's trainer and the latent cache writer choose what ldm.precision.resolve
    chooses for this (simulated) CPU; sample.py's pipeline samples in float32 on either kind."""
    from ldm.pipeline import Pipeline
    from ldm.training.trainer import make_trainer

    cpu_bf16(has)
    expected = precision.resolve("auto", "cpu").value
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "trainer.accelerator=cpu",
                "trainer.devices=1",
                "trainer.default_root_dir=" + str(tmp_path),
            ],
        )
    assert cfg.trainer.precision == "auto"
    assert make_trainer(cfg.trainer, logger=False).precision == expected

    from sd_fixtures import sd_parts

    ckpt = layout.save(tmp_path / "m.safetensors", sd_parts("sd1"))
    pipe, _ = Pipeline.load(str(ckpt), torch.device("cpu"))
    assert pipe.precision.value == "32-true"
    pipe, _ = Pipeline.load(str(ckpt), torch.device("cpu"), precision="bf16")  # on request
    assert pipe.precision.value == "bf16-mixed"

    from ldm.data.latents_write import write_latent_shards
    from tests.data.test_latents import write_image_shard

    unet, vae, text = tiny_parts()
    write_latent_shards(
        [str(write_image_shard(tmp_path / "src.tar"))],
        tmp_path / "cache",
        vae,
        None,
        image_size=64,
        progress=False,
    )
    assert json.loads((tmp_path / "cache/_latents.json").read_text())["precision"] == expected
