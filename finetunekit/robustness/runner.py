"""The robustness pass: a loaded image model scored on clean, attacked and corrupted copies of each batch.

The run's own eval transform (resize, center crop: the size the model was trained at) gives [0, 1] pixels;
its Normalize step is taken off and put in front of the model (`Normalized`), so attacks and corruptions
change pixels, clipped to [0, 1], and the model sees them normalized as in training. Clean accuracy is then
the same number `evaluate` gives (the same arithmetic, moved). Test-time augmentation stays off (an attack
needs one deterministic forward); a calibration temperature changes no prediction and is not applied.

Each batch is read once and scored under every condition; the figure of a condition is its mean over the
samples of a per-sample score: 1 or 0 for a single-label model (its accuracy), the fraction of labels
right at the model's threshold for a multi-label one (label accuracy).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..errors import UserError
from ..tasks import logits_of
from . import Plan, REPORT_KIND, refuse
from .attacks import ATTACKS
from .corruptions import CORRUPTIONS


class Normalized(nn.Module):
    """`module` fed (x - mean) / std: takes [0, 1] pixels, returns logits."""

    def __init__(self, module: nn.Module, mean, std):
        super().__init__()
        self.module = module
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.module, (x - self.mean) / self.std)


def split_normalize(transform):
    """(the transform without its Normalize step: PIL -> [0, 1] float tensor, its mean, its std)."""
    from torchvision import transforms as T

    steps = list(transform.transforms)
    found = [i for i, t in enumerate(steps) if isinstance(t, T.Normalize)]
    if len(found) != 1 or found[0] != len(steps) - 1:
        raise UserError("evaluate --attack/--corruptions: this model's preprocessing does not end in one Normalize "
                        f"step ({transform}); robustness needs the pixels before it")
    norm = steps.pop()
    return T.Compose(steps), list(map(float, norm.mean)), list(map(float, norm.std))


def pixel_loader(model, data: Path, plan: Plan):
    """(a loader of ([B, 3, H, W] pixels in [0, 1], targets), the model in front of its normalization, images
    skipped as unreadable). --limit draws its images with --seed (sorted, so the batches follow the data)."""
    from torch.utils.data import Subset

    from ..data import default_workers, make_loader

    pixels, mean, std = split_normalize(model.transform)
    loader, skipped = model.labelled_loader(data, plan.batch_size, transform=pixels)
    dataset = loader.dataset
    if plan.limit is not None and plan.limit < len(dataset):
        drawn = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(plan.seed))[:plan.limit]
        dataset = Subset(dataset, sorted(drawn.tolist()))
        loader = make_loader(dataset, plan.batch_size, train=False, workers=default_workers(), seed=0)
    return loader, Normalized(model.module, mean, std), skipped


class Scorer:
    """Per-sample scores of logits against targets: correct (0/1) for one label, the fraction of labels
    right for multi-label."""

    def __init__(self, task):
        self.kind, self.threshold = task.kind, getattr(task, "threshold", 0.5)
        self.metric = "accuracy" if self.kind == "classification" else "label_accuracy"

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "classification":
            return (logits.argmax(-1) == y).double()
        return ((logits.float().sigmoid() > self.threshold) == (y > 0.5)).double().mean(-1)


def conditions(plan: Plan) -> list[dict]:
    """Every row of the report, in table order: clean, each attack at each eps, each corruption at each
    severity."""
    rows: list[dict] = [{"condition": "clean"}]
    for name in plan.attacks:
        for eps, text in zip(plan.eps, plan.eps_text):
            row = {"condition": name, "attack": name, "eps": eps, "eps_text": text}
            if name == "pgd":
                row.update(steps=plan.pgd_steps,
                           step_size=2.5 * eps / plan.pgd_steps if plan.pgd_step_size is None else plan.pgd_step_size)
            rows.append(row)
    for name in plan.corruptions:
        for severity in plan.severities:
            rows.append({"condition": name, "corruption": name, "severity": severity})
    return rows


def perturbed(row: dict, net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss, seeds: list[int]) -> torch.Tensor:
    if "attack" in row:
        options = {"steps": row["steps"], "step_size": row["step_size"]} if row["attack"] == "pgd" else {}
        return ATTACKS[row["attack"]](net, x, y, loss, row["eps"], seeds, **options)
    if "corruption" in row:
        return CORRUPTIONS[row["corruption"]](x, row["severity"], seeds)
    return x


def evaluate_robustness(run: Path, data: Path, plan: Plan, cpu: bool = False, model=None) -> dict:
    """The report: clean, attacked and corrupted figures of `run`'s model on `data` (`model`: one already
    loaded by finetunekit.load)."""
    from ..artifacts import load
    from ..inference import DetectionModel, ImageModel
    from ..progress import Progress

    model = model if model is not None else load(run)
    if not isinstance(model, ImageModel) or isinstance(model, DetectionModel) or \
            model.task.kind not in ("classification", "multilabel"):
        refuse(model.folder, getattr(model, "task_name", None) or ("detection" if isinstance(model, DetectionModel)
                                                                   else model.table.get("task", model.task.kind)))
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    loader, net, skipped = pixel_loader(model, data, plan)
    net.to(device).eval()
    for p in net.parameters():  # gradients with respect to the inputs only
        p.requires_grad_(False)
    scorer, loss = Scorer(model.task), model.task.eval_loss
    rows = conditions(plan)
    sums = [0.0] * len(rows)
    fooled = [0] * len(rows)  # single-label attacks: clean-correct samples the attack turned wrong
    seconds = [0.0] * len(rows)
    n = clean_right = width = 0
    started = time.perf_counter()
    passes = Progress(loader, desc="robustness", total=len(loader))
    for x, y in passes:
        x, y, width = x.to(device), y.to(device), x.shape[-1]
        seeds = [plan.seed * 1_000_003 + n + i for i in range(len(x))]
        clean = None
        for i, row in enumerate(rows):
            t0 = time.perf_counter()
            x_row = perturbed(row, net, x, y, loss, seeds)
            with torch.no_grad():
                score = scorer(net(x_row), y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[i] += time.perf_counter() - t0
            sums[i] += float(score.sum())
            if clean is None:
                clean = score
            elif "attack" in row and scorer.kind == "classification":
                fooled[i] += int(((clean == 1) & (score == 0)).sum())
        n += len(x)
        clean_right += int((clean == 1).sum()) if scorer.kind == "classification" else 0
        if passes.due(passes.count + 1):
            passes.show({"images": str(n)})
    passes.close()
    if n == 0:
        raise UserError(f"--data {data}: no images to score")
    base = sums[0] / n
    report: dict = {"kind": REPORT_KIND, "version": __version__, "run": str(run), "model": str(model.folder),
                    "data": str(data), "samples": n, "skipped": skipped, "metric": scorer.metric,
                    "device": str(device), "seed": plan.seed, "limit": plan.limit,
                    "tta": f"off (the model validates with tta {model.tta})" if model.tta != "none" else "none",
                    "clean": {scorer.metric: base, "seconds": round(seconds[0], 3)}, "attacks": [],
                    "corruptions": []}
    for i, row in enumerate(rows[1:], start=1):
        figures = {scorer.metric: sums[i] / n, "drop": base - sums[i] / n, "seconds": round(seconds[i], 3)}
        if "attack" in row:
            entry = {k: row[k] for k in ("attack", "eps", "eps_text", "steps", "step_size") if k in row}
            if scorer.kind == "classification":
                entry["success_rate"] = fooled[i] / clean_right if clean_right else 0.0
            report["attacks"].append({**entry, **figures})
        else:
            corruption = CORRUPTIONS[row["corruption"]]
            value = corruption.setting(row["severity"], width) if row["severity"] else None
            report["corruptions"].append({"corruption": row["corruption"], "severity": row["severity"],
                                          "parameter": corruption.parameter, "value": value, **figures})
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


def table(report: dict) -> str:
    """The report as an aligned text table: one row per condition, its figure and its change from clean."""
    metric, clean = report["metric"], report["clean"][report["metric"]]
    rows = [("clean", "", f"{clean:.4f}", "", f"{report['clean']['seconds']:.1f}")]
    for r in report["attacks"] + report["corruptions"]:
        if "attack" in r:
            name, setting = r["attack"], f"eps {r['eps_text']}" + (f", {r['steps']} steps" if "steps" in r else "")
        else:
            name = r["corruption"]
            setting = f"severity {r['severity']} " + (f"({r['parameter']} {r['value']:g})" if r["value"] is not None
                                                       else "(unchanged)")
        rows.append((name, setting, f"{r[metric]:.4f}", f"{r[metric] - clean:+.4f}", f"{r['seconds']:.1f}"))
    head = ("condition", "setting", metric, "change", "seconds")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]

    def line(r: tuple) -> str:  # names and settings to the left, figures to the right
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()

    out = [f"robustness of {report['model']} on {report['data']}: {report['samples']} images, {report['device']}, "
           f"{report['seconds']:.1f} s"]
    out += [line(head), *(line(r) for r in rows)]
    if report["tta"] != "none":
        out.append(f"test-time augmentation: {report['tta']}")
    return "\n".join(out) + "\n"
