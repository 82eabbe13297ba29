"""LoRA adapters on the U-Net and the text encoder: a fresh adapter changes nothing, merged and
hooked adapters agree, only adapter weights train, the base model's state dict is untouched, and
given adapter tensors rebuild a network."""

import re

import pytest
import torch
from torch import nn

from conftest import tiny_parts
from ldm.models.lora import (
    LoRAModule,
    LoRANetwork,
    adapter_tensors,
    networks_from,
    select_layers,
)
from sd_fixtures import randomize_

UNET_ALL = [
    r"\.1\.(proj_in|proj_out|transformer_blocks\.)",
    r"in_layers\.2$",
    r"out_layers\.3$",
    r"emb_layers\.1$",
    r"skip_connection$",
    r"\.op$",
    r"\.conv$",
]
TEXT_ALL = [r"resblocks\.\d+\.attn$", r"resblocks\.\d+\.mlp\.c_(fc|proj)$"]


def randomize_up(network: LoRANetwork, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.modules():
            if isinstance(m, LoRAModule):
                m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)


def unet_inputs(context_dim: int):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 900]),
        torch.randn(2, 16, context_dim, generator=g),
    )


@pytest.fixture
def parts(single_thread):
    unet, _, text = tiny_parts()
    return randomize_(unet).eval(), randomize_(text).eval()  # no zero-initialised output layer


def unet_network(unet, **kw) -> LoRANetwork:
    layers = select_layers(unet, UNET_ALL)
    return LoRANetwork.create(layers, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, **kw)


def text_network(text) -> LoRANetwork:
    kinds = (nn.Linear, nn.MultiheadAttention)
    return LoRANetwork.create(select_layers(text, TEXT_ALL, kinds=kinds), rank=4, alpha=4.0)


def test_selection_covers_linear_1x1_and_kxk_layers(parts):
    unet, text = parts
    layers = select_layers(unet, UNET_ALL)
    kinds = {(type(m).__name__, getattr(m, "kernel_size", None)) for m in layers.values()}
    assert ("Linear", None) in kinds and ("Conv2d", (3, 3)) in kinds
    assert all(isinstance(m, (nn.Linear, nn.Conv2d)) for m in layers.values())
    assert set(select_layers(text, TEXT_ALL, kinds=(nn.Linear, nn.MultiheadAttention))) == {
        "model.transformer.resblocks.0.attn",
        "model.transformer.resblocks.0.mlp.c_fc",
        "model.transformer.resblocks.0.mlp.c_proj",
    }


def test_a_fresh_adapter_changes_no_output_bit_for_bit(parts):
    unet, text = parts
    x, t, context = unet_inputs(32)
    with torch.no_grad():
        before, tokens = unet(x, t, context), text(["a red circle", "a blue square"])
        state = {k: v.clone() for k, v in unet.state_dict().items()}
        nets = unet_network(unet).attach(), text_network(text).attach()
        assert torch.equal(unet(x, t, context), before)
        assert torch.equal(text(["a red circle", "a blue square"]), tokens)
    assert unet.state_dict().keys() == state.keys()  # names untouched
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())
    for net in nets:
        net.detach()


@pytest.mark.parametrize("which", ["unet", "text"])
def test_merged_and_hooked_adapters_agree(parts, which):
    unet, text = parts
    x, t, context = unet_inputs(32)
    model = unet if which == "unet" else text
    net = unet_network(unet) if which == "unet" else text_network(text)
    randomize_up(net)

    def run():
        with torch.no_grad():
            if which == "unet":
                return unet(x, t, context)
            return text(["a red circle", "a blue square"])

    plain = run()
    net.attach()
    hooked = run()
    net.merge()  # detaches, then adds the deltas into the weights
    merged = run()
    assert (hooked - plain).abs().max() > 1e-3  # the adapters do something
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=1e-5)
    assert model is not None


def test_only_adapter_weights_get_gradients(parts):
    unet, _ = parts
    unet.requires_grad_(False)
    net = unet_network(unet).attach()
    randomize_up(net)
    x, t, context = unet_inputs(32)
    unet(x, t, context).pow(2).mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    grads = [p.grad for p in net.parameters()]
    assert grads and all(g is not None for g in grads)
    net.detach()


def test_frozen_half_base_with_float32_adapters(parts):
    unet, _ = parts
    half = unet.to(torch.bfloat16)
    net = unet_network(half).attach()
    randomize_up(net)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    x, t, context = unet_inputs(32)
    out = half(x.bfloat16(), t, context.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    net.detach()


def test_conv_weight_delta_is_the_hooked_delta():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    lora = LoRAModule.of(conv, rank=2, alpha=3.0)
    nn.init.normal_(lora.lora_up.weight)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        hooked = conv(x) + lora(x)
        merged = nn.functional.conv2d(x, conv.weight + lora.weight_delta(), conv.bias, 2, 1)
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=1e-5)
    assert lora.scale == 1.5


@pytest.mark.parametrize(
    "rank, alpha, match", [(0, 1.0, "rank must be a positive"), (4, 0.0, "alpha must be positive")]
)
def test_zero_rank_or_alpha_is_a_clear_error(rank, alpha, match):
    with pytest.raises(ValueError, match=match):
        LoRAModule.of(nn.Linear(4, 4), rank=rank, alpha=alpha)


def test_dropouts_apply_in_training_only():
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    lora = LoRAModule.of(
        layer, rank=8, alpha=8.0, dropout=0.5, rank_dropout=0.5, module_dropout=0.5
    )
    nn.init.normal_(lora.lora_up.weight)
    x = torch.randn(4, 16)
    lora.eval()
    assert torch.equal(lora(x), lora(x))
    lora.train()
    outs = [lora(x) for _ in range(20)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert any(
        float(o.detach().abs().sum()) == 0 for o in outs
    )  # module dropout skipped some steps


def test_given_tensors_round_trip_through_networks_and_misfits_are_named(parts):
    """adapter_tensors -> networks_from rebuilds a network exactly (an attention's four
    projections included); a name with no place, or a tensor that does not fit its layer, is a
    ValueError naming it."""
    _, text = parts
    net = text_network(text)
    randomize_up(net)
    places, adapters = {}, {}
    for path, part, tensors in adapter_tensors(net):
        name = f"{path}.{part}" if part else path
        places[name] = ("text_encoder", path, text.get_submodule(path), part)
        adapters[name] = tensors
    rebuilt = networks_from(adapters, places)["text_encoder"]
    assert rebuilt.state_dict().keys() == net.state_dict().keys()
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="1 adapter\\(s\\) fit no layer.*nowhere"):
        networks_from({**adapters, "nowhere": adapters[name]}, places)
    wrong = {name: {**adapters[name], "down": torch.zeros(4, 7)}}
    with pytest.raises(ValueError, match=f"{re.escape(name)}.down has shape \\(4, 7\\)"):
        networks_from(wrong, places)
