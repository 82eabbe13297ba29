"""Helpers shared by the command lines: config resolvers, part architectures, error reporting."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, NoReturn

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
PRETRAINED = ("ldm.checkpoints.pretrained", "ldm.checkpoints.layout.pretrained")


def register_resolvers() -> None:
    """`${root:}` is the repository root, so default paths work from any working directory."""
    if not OmegaConf.has_resolver("root"):
        OmegaConf.register_new_resolver("root", lambda: str(ROOT))


def architecture(node):
    """A part's config without its weight-loading wrapper (`ldm.checkpoints.pretrained`)."""
    if isinstance(node, dict) and node.get("_target_") in PRETRAINED:
        return node["module"]
    return node


class ConfigError(ValueError):
    """Settings that cannot work together (or on this machine); the message says what to set."""


def fail(message: object) -> NoReturn:
    """End a command line with one `error: ...` line on stderr and exit status 1 (as Hydra's own
    config errors do; argparse keeps 2 for a malformed command line)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def exit_on(*errors: type[BaseException]) -> Callable:
    """Turn the listed exceptions into `fail(...)`: they describe the user's input, so a
    traceback would only hide the message. Every command line of the project uses it."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except errors as e:
                fail(e)

        return run

    return wrap
