"""The longest functions and the largest modules of the package, measured with `ast` (re-run after a change):

    python tools/code_size.py [--top 10] [PACKAGE_DIR]

A function's length counts its lines from `def` to its last line (docstring and comments included); a
module's counts all its lines. Nested functions are listed on their own and also count in their parent.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def functions(root: Path) -> list[tuple[int, str]]:
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        stack: list[tuple[ast.AST, str]] = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        out.append((child.end_lineno - child.lineno + 1, f"{path.relative_to(root.parent)}:{name}"))
                    stack.append((child, name + "."))
    return sorted(out, reverse=True)


def modules(root: Path) -> list[tuple[int, str]]:
    return sorted(((len(p.read_text(encoding="utf-8").splitlines()), str(p.relative_to(root.parent)))
                   for p in root.rglob("*.py")), reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parent.parent / "finetunekit"))
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    root = Path(args.package)
    print("longest functions (lines):")
    for n, name in functions(root)[:args.top]:
        print(f"  {n:4d}  {name}")
    print("largest modules (lines):")
    for n, name in modules(root)[:args.top]:
        print(f"  {n:4d}  {name}")
    total = sum(n for n, _ in modules(root))
    print(f"total: {total} lines in {len(modules(root))} modules")


if __name__ == "__main__":
    main()
