"""The report's figures: matplotlib on its Agg/SVG canvases (no pyplot, no display, no global backend),
each returned as inline SVG text (text kept as text, not glyph paths: smaller files)."""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Sequence

import matplotlib
from matplotlib.figure import Figure

RC = {"svg.fonttype": "none", "svg.hashsalt": "finetunekit", "font.size": 9, "axes.spines.top": False,
      "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 100}
COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#0a7b83", "#e16f24", "#57606a"]


def styled(draw):
    """Run a figure function under RC: axes read the style when they are made, text when it is drawn."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(RC):
            return draw(*args, **kwargs)
    return wrapper


def figure(width: float = 5.0, height: float = 3.2) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def svg(fig: Figure) -> str:
    """The figure as an inline <svg> element (no XML prolog, no DOCTYPE, no comments)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", pad_inches=0.05)
    text = buf.getvalue()
    text = re.sub(r"<\?xml[^>]*\?>|<!DOCTYPE[^>]*>|<!--.*?-->", "", text, flags=re.S)
    return text.strip()


def lines(ax, series: Sequence[tuple[str, Sequence[float], Sequence[float | None], str]], title: str,
          ylabel: str, log: bool = False) -> None:
    """series: (label, x, y, linestyle); None in y is a gap."""
    for i, (label, x, y, style) in enumerate(series):
        pts = [(a, b) for a, b in zip(x, y) if b is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, style, label=label, color=COLORS[i % len(COLORS)], marker="o" if len(xs) <= 30 else None,
                markersize=3, linewidth=1.5)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if log and all(b is None or b > 0 for _, _, y, _ in series for b in y):
        ax.set_yscale("log")
    epochs = sorted({a for _, x, _, _ in series for a in x})
    if 0 < len(epochs) <= 12:  # few epochs: a tick at each (one epoch: a point in the middle, not at 0.96..1.04)
        ax.set_xticks(epochs)
        ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    if any(any(v is not None for v in y) for _, _, y, _ in series):
        ax.legend(fontsize=8, frameon=False)


@styled
def line_chart(series, title: str, ylabel: str, log: bool = False, width: float = 4.6, height: float = 3.0) -> str:
    fig = figure(width, height)
    lines(fig.add_subplot(), series, title, ylabel, log)
    return svg(fig)


@styled
def heatmap(matrix: Sequence[Sequence[float]], labels: Sequence[str], title: str, counts: bool) -> str:
    """A confusion matrix: rows true, columns predicted; cell text when there are at most 20 classes."""
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    n = len(labels)
    size = min(9.0, max(3.4, 0.34 * n + 1.4))
    fig = figure(size, size * 0.9)
    ax = fig.add_subplot()
    ax.grid(False)
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=max(float(m.max()), 1e-9) if counts else 1.0)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ticks = range(n)
    short = [lab if len(lab) <= 14 else lab[:13] + "…" for lab in labels]
    ax.set_xticks(ticks, short if n <= 40 else [""] * n, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center",
                  fontsize=8)
    ax.set_yticks(ticks, short if n <= 40 else [""] * n, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        top = m.max() if m.size else 0
        for i in range(n):
            for j in range(n):
                v = m[i, j]
                text = f"{int(v)}" if counts else (f"{v:.2f}" if v else "0")
                ax.text(j, i, text, ha="center", va="center", fontsize=7 if n > 10 else 8,
                        color="white" if v > 0.6 * (top if counts else 1.0) else "#1f2328")
    return svg(fig)


@styled
def reliability(panels: Sequence[tuple[str, list[dict]]]) -> str:
    """Side by side, one per (title, bins): bars of accuracy per confidence bin against the diagonal, and
    the samples per bin below."""
    fig = figure(4.2 * len(panels), 3.6)
    axes = fig.subplots(2, len(panels), squeeze=False, height_ratios=[3, 1], sharex=True)
    for k, (title, bins) in enumerate(panels):
        ax, count_ax = axes[0][k], axes[1][k]
        width = bins[0]["high"] - bins[0]["low"] if bins else 1 / 15
        used = [b for b in bins if b["count"]]
        ax.bar([b["low"] for b in used], [b["accuracy"] for b in used], width=width, align="edge",
               color=COLORS[0], alpha=0.8, edgecolor="white", label="accuracy")
        ax.bar([b["low"] for b in used], [b["confidence"] - b["accuracy"] for b in used], width=width, align="edge",
               bottom=[b["accuracy"] for b in used], fill=False, hatch="////", edgecolor=COLORS[1], linewidth=0.8,
               label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="#57606a", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7, frameon=False, loc="upper left")
        count_ax.bar([b["low"] for b in bins], [b["count"] for b in bins], width=width, align="edge",
                     color="#57606a", alpha=0.7)
        count_ax.set_xlabel("confidence")
        count_ax.set_ylabel("samples")
    return svg(fig)


@styled
def scatter(true: Sequence[float], pred: Sequence[float], title: str) -> str:
    fig = figure(4.2, 3.6)
    ax = fig.add_subplot()
    ax.scatter(true, pred, s=8, alpha=0.6, color=COLORS[0], edgecolors="none")
    lo, hi = min(min(true), min(pred)), max(max(true), max(pred))
    ax.plot([lo, hi], [lo, hi], "--", color="#57606a", linewidth=1)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(title)
    return svg(fig)


@styled
def histogram(values: Sequence[float], title: str, xlabel: str) -> str:
    fig = figure(4.2, 3.6)
    ax = fig.add_subplot()
    ax.hist(values, bins=30, color=COLORS[0], alpha=0.8)
    ax.axvline(0, color="#57606a", linestyle="--", linewidth=1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    return svg(fig)
