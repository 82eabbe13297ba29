"""Images from a checkpoint: `python sample.py ckpt=FILE prompt="a red circle" n=8`, the same
command as the console script `ldm-sample` (its main, `ldm.cli.sample`, composes
`configs/sample.yaml` and calls `ldm.sampling.sample_from_config`).

Writes one PNG per image (prompt, seed, sampler, steps and guidance scale in its text metadata)
and a grid of them all into `out_dir`, never overwriting a file; see `ldm.sampling` for the file
names and how `prompt=` is read, and `configs/sample.yaml` for every option.
"""

from ldm.cli.sample import main

if __name__ == "__main__":
    main()
