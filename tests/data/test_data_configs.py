import pytest

"""The data configs compose, instantiate and read shards, mixing lists included."""
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm.config import ROOT, register_resolvers
from ldm.data.filters import MetadataFilter
from tests.data.shard_helpers import write_keyed_shards

pytestmark = pytest.mark.usefixtures("single_thread")  # tensor ops stall on busy shared cores

register_resolvers()


def compose_data(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return compose("train", overrides=list(overrides)).data


def test_mixed_sources_from_the_command_line_read_through_the_config(tmp_path):
    write_keyed_shards(tmp_path, [4, 4], prefix="a")
    write_keyed_shards(tmp_path, [4], prefix="b")
    cfg = compose_data(
        "data=webdataset",
        "data.num_workers=0",
        "data.batch_size=2",
        "data.image_size=8",
        "data.batches_per_epoch=3",
        "data.filters.min_width=24",
        "data.filters.min_height=20",
        f"data.train_shards=[{{urls: '{tmp_path}/a*.tar', weight: 0.7}},"
        f"{{urls: '{tmp_path}/b*.tar', weight: 0.3}}]",
    )
    dm = instantiate(cfg)
    assert dm.options.filters == MetadataFilter(min_width=24, min_height=20)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and all(len(b["key"]) == 2 for b in batches)
    assert sum(b["counts"]["kept"] for b in batches) >= 6  # 24 x 20 images pass (inclusive)
    assert not any(v for b in batches for k, v in b["counts"].items() if k != "kept")


def test_exact_config_reads_every_sample_once(tmp_path):
    keys = write_keyed_shards(tmp_path, [5, 2])
    cfg = compose_data(
        "data=webdataset_exact",
        "data.num_workers=0",
        "data.batch_size=3",
        "data.image_size=8",
        f"data.train_shards={tmp_path}/*.tar",
    )
    batches = list(instantiate(cfg).train_dataloader())
    assert sorted(k for b in batches for k in b["key"]) == sorted(keys) and len(batches) == 3


def test_the_readers_are_plain_pytorch():
    """ldm/README.md: only the data modules (ldm.data.modules) are Lightning's; the readers
    and the latent cache import without it (a fresh interpreter, so no other test's import
    counts)."""
    import subprocess
    import sys

    code = (
        "import sys, ldm.data.options, ldm.data.webdataset, ldm.data.latents, "
        "ldm.data.latents_write; "
        "sys.exit(any(m.split('.')[0] == 'lightning' for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
