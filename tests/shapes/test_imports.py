"""ldm/README.md: of ldm.shapes only adherence.py is Lightning's; the rest imports neither
Lightning nor torch, so the shard writer's worker processes stay light (a fresh interpreter, so
no other test's import counts)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_shapes_world_but_its_callback_is_free_of_lightning_and_torch():
    modules = ("render", "dataset", "pastel", "judge", "pastel_judge")
    code = (
        "import sys; "
        + "; ".join(f"import ldm.shapes.{name}" for name in modules)
        + "; sys.exit(any(m.split('.')[0] in ('lightning', 'torch') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
