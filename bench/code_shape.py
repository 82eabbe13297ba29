"""The shape of the code a newcomer meets: entry-point lines, the largest files and functions,
the widest signatures, and the command-line modules (`python bench/code_shape.py [ROOT]`).

Counts physical lines (docstrings and comments included: they are read too).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ENTRY_POINTS = ("train.py", "sample.py")


def functions(tree: ast.AST, path: str):
    """(lines, parameters, qualified name) of every function and method in a module."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
            n -= bool(a.args and a.args[0].arg in ("self", "cls"))
            yield node.end_lineno - node.lineno + 1, n, f"{path}:{node.name}"


def console_scripts(pyproject: str) -> list[str]:
    """The names under `[project.scripts]` (tomllib is Python 3.11+; this runs on 3.10)."""
    names, inside = [], False
    for line in pyproject.splitlines():
        if line.startswith("["):
            inside = line.strip() == "[project.scripts]"
        elif inside and "=" in line and not line.lstrip().startswith("#"):
            names.append(line.split("=", 1)[0].strip())
    return names


def main(root: Path) -> None:
    files = sorted(p for d in ("ldm", "data") for p in (root / d).rglob("*.py"))
    files += [root / e for e in ENTRY_POINTS]
    sizes, funcs, mains = [], [], 0
    for p in files:
        text = p.read_text()
        rel = str(p.relative_to(root))
        sizes.append((len(text.splitlines()), rel))
        funcs += list(functions(ast.parse(text), rel))
        mains += "__main__" in text and p.name not in ENTRY_POINTS
    scripts = console_scripts((root / "pyproject.toml").read_text())
    print("| measure | value |\n|---|---|")
    for e in ENTRY_POINTS:
        print(f"| lines of {e} | {len((root / e).read_text().splitlines())} |")
    for n, name in sorted(sizes, reverse=True)[:5]:
        print(f"| file: {name} | {n} lines |")
    print(f"| files over 500 lines | {sum(n > 500 for n, _ in sizes)} |")
    for n, _, name in sorted(funcs, reverse=True)[:5]:
        print(f"| function: {name} | {n} lines |")
    print(f"| functions over 50 lines | {sum(n > 50 for n, _, _ in funcs)} |")
    for _, k, name in sorted(funcs, key=lambda f: -f[1])[:3]:
        print(f"| widest signature: {name} | {k} parameters |")
    print(f"| modules with a `__main__` | {mains} |")
    print(f"| console scripts | {len(scripts)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
