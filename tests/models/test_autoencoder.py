"""Tests of the SD first-stage autoencoder: layout, shapes, parity with diffusers, I/O."""

from __future__ import annotations

import pytest
import torch

from ldm.checkpoints import files, layout
from ldm.checkpoints.keymaps import diffusers_vae_to_sd, sd_vae_to_diffusers
from ldm.models.autoencoder import AutoencoderKL, DiagonalGaussian

SD_VAE_PARAMS = 83_653_863


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_autoencoder(**overrides) -> AutoencoderKL:
    kwargs = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, resolution=16)
    kwargs.update(overrides)
    return AutoencoderKL(**kwargs)


# --- layout -----------------------------------------------------------------------------


def test_sd_config_parameter_count_on_meta():
    with torch.device("meta"):
        model = AutoencoderKL(
            ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, embed_dim=4
        )
    assert sum(p.numel() for p in model.parameters()) == SD_VAE_PARAMS


def test_sd_key_layout():
    with torch.device("meta"):
        keys = set(AutoencoderKL().state_dict())
    expected = {
        "encoder.conv_in.weight",
        "encoder.down.0.block.1.conv2.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.downsample.conv.weight",
        "encoder.mid.block_1.norm1.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.mid.attn_1.proj_out.bias",
        "encoder.mid.block_2.conv2.bias",
        "encoder.norm_out.weight",
        "encoder.conv_out.weight",
        "decoder.conv_in.weight",
        "decoder.mid.attn_1.norm.weight",
        "decoder.up.3.block.2.conv1.weight",  # num_res_blocks + 1 blocks per level
        "decoder.up.3.upsample.conv.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",
        "decoder.norm_out.bias",
        "decoder.conv_out.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
    }
    assert expected <= keys
    assert "encoder.down.3.downsample.conv.weight" not in keys  # last level keeps resolution
    assert "decoder.up.0.upsample.conv.weight" not in keys  # first level is full resolution
    assert len(keys) == 248


def test_attn_resolutions_add_level_attention():
    model = AutoencoderKL(
        ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, resolution=64, attn_resolutions=(16,)
    )
    keys = set(model.state_dict())
    assert "encoder.down.2.attn.0.q.weight" in keys  # 64 -> 32 -> 16 at level 2
    assert "decoder.up.2.attn.1.proj_out.weight" in keys
    assert not any(k.startswith("encoder.down.1.attn") for k in keys)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64))[0].shape == (1, 3, 64, 64)


# --- shapes and scaling -----------------------------------------------------------------


def test_encode_decode_shapes_four_levels():
    model = AutoencoderKL(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, resolution=64)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = model.encode(x)
        assert latents.shape == (2, 4, 8, 8)
        assert model.decode(latents).shape == (2, 3, 64, 64)
        reconstruction, posterior = model(x)
    assert reconstruction.shape == x.shape
    assert posterior.kl().shape == (2,)
    assert model.downsample_factor == 8


