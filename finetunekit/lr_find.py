"""`finetunekit lr-find`: the learning-rate range test (Smith 2017; fastai's lr_find).

Train on the recipe's data, model and strategy for a few hundred steps while the learning rate grows
exponentially from `start` to `end`; record the loss (smoothed), stop once it diverges, and suggest a
tenth of the learning rate at the lowest smoothed loss (fastai's "minimum" rule: the steepest-slope rule
is noisier on short tests). Writes lr_find.csv and lr_find.svg (a plot, drawn
without a plotting library) to the output directory. The weights are thrown away.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from .config import Recipe
from .errors import UserError

log = logging.getLogger("finetunekit")


def lr_range_test(recipe: Recipe, out: Path, *, start: float = 1e-7, end: float = 10.0, steps: int = 100) -> dict:
    import torch
    from accelerate.utils import set_seed

    from .build import accelerator as make_accelerator, with_model_precision
    from .build import peft, plan_and_optimizer, playbook
    from .inputs import prepare_inputs
    from .preflight import preflight
    from . import twostage
    from .strategies import apply_phase, set_train_mode

    if not 0 < start < end:
        raise UserError(f"--start {start} --end {end}: expected 0 < start < end")
    if steps < 10:
        raise UserError(f"--steps {steps}: expected at least 10")
    if recipe.train.batch_size == "auto":
        raise UserError("--batch-size auto: is for fit; give lr-find the batch size fit will use")
    preflight(recipe)
    recipe = twostage.resolve(recipe)  # --init: its model, and its weights below
    t = recipe.train
    set_seed(t.seed)
    accelerator = make_accelerator(t.precision, 1, t.cpu, None)
    inputs = prepare_inputs(recipe.task, recipe.data, recipe.model, t, gpu=accelerator.device.type == "cuda")
    if twostage.apply(recipe.model, inputs):
        log.info("%s", inputs.summary[-1])
    accelerator = with_model_precision(accelerator, t, inputs.backbone.module, None)
    recipe, decided = playbook(recipe, inputs)
    for line in decided + [peft(recipe.model, inputs)]:  # --peft: the adapters are what the range test trains
        if line:
            log.info("%s", line)
    t, backbone, task = recipe.train, inputs.backbone, inputs.task
    plan, optimizer = plan_and_optimizer(t, backbone, start)
    apply_phase(plan.phases[0], backbone.module, optimizer)  # the phase's lr multiple, as the loop applies it
    module, optimizer, loader = accelerator.prepare(backbone.module, optimizer, inputs.train_loader)
    set_train_mode(module, accelerator.unwrap_model(module))
    params = [p for p in module.parameters() if p.requires_grad]
    rows, avg, best = [], 0.0, math.inf
    batches = iter(loader)
    for step in range(steps):
        lr = start * (end / start) ** (step / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        loss = task.step(module, task.prepare(batch)).loss
        accelerator.backward(loss)
        if t.clip_grad:
            accelerator.clip_grad_norm_(params, t.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if not math.isfinite(value):
            break
        avg = 0.98 * avg + 0.02 * value
        smoothed = avg / (1 - 0.98 ** (step + 1))  # bias-corrected running mean
        rows.append((lr, value, smoothed))
        best = min(best, smoothed)
        if step > 10 and smoothed > 4 * best:
            break  # diverged
    if len(rows) < 5:
        raise UserError("lr-find: the loss diverged at once; lower --start")
    lowest = min(rows, key=lambda r: r[2])[0]
    suggestion = lowest / 10
    out.mkdir(parents=True, exist_ok=True)
    with (out / "lr_find.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["lr", "loss", "smoothed_loss"])
        w.writerows(rows)
    (out / "lr_find.svg").write_text(_svg(rows, suggestion), encoding="utf-8")
    log.info("lr-find: %d steps, lr %.3g to %.3g; lowest smoothed loss at lr %.3g; suggested lr %.3g (plot: %s)",
             len(rows), rows[0][0], rows[-1][0], lowest, suggestion, out / "lr_find.svg")
    return {"suggested_lr": suggestion, "lowest_loss_lr": lowest, "steps": len(rows)}


def _svg(rows: list[tuple[float, float, float]], mark: float, w: int = 640, h: int = 360) -> str:
    """Smoothed loss against log10(lr), with the suggested lr marked."""
    xs = [math.log10(r[0]) for r in rows]
    ys = [r[2] for r in rows]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys) or 1.0
    pad = 40

    def px(x: float) -> float:
        return pad + (x - x0) / ((x1 - x0) or 1) * (w - 2 * pad)

    def py(y: float) -> float:
        return h - pad - (y - y0) / ((y1 - y0) or 1) * (h - 2 * pad)

    points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
    ticks = "".join(f'<text x="{px(d):.1f}" y="{h - 15}" font-size="11" text-anchor="middle">1e{d}</text>'
                    for d in range(math.ceil(x0), math.floor(x1) + 1))
    m = px(math.log10(mark))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">'
            f'<rect width="{w}" height="{h}" fill="white"/>'
            f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="2"/>'
            f'<line x1="{m:.1f}" y1="{pad}" x2="{m:.1f}" y2="{h - pad}" stroke="#d62728" stroke-dasharray="4"/>'
            f'<text x="{m + 4:.1f}" y="{pad + 12}" font-size="12" fill="#d62728">suggested {mark:.2g}</text>'
            f'{ticks}<text x="{w / 2}" y="{h - 2}" font-size="12" text-anchor="middle">learning rate</text>'
            f'<text x="12" y="{h / 2}" font-size="12" transform="rotate(-90 12 {h / 2})" '
            f'text-anchor="middle">smoothed loss ({y0:.3g} to {y1:.3g})</text></svg>\n')
