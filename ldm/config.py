"""Helpers shared by the two entry points (train.py, sample.py): resolvers and error reporting."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent


def register_resolvers() -> None:
    """`${root:}` is the repository root, so default paths work from any working directory."""
    if not OmegaConf.has_resolver("root"):
        OmegaConf.register_new_resolver("root", lambda: str(ROOT))


def architecture(node):
    """A part's config without its weight-loading wrapper (`ldm.checkpoint.pretrained`)."""
    if isinstance(node, dict) and str(node.get("_target_", "")).endswith("checkpoint.pretrained"):
        return node["module"]
    return node


def clear_errors(*errors: type[BaseException]) -> Callable:
    """Turn the listed exceptions into one `error: ...` line and exit status 2: they describe
    the user's input, so a traceback would only hide the message."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except errors as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
        return run
    return wrap
