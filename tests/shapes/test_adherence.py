"""ShapesAdherence: the shapes judge's accuracies on a fixed prompt set, sampled from the EMA
U-Net at each validation (val/adherence_*, which `ldm.results` tabulates)."""

from types import SimpleNamespace

from lightning.pytorch.plugins.precision import Precision

from ldm.diffusion.samplers import SamplerConfig
from ldm.shapes.adherence import ShapesAdherence


def test_shapes_adherence_is_deterministic_and_in_range(tiny_module, single_thread):
    cb = ShapesAdherence(n_prompts=3, sampler=SamplerConfig(name="ddim", steps=2))
    assert cb.prompts == ShapesAdherence(n_prompts=3).prompts  # a fixed prompt set
    trainer = SimpleNamespace(precision_plugin=Precision())  # Lightning's 32-true plugin
    first, again = cb.measure(trainer, tiny_module), cb.measure(trainer, tiny_module)
    assert set(first) == {"background", "shape_colour", "shape", "all"}
    assert all(0.0 <= v <= 1.0 for v in first.values()) and first == again
