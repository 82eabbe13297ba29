"""Files from strangers: nothing in a weights file, a diffusers folder or a training checkpoint
chooses code, sizes are bounded before use, and every bad file is one `CheckpointError` that
names it. Crafted files would create a marker file if any of their code ran."""

import json
import os
import struct

import pytest
import torch
from omegaconf import OmegaConf

from conftest import tiny_configs, tiny_parts
from ldm.checkpoints import CONFIG_KEY, CheckpointError, layout, load_model, save_state
from ldm.checkpoints.export import save_diffusers
from ldm.checkpoints.parts import check
from ldm.config import architecture
from ldm.diffusion.schedule import SD_SCHEDULE
from ldm.training.checkpointing import read_checkpoint


def tiny_config() -> dict:
    cfg = tiny_configs()
    config = {
        k: architecture(OmegaConf.to_container(cfg[k], resolve=True))
        for k in ("unet", "vae", "text_encoder")
    }
    config["diffusion"] = {"schedule": dict(SD_SCHEDULE), "prediction": "eps"}
    config["image_size"] = 32
    return config


def tiny_file(path, config: dict | None = None, raw_config: str | None = None):
    unet, vae, text = tiny_parts()
    meta = {CONFIG_KEY: raw_config if raw_config is not None else (config or tiny_config())}
    return layout.save(path, {"unet": unet, "vae": vae, "text_encoder": text}, meta)


