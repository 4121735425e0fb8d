"""A confusion matrix as an aligned text table (`finetunekit evaluate` prints it): rows are the true classes,
columns the predicted ones. Past `limit` classes, the `limit` classes with the most errors (as the true or the
predicted class) keep their rows and columns, in their order, and the others are summed into one `(N others)`
row and column, so every row and column still adds up."""

from __future__ import annotations

from collections.abc import Sequence

LIMIT = 20  # classes shown one by one
WIDTH = 12  # a longer class name: columns are numbered (rows say "3 name"); row labels are cut at 2 x this
CORNER = "true \\ predicted"


def _short(name: str, width: int) -> str:  # a row label cut to `width` characters
    return name if len(name) <= width else name[:width - 1] + "~"


def table(matrix: Sequence[Sequence[int]], classes: Sequence[str], limit: int = LIMIT) -> str:
    n = len(classes)
    if len(matrix) != n or any(len(row) != n for row in matrix):
        raise ValueError(f"a {len(matrix)}-row confusion matrix for {n} classes")
    keep = list(range(n))
    if n > limit:
        errors = [sum(matrix[i]) - matrix[i][i] + sum(matrix[j][i] for j in range(n)) - matrix[i][i]
                  for i in range(n)]
        keep = sorted(sorted(range(n), key=lambda i: (-errors[i], i))[:limit])
    rest = [i for i in range(n) if i not in set(keep)]
    groups = [[i] for i in keep] + ([rest] if rest else [])
    names = [classes[i] for i in keep] + ([f"({len(rest)} others)"] if rest else [])
    cells = [[sum(matrix[i][j] for i in rows for j in cols) for cols in groups] for rows in groups]
    rows = [_short(c, 2 * WIDTH) for c in names]
    heads = names
    if any(len(c) > WIDTH for c in names):  # long names: columns by number, each row's number before its name
        heads = [str(k + 1) for k in range(len(names))]
        rows = [f"{k + 1:>{len(heads[-1])}} {r}" for k, r in enumerate(rows)]
    widths = [max(len(h), len(str(max(r[k] for r in cells)))) for k, h in enumerate(heads)]
    label = max(len(CORNER), *(len(r) for r in rows))
    lines = [f"{CORNER:<{label}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, widths))]
    for name, row in zip(rows, cells):
        lines.append(f"{name:<{label}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(row, widths)))
    if rest:
        lines.append(f"({n} classes: the {limit} with the most errors shown, the other {len(rest)} summed)")
    return "\n".join(lines) + "\n"