def test_scale_shift_round_trip():
    torch.manual_seed(0)
    model = tiny_autoencoder(scale_factor=0.5, shift_factor=0.25).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = model.posterior(x).mode()
        latents = model.encode(x, sample=False)
        torch.testing.assert_close(latents, (z - 0.25) * 0.5)
        torch.testing.assert_close(model.unscale_latents(latents), z)
        # decode() divides by the scale then adds the shift back: equal up to rounding.
        torch.testing.assert_close(
            model.decode(latents), model.decode_unscaled(z), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(model(x, sample=False)[0], model.decode_unscaled(z))


def test_encode_sample_uses_generator():
    model = tiny_autoencoder()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        a = model.encode(x, generator=torch.Generator().manual_seed(1))
        b = model.encode(x, generator=torch.Generator().manual_seed(1))
        c = model.encode(x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_diagonal_gaussian():
    mean = torch.zeros(2, 4, 3, 3)
    standard = DiagonalGaussian(torch.cat([mean, torch.zeros_like(mean)], dim=1))
    torch.testing.assert_close(standard.kl(), torch.zeros(2))
    assert torch.equal(standard.mode(), mean)
    torch.testing.assert_close(standard.std, torch.ones_like(mean))

    clamped = DiagonalGaussian(torch.cat([mean, torch.full_like(mean, 100.0)], dim=1))
    assert clamped.logvar.max().item() == 20.0
    clamped = DiagonalGaussian(torch.cat([mean, torch.full_like(mean, -100.0)], dim=1))
    assert clamped.logvar.min().item() == -30.0

    shifted = DiagonalGaussian(torch.cat([torch.ones_like(mean), torch.zeros_like(mean)], dim=1))
    torch.testing.assert_close(shifted.kl(), torch.full((2,), 0.5 * 4 * 3 * 3))


# --- parity with diffusers --------------------------------------------------------------


@pytest.mark.parametrize("norm_groups", [8, 32])
def test_parity_with_diffusers(norm_groups):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=norm_groups,
        sample_size=32,
    ).eval()
    # Perturb every tensor so GroupNorm affines and biases are not at their trivial init.
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))

    # scale_factor 1 so decode() compares the decoders alone, without a scale round trip.
    model = AutoencoderKL(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        z_channels=4,
        embed_dim=4,
        norm_groups=norm_groups,
        scale_factor=1.0,
    ).eval()
    model.load_state_dict(diffusers_vae_to_sd(reference.state_dict()), strict=True)

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = reference.encode(x).latent_dist
        posterior = model.posterior(x)
        torch.testing.assert_close(posterior.mean, expected.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(posterior.logvar, expected.logvar, atol=1e-5, rtol=0)

        z = torch.randn(2, 4, 16, 16)
        expected_image = reference.decode(z).sample
        image = model.decode(z)
        torch.testing.assert_close(image, expected_image, atol=1e-5, rtol=0)


def test_vae_key_maps_invert_each_other():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
        ).state_dict()
        ours = AutoencoderKL().state_dict()
    sd = diffusers_vae_to_sd(reference)
    assert sd.keys() == ours.keys() and all(sd[k].shape == ours[k].shape for k in ours)
    back = sd_vae_to_diffusers(sd)
    assert back.keys() == reference.keys()
    assert all(back[k].shape == reference[k].shape for k in back)


# --- safetensors I/O (through ldm.checkpoints, as train.py writes and configs load) --------


def test_save_load_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = tiny_autoencoder(attn_resolutions=(8,))
    path = layout.save(tmp_path / "vae.safetensors", {"vae": model}, {"psnr": 31.5})
    loaded = layout.pretrained(tiny_autoencoder(attn_resolutions=(8,)), str(path), part="vae")
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    state, metadata = files.read(path)
    assert all(key.startswith("first_stage_model.") for key in state)
    assert metadata["psnr"] == "31.5"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_save_fp16_halves_file_and_loads_into_fp32(tmp_path):
    model = tiny_autoencoder()
    layout.save(tmp_path / "fp32.safetensors", {"vae": model})
    layout.save(tmp_path / "fp16.safetensors", {"vae": model}, dtype=torch.float16)
    size32 = (tmp_path / "fp32.safetensors").stat().st_size
    size16 = (tmp_path / "fp16.safetensors").stat().st_size
    assert size16 < 0.6 * size32
    loaded = layout.pretrained(tiny_autoencoder(), str(tmp_path / "fp16.safetensors"), part="vae")
    weight = model.encoder.conv_in.weight
    assert loaded.encoder.conv_in.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.encoder.conv_in.weight, weight.half().float(), rtol=0, atol=0)


def _overflowing_vae(fp16_safe: bool) -> AutoencoderKL:
    """A small VAE whose decoder activations pass float16's 65504 before its first GroupNorm
    (as SDXL's VAE does deeper in): float16 gives inf, then NaN; float32 normalises them away."""
    torch.manual_seed(0)
    vae = tiny_autoencoder(fp16_safe=fp16_safe).eval()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
    return vae


def test_a_vae_not_fp16_safe_decodes_in_float32_where_float16_overflows():
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = _overflowing_vae(True).decode(z)  # float32 throughout: finite
        assert torch.isfinite(reference).all()
        with torch.autocast("cpu", dtype=torch.float16):
            assert not torch.isfinite(_overflowing_vae(True).decode(z)).all()  # the black image
            unsafe = _overflowing_vae(False)
            torch.testing.assert_close(unsafe.decode(z), reference, rtol=0, atol=0)
            assert not torch.isfinite(_overflowing_vae(True).half().decode(z.half())).all()
            half = _overflowing_vae(False).half()  # fp16 weights, as an fp16 file loads on a GPU
            out = half.decode(z.half())
        assert half.decoder.conv_in.weight.dtype == torch.float32 and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        # bf16 is left as it is: its range is float32's
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(unsafe.decode(z)).all()
    assert unsafe.config["fp16_safe"] is False
