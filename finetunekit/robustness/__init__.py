"""`finetunekit evaluate RUN --attack fgsm,pgd --eps 2/255,8/255 --corruptions all`: an image model's accuracy
under adversarial perturbations and common corruptions, beside its clean accuracy (docs/robustness.md).

One module per family, each with its registry, holding the names this module lists for the CLI
(tests/test_robustness.py holds them equal):

    attacks.py       ATTACKS: fgsm, pgd (L-infinity, in [0, 1] pixel space, before the model's normalization)
    corruptions.py   CORRUPTIONS: gaussian-noise, gaussian-blur, jpeg, brightness, at severities 1-5
    runner.py        the pass: the run's data as [0, 1] pixels, the model behind its own normalization, every
                     condition on every batch; the table and the JSON report

This module imports no torch: the CLI checks the flags, the model's task, the data and the output path
before anything heavy loads.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from ..errors import UserError, did_you_mean

ATTACK_NAMES = ("fgsm", "pgd")
CORRUPTION_NAMES = ("gaussian-noise", "gaussian-blur", "jpeg", "brightness")
SEVERITIES = range(0, 6)  # 0: the image unchanged (a check), 1-5: ImageNet-C's scale
REPORT_KIND = "finetunekit-robustness"  # the JSON report's "kind": an --output holding another file is refused
TASKS = ("image-classification", "image-multilabel")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """evaluate's robustness flags (cli.py adds them to its `evaluate` parser)."""
    g = parser.add_argument_group("robustness (images; docs/robustness.md)")
    g.add_argument("--attack", metavar="NAMES", help=f"adversarial attacks, comma-separated: {', '.join(ATTACK_NAMES)} "
                   "(L-infinity, on [0, 1] pixels before the model's normalization)")
    g.add_argument("--eps", default="2/255,8/255", metavar="LIST",
                   help="the attacks' radii in [0, 1] pixel units, comma-separated; 8/255 = 8 grey levels "
                        "(default: 2/255,8/255)")
    g.add_argument("--pgd-steps", type=int, default=10, metavar="N", help="PGD's steps (default: 10)")
    g.add_argument("--pgd-step-size", metavar="X", help="PGD's step in pixel units (default: 2.5 * eps / steps)")
    g.add_argument("--corruptions", metavar="NAMES", help=f"common corruptions, comma-separated, or all: "
                   f"{', '.join(CORRUPTION_NAMES)}")
    g.add_argument("--severities", default="1,3,5", metavar="LIST",
                   help="the corruptions' severities, 1-5 as in ImageNet-C, 0 the clean image (default: 1,3,5)")
    g.add_argument("--limit", type=int, metavar="N", help="score N images drawn from the data (seeded; default: all)")
    g.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seeds --limit's draw, PGD's random start and the noise (default: 0)")


ATTACK_FLAGS = {"eps": "2/255,8/255", "pgd_steps": 10, "pgd_step_size": None}
CORRUPTION_FLAGS = {"severities": "1,3,5"}
SHARED_FLAGS = {"limit": None, "seed": 0}


def requested(args: argparse.Namespace) -> bool:
    """Whether `evaluate` was asked for robustness (an attack or a corruption); a flag of theirs given without
    them is a one-line error, not ignored."""
    attack, corruptions = getattr(args, "attack", None), getattr(args, "corruptions", None)
    unused = {**(ATTACK_FLAGS if not attack else {}), **(CORRUPTION_FLAGS if not corruptions else {}),
              **(SHARED_FLAGS if not attack and not corruptions else {})}
    given = [name for name, default in unused.items() if getattr(args, name, default) != default]
    if given:
        flag = "--" + given[0].replace("_", "-")
        needs = "--corruptions" if given[0] in CORRUPTION_FLAGS else \
            "--attack" if given[0] in ATTACK_FLAGS else "--attack or --corruptions"
        raise UserError(f"evaluate: {flag} applies with {needs}")
    return bool(attack or corruptions)


def parse_fraction(text: str, flag: str) -> float:
    """'8/255' or '0.03' -> a float in [0, 1] (a one-line error naming `flag` otherwise)."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{flag} {text}: expected a number in [0, 1] such as 8/255 or 0.03") from None
    if not 0 <= value <= 1:
        raise UserError(f"{flag} {text}: expected a number in [0, 1] (pixel units: 8/255 = 8 grey levels)")
    return value


def parse_names(text: str, names: tuple[str, ...], flag: str) -> list[str]:
    out = []
    for name in (n.strip() for n in text.split(",")):
        if name == "all" and flag == "--corruptions":
            out += [n for n in names if n not in out]
            continue
        if name not in names:
            raise UserError(f"{flag} {name}: not one of {', '.join(names)}{did_you_mean(name, names)}")
        if name not in out:
            out.append(name)
    return out


@dataclass
class Plan:
    """What to measure, checked; `eps_text` keeps the user's spelling (8/255) for the table."""

    attacks: list[str] = field(default_factory=list)
    eps: list[float] = field(default_factory=list)
    eps_text: list[str] = field(default_factory=list)
    pgd_steps: int = 10
    pgd_step_size: float | None = None
    corruptions: list[str] = field(default_factory=list)
    severities: list[int] = field(default_factory=list)
    limit: int | None = None
    seed: int = 0
    batch_size: int = 64


