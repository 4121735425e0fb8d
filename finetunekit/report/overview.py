"""The report's first section: the headline scores, the run's facts (device, precision, wall time, speed),
the library versions, and the resolved recipe."""

from __future__ import annotations

import platform
from importlib import metadata

from .page import Section, cards, esc, kv
from .run_files import HEADLINE, RunFiles

PACKAGES = ("finetunekit", "torch", "torchvision", "timm", "transformers", "accelerate", "torchmetrics", "peft")
FACTS = (("task", "task"), ("model", "model"), ("strategy", "strategy"), ("device", "device"),
         ("precision", "precision"), ("image_size", "image size"), ("max_length", "max length"),
         ("epochs_run", "epochs run"), ("best_epoch", "best epoch"), ("stopped_early", "stopped early"),
         ("monitor", "monitored metric"), ("wall_seconds", "wall time (s)"), ("train_seconds", "training time (s)"),
         ("train_samples_per_s", "training samples/s"), ("peak_gpu_memory_mb", "peak GPU memory (MB)"),
         ("skipped", "skipped files"), ("unreadable_in_training", "unreadable in training"),
         ("resumed_from", "resumed from"))


def versions() -> list[tuple[str, str]]:
    out = [("python", platform.python_version())]
    for name in PACKAGES:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return out


def section(run: RunFiles) -> Section:
    parts = []
    m, run_table = run.metrics, ""
    if m is None:
        parts.append(f'<p class="note">Scores and run facts omitted: {esc(run.note("metrics.json"))}.</p>')
    else:
        headline = HEADLINE.get(run.kind or "", ())
        items = [(f"{split} {k}", s[k]) for split in ("val", "test") if (s := run.scores(split))
                 for k in headline if isinstance(s.get(k), (int, float))]
        if items:
            parts.append(cards(items))
        facts = [(label, m[key]) for key, label in FACTS if m.get(key) not in (None, "")]
        rss = m.get("peak_rss_mb")
        if isinstance(rss, dict) and rss.get("process") is not None:
            facts.append(("peak memory (MB)", rss["process"]))
        run_table = "<div><h3>Run</h3>" + kv(facts) + "</div>"
    parts.append('<div class="side">' + run_table + "<div><h3>Versions</h3>" + kv(versions()) +
                 '<p class="note">Installed when this report was written.</p></div></div>')
    if run.recipe_text is None:
        parts.append(f'<p class="note">Recipe omitted: {esc(run.note("recipe.yaml"))}.</p>')
    else:
        parts.append(f"<details><summary>recipe.yaml (the resolved recipe: <code>finetunekit fit --config "
                     f"{esc(run.path / 'recipe.yaml')}</code> runs it again)</summary><pre>{esc(run.recipe_text)}"
                     f"</pre></details>")
    return Section("overview", "Run and environment", "".join(parts))