class RunsCode:
    """Pickled, it calls `os.system(command)` when unpickled."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def one_line(error: pytest.ExceptionInfo, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_our_own_file_loads(tmp_path):
    model = load_model(tiny_file(tmp_path / "ok.safetensors"))
    assert model.source == "ldm" and model.unet.model_channels == 32


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder", "schedule"])
@pytest.mark.parametrize(
    "target", ["subprocess.run", "os.system", "builtins.eval", "torch.nn.Linear"]
)
def test_a_config_naming_any_other_class_is_refused_and_runs_nothing(tmp_path, part, target):
    marker = tmp_path / "ran"
    config = tiny_config()
    node = config["diffusion"]["schedule"] if part == "schedule" else config[part]
    node.clear()
    node.update({"_target_": target, "args": ["touch", str(marker)], "in_features": 1})
    path = tiny_file(tmp_path / "crafted.safetensors", config)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    one_line(error, "crafted.safetensors", "refused to build", repr(target))
    assert not marker.exists()


def unet(**kw):
    return lambda c: c["unet"].update(kw)


def schedule(**kw):
    return lambda c: c["diffusion"]["schedule"].update(kw)


@pytest.mark.parametrize(
    "change, words",
    [
        (unet(args=["touch", "x"]), ["unknown UNetModel arguments", "'args'"]),
        (unet(model_channels=1 << 30), ["model_channels", "outside"]),
        (unet(channel_mult=[1] * 100), ["channel_mult", "more than 8"]),
        (unet(num_res_blocks=10**6), ["num_res_blocks", "outside"]),
        (unet(context_dim={"nested": 1}), ["context_dim", "type dict"]),
        (lambda c: c["vae"].update(scale_factor=float("nan")), ["scale_factor", "finite"]),
        (lambda c: c["text_encoder"].update(model_name="hf-hub:x/y"), ["knows no model"]),
        (lambda c: c["text_encoder"]["text_cfg"].update(hf_model_name="x/y"), ["hf_model_name"]),
        (schedule(num_steps=1e9), ["num_steps", "whole number"]),
        (schedule(num_steps=10**9), ["num_steps", "outside"]),
        (lambda c: c.pop("diffusion"), ["diffusion entry"]),
        (lambda c: c.update(surprise=1), ["unknown model config entries", "surprise"]),
    ],
)
def test_a_config_with_unknown_keys_odd_types_or_absurd_sizes_is_refused(tmp_path, change, words):
    config = tiny_config()
    change(config)
    with pytest.raises(CheckpointError) as error:
        load_model(tiny_file(tmp_path / "odd.safetensors", config))
    one_line(error, "odd.safetensors", *words)


@pytest.mark.parametrize("raw", ["{not json", "[" * 100_000, "[1, 2]", '"text"'])
def test_a_malformed_stored_config_is_one_line_naming_the_file(tmp_path, raw):
    with pytest.raises(CheckpointError) as error:
        load_model(tiny_file(tmp_path / "bad.safetensors", raw_config=raw))
    one_line(error, "bad.safetensors")


def test_the_allow_list_accepts_exactly_the_part_classes():
    for config in tiny_config().values():
        if isinstance(config, dict) and "_target_" in config:
            assert check(config, "x") == config


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "content",
    [
        # a header declaring 4 TiB of tensor over a file of 16 bytes
        safetensors_bytes(
            {"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4 << 40]}}, b"\0" * 16
        ),
        struct.pack("<Q", 1 << 60) + b"{}",  # a header length of an exabyte
        b"\x89PNG\r\n\x1a\n" + b"\0" * 64,  # another format renamed
        b"",
    ],
    ids=["enormous-tensor", "enormous-header", "png", "empty"],
)
def test_a_bad_safetensors_file_is_refused_without_allocating_what_it_claims(tmp_path, content):
    path = tmp_path / "claims.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    one_line(error, "claims.safetensors", "not a readable safetensors file")


def test_a_truncated_file_is_refused(tmp_path):
    whole = tiny_file(tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path / "cut.safetensors")
    one_line(error, "cut.safetensors")


def test_a_pickle_that_runs_code_is_refused_as_weights_and_as_a_training_checkpoint(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": RunsCode(f"touch {marker}")}, path)
    for read in (load_model, read_checkpoint):
        with pytest.raises(CheckpointError) as error:
            read(path)
        one_line(error, "crafted.ckpt", "weights_only=True", "posix.system")
    assert not marker.exists()


def test_a_separate_vae_or_text_file_that_is_incomplete_is_named(tmp_path):
    main = tiny_file(tmp_path / "ok.safetensors")
    _, vae, _ = tiny_parts()
    state = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    del state["first_stage_model.decoder.conv_out.weight"]
    save_state(tmp_path / "vae.safetensors", state)
    with pytest.raises(CheckpointError) as error:
        load_model(main, vae=tmp_path / "vae.safetensors")
    one_line(error, "vae.safetensors", "decoder.conv_out.weight")
    save_state(tmp_path / "text.safetensors", {"foo": torch.zeros(1)})
    with pytest.raises(CheckpointError) as error:
        load_model(main, text_encoder=tmp_path / "text.safetensors")
    one_line(error, "text.safetensors", "no text encoder weights")


@pytest.fixture
def folder(tmp_path):
    return save_diffusers(tmp_path / "pipe", load_model(tiny_file(tmp_path / "ok.safetensors")))


def edit_json(path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


@pytest.mark.parametrize(
    "file, change, words",
    [
        ("unet/config.json", lambda c: c.pop("block_out_channels"), ["'block_out_channels'"]),
        ("vae/config.json", lambda c: c.update(block_out_channels=[1 << 20] * 4), ["outside"]),
        ("unet/config.json", lambda c: c.update(layers_per_block=10**7), ["num_res_blocks"]),
        ("text_encoder/config.json", lambda c: c.update(hidden_size="wide"), ["config.json"]),
        (
            "scheduler/scheduler_config.json",
            lambda c: c.update(num_train_timesteps=1e9),
            ["num_steps"],
        ),
        (
            "scheduler/scheduler_config.json",
            lambda c: c.update(num_train_timesteps=10**9),
            ["outside"],
        ),
    ],
)
def test_a_diffusers_config_that_is_incomplete_or_absurd_is_refused(folder, file, change, words):
    edit_json(folder / file, change)
    with pytest.raises(CheckpointError) as error:
        load_model(folder)
    one_line(error, "pipe", *words)


@pytest.mark.parametrize("content", ["{oops", "[]", "[" * 100_000])
def test_a_diffusers_config_that_is_not_a_json_object_is_named(folder, content):
    (folder / "unet" / "config.json").write_text(content)
    with pytest.raises(CheckpointError) as error:
        load_model(folder)
    one_line(error, "unet/config.json")


def test_a_folder_export_that_fails_midway_leaves_the_old_folder_whole(folder, monkeypatch):
    import ldm.checkpoints.diffusers as diffusers

    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    calls, real = [], diffusers.save_state

    def fail_on_the_second_part(path, state, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, state, *args, **kwargs)

    monkeypatch.setattr(diffusers, "save_state", fail_on_the_second_part)
    other = load_model(folder)
    with pytest.raises(OSError):
        save_diffusers(folder, other, torch.float16)
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["ok.safetensors", "pipe"]


def test_convert_refuses_to_replace_an_existing_destination(tmp_path, capsys):
    from ldm.checkpoints import convert

    src = tiny_file(tmp_path / "ok.safetensors")
    (tmp_path / "mine.safetensors").write_bytes(b"the user's own file")
    with pytest.raises(SystemExit):
        convert.main([str(src), str(tmp_path / "mine.safetensors")])
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "mine.safetensors").read_bytes() == b"the user's own file"
    assert convert.main([str(src), str(tmp_path / "mine.safetensors"), "--overwrite"]) == 0
    assert load_model(tmp_path / "mine.safetensors").unet.model_channels == 32
