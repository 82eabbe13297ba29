"""The weight identities are stored (latent caches, checkpoints, class-image folders): their
values are pinned, so a change that would orphan what users have made shows here."""

import torch

from ldm import fingerprint


def state() -> dict[str, torch.Tensor]:
    return {
        "weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4,
        "bias": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "steps": torch.tensor([3, 4]),
    }


def test_exact_is_pinned_and_sees_every_bit_and_setting():
    s = state()
    assert fingerprint.exact(s) == (
        "8aa145fd7fb6ceefe327da4f7ff9023adc67f193d8d983ab0d9fa16ae7ba26f1"
    )
    assert fingerprint.exact(s, {"layer": "penultimate"}) == (
        "74fed74f59b9a3be6b2b2952207992b87806e287cce7035b23222e945f5ae11b"
    )
    s["steps"] = torch.tensor([3, 5])  # integer tensors count too
    assert fingerprint.exact(s) != fingerprint.exact(state())
    # a transposed copy holds the same values in another memory order: the same identity
    t = {**state(), "weight": state()["weight"].t().contiguous().t()}
    assert fingerprint.exact(t) == fingerprint.exact(state())


def test_summary_and_digest_are_pinned():
    s = state()
    assert fingerprint.summary(s, set(s) | {"gone"}) == {
        "bias": [[2], -0.5],
        "gone": None,
        "weight": [[2, 3], 3.75],
    }
    assert fingerprint.digest(s) == (
        "6681520b546d8ee7f10d83df432674ed056aab5a3eddbd60c87e9d54880d6448"
    )
    s["weight"] = s["weight"] + 1
    assert fingerprint.digest(s) != fingerprint.digest(state())
