"""The shapes world: the embedded dataset the default run trains on, and how it is judged.

Every image is one circle, square or triangle of a palette colour on a background of another,
captioned ``a {colour} {shape} on a {colour} background``: 168 captions, small enough that a
generator's prompt adherence is measured exactly by image analysis. One package holds it all,
as nanoGPT keeps ``data/<name>/``:

* ``render``: palette, shapes, captions and the renderer (the data contract, in its docstring);
* ``dataset``: the train/val WebDataset shards, byte-for-byte deterministic
  (``write_shards``; ``ensure_shards`` is the data config's prepare step);
* ``pastel``: the pastel style of the set (the style fine-tune's data) and a style folder;
* ``judge``: prompt adherence of images, read back by image analysis
  (``python -m ldm.shapes.judge DIR``, ``ldm-judge-shapes``);
* ``pastel_judge``: the same and whether the colours are pastel
  (``python -m ldm.shapes.pastel_judge DIR``, ``ldm-judge-pastel``);
* ``adherence``: ``ShapesAdherence``, the judge at each validation (the one Lightning module).

The commands that write the sets to disk are ``data/shapes/prepare.py`` (the shards) and
``data/shapes/style.py`` (the pastel style folder).

This module imports nothing, so the shard writer's worker processes load only what they use.
"""
