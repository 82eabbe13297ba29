import torch

from ldm.training.ema import EMA
from ldm.training.options import EMASettings
from tests.conftest import make_tiny_module as module


def test_an_offloaded_ema_stays_on_its_device_when_the_module_moves():
    m = module(ema=EMASettings(0.9, device="cpu"))
    expected = {k: v.clone() for k, v in m.ema.state_dict().items()}
    m.to("meta")  # stands for the accelerator: everything else moves
    assert all(p.is_meta for p in m.unet.parameters())
    got = m.ema.state_dict()
    assert all(v.device.type == "cpu" for v in got.values())
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    m.ema.to(torch.float64)  # dtype changes still apply
    assert all(p.dtype == torch.float64 for p in m.ema.shadow.parameters())


def test_an_offloaded_ema_averages_exactly_like_one_on_the_device():
    on_device, offloaded = module(), module(ema=EMASettings(0.9, device="cpu"))
    for m in (on_device, offloaded):
        with torch.no_grad():
            for i, p in enumerate(m.unet.parameters()):
                p.add_(0.01 * (i % 7))
        m.ema.update(m.unet, steps=3)
        m.ema.update(m.unet)
    a, b = on_device.ema.state_dict(), offloaded.ema.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_swapping_lends_the_average_and_gives_both_back_bit_for_bit():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    ema = EMA(model, 0.9, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0).add_(1.0)
    mine = [p.clone() for p in model.parameters()]
    average = [e.clone() for e in ema.shadow.parameters()]
    with ema.swapped_into(model) as lent:
        assert lent is model
        assert all(torch.equal(p, e) for p, e in zip(model.parameters(), average))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), mine))
    assert all(torch.equal(e, q) for e, q in zip(ema.shadow.parameters(), average))


def test_ddp_leaves_an_offloaded_ema_alone():
    m = module(ema=EMASettings(0.9, device="cpu"))
    names = {n for n, _ in m.named_parameters()} | {n for n, _ in m.named_buffers()}
    ignored = set(m._ddp_params_and_buffers_to_ignore)
    assert ignored == {n for n in names if n.startswith("ema.")} and ignored
    assert not hasattr(module(), "_ddp_params_and_buffers_to_ignore")
