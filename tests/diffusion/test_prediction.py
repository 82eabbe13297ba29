"""The prediction type: one object for its maths and its names in other tools."""

import pytest
import torch

from ldm.diffusion.prediction import Prediction


@pytest.mark.parametrize(
    "name, expected",
    [
        ("eps", "eps"),
        ("epsilon", "eps"),
        ("EPSILON", "eps"),
        ("v", "v"),
        ("v_prediction", "v"),
        ("v-prediction", "v"),
        ("x0", "x0"),
        ("sample", "x0"),
        (Prediction.V, "v"),
    ],
)
def test_outside_names_parse_to_one_type(name, expected):
    assert Prediction.parse(name) is Prediction(expected)


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown prediction type 'flow'.*eps, v or x0"):
        Prediction.parse("flow")


def test_names_in_other_tools():
    assert [p.diffusers_name for p in Prediction] == ["epsilon", "v_prediction", "sample"]
    assert [p.modelspec_name for p in Prediction] == ["epsilon", "v", "sample"]
    assert [p.ldm_name for p in Prediction] == ["eps", "v", "x0"]
    assert Prediction.V == "v" and str(Prediction.X0) == "x0"  # configs and JSON see plain names


@pytest.mark.parametrize("prediction", list(Prediction))
def test_target_and_conversion_invert_each_other(prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    ab = torch.tensor([0.9, 0.5, 0.1])
    x_t = ab.sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab).sqrt().view(-1, 1, 1, 1) * eps
    back = prediction.to_x0_eps(prediction.target(x0, eps, ab), x_t, ab)
    torch.testing.assert_close(back[0], x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back[1], eps, atol=1e-5, rtol=1e-5)


def test_eps_is_refused_on_a_zero_terminal_snr_schedule_only():
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        Prediction.EPS.check_schedule(0.0)
    Prediction.EPS.check_schedule(0.0047)
    Prediction.V.check_schedule(0.0)
    Prediction.X0.check_schedule(0.0)