def plan_of(args: argparse.Namespace) -> Plan:
    plan = Plan(pgd_steps=args.pgd_steps, limit=args.limit, seed=args.seed, batch_size=args.batch_size)
    if args.attack:
        plan.attacks = parse_names(args.attack, ATTACK_NAMES, "--attack")
        texts = [t.strip() for t in args.eps.split(",") if t.strip()]
        if not texts:
            raise UserError(f"--eps {args.eps!r}: expected radii such as 2/255,8/255")
        plan.eps, plan.eps_text = [parse_fraction(t, "--eps") for t in texts], texts
        if args.pgd_steps < 1:
            raise UserError(f"--pgd-steps {args.pgd_steps}: expected at least 1")
        if args.pgd_step_size is not None:
            plan.pgd_step_size = parse_fraction(args.pgd_step_size, "--pgd-step-size")
    if args.corruptions:
        plan.corruptions = parse_names(args.corruptions, CORRUPTION_NAMES, "--corruptions")
        try:
            plan.severities = sorted({int(s) for s in args.severities.split(",") if s.strip()})
        except ValueError:
            raise UserError(f"--severities {args.severities}: expected integers from 0 to 5, e.g. 1,3,5") from None
        if not plan.severities or any(s not in SEVERITIES for s in plan.severities):
            raise UserError(f"--severities {args.severities}: expected integers from 0 to 5, e.g. 1,3,5")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: expected at least 1")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: expected at least 1")
    return plan


def check_task(folder: Path) -> None:
    """Refuse, from the model folder's config.json alone, what robustness does not cover."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the loader names what is wrong with the folder
    ours = config.get("finetunekit", {}) if isinstance(config, dict) else {}
    task = ours.get("task") if isinstance(ours, dict) else None
    if task is not None and task not in TASKS:
        refuse(folder, task)


def refuse(folder: Path, task: str) -> None:
    why = {"text-classification": "adversarial text attacks are out of scope",
           "text-multilabel": "adversarial text attacks are out of scope",
           "text-regression": "adversarial text attacks are out of scope",
           "detection": "detectors are scored by mAP over boxes, not accuracy",
           "image-regression": "a regression model has no accuracy to lose"}.get(task, "")
    raise UserError(f"evaluate --attack/--corruptions: {folder} is a {task} model; robustness covers image "
                    f"classification and multi-label models{f' ({why})' if why else ''}")


def default_data(run: Path) -> Path:
    """The run's test set (recipe.yaml's data.test), for evaluate without --data."""
    from ..config import read_yaml

    recipe = run / "recipe.yaml"
    test = None
    if recipe.is_file():
        data = (read_yaml(recipe) or {}).get("data") or {}
        test = data.get("test") if isinstance(data, dict) else None
    if not test:
        raise UserError(f"evaluate: give --data PATH ({run} has no test set in a recipe.yaml to default to)")
    if not Path(test).exists():
        raise UserError(f"evaluate: {run}'s test set {test} is not there any more; give --data PATH")
    return Path(test)


def output_path(run: Path, output: str | None) -> Path:
    """Where the report goes: --output (replaced only when it is an earlier robustness report), else
    RUN/robustness.json, or robustness-2.json, -3... beside an earlier one."""
    if output:
        target = Path(output)
        if target.is_dir():
            raise UserError(f"--output {output}: a folder; expected a file name such as robustness.json")
        if target.exists() and not is_report(target):
            raise UserError(f"--output {output}: exists and is not a robustness report; choose another name or "
                            f"remove it")
        if not target.parent.is_dir():
            raise UserError(f"--output {output}: its folder {target.parent} does not exist")
        return target
    target, n = run / "robustness.json", 2
    while target.exists():
        target, n = run / f"robustness-{n}.json", n + 1
    return target


def is_report(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("kind") == REPORT_KIND
    except (OSError, ValueError, AttributeError):
        return False


def main(args: argparse.Namespace) -> int:
    """`finetunekit evaluate RUN --attack ... --corruptions ...`: checks first, then the pass, the table, the JSON."""
    from ..rundir import find_model_folder

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("evaluate --attack/--corruptions runs in one process; start it without a launcher")
    runs = args.run if isinstance(args.run, list) else [args.run]
    if len(runs) != 1:
        raise UserError("evaluate --attack/--corruptions: give one run (an ensemble is not attacked)")
    run = Path(runs[0])
    plan = plan_of(args)
    folder = find_model_folder(run)
    check_task(folder)
    data = Path(args.data) if args.data else default_data(run)
    if not data.exists():
        raise UserError(f"--data {data}: no such file or folder")
    target = output_path(run, args.output)
    from .runner import evaluate_robustness, table

    report = evaluate_robustness(run, data, plan, cpu=args.cpu)
    print(table(report), end="")
    from ..artifacts import write_json

    write_json(target, report)
    print(f"wrote {target}")
    return 0
