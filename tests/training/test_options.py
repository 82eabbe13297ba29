import pytest
import torch

from ldm.training.options import augment_tags, keep_mask, warmup_lambda


def test_caption_dropout_rate_is_honoured():
    n = 20000
    for p in (0.0, 0.1, 0.5, 1.0):
        dropped = n - int(keep_mask(n, p, torch.Generator().manual_seed(0)).sum())
        assert abs(dropped / n - p) < 0.01


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
