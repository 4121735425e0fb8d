"""`finetunekit fit|lr-find|search|evaluate|predict|explain|export|benchmark|inspect|demo|report|compare|recipes`. The `fit` (and `lr-find`) flags are
generated from the Recipe schema.

Options are validated before torch is imported, so a typo fails in well under a second, as one line
naming the option, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, get_args, get_origin

from .config import GROUPS, build_recipe, leaf_fields, read_yaml, relative_to
from . import __version__
from .errors import UserError, did_you_mean, first_line
from .explain import DEFAULT_METHOD as EXPLAIN_DEFAULTS
from .explain import METHODS as EXPLAIN_METHODS
from . import robustness

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
EXPORT_FORMATS = ("onnx", "torchscript")  # export.EXPORTERS less the model folder (tests/test_registries.py)


class _Help(argparse.HelpFormatter):
    """`--[no-]vflip` for an on/off option (one line, not two), a wider flag column, no line broken at a hyphen."""

    def __init__(self, prog: str):
        import shutil

        super().__init__(prog, max_help_position=32 if shutil.get_terminal_size().columns >= 100 else 24)

    def _split_lines(self, text: str, width: int) -> list[str]:  # never inside a name: image-classification
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, argparse.BooleanOptionalAction):
            return action.option_strings[0].replace("--", "--[no-]", 1)
        return super()._format_action_invocation(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)  # `--epoch` is a typo, not a prefix of --epochs
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # main() prints "finetunekit: error: "; a subcommand's own errors name it: "predict: ..."
        command = self.prog.removeprefix("finetunekit").strip()
        raise UserError(f"{command}: {message}" if command else message)


def _metavar(annotation: Any, name: str = "CHOICE") -> str | None:
    args = [annotation] if get_origin(annotation) in (Literal, Annotated) else \
        [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    inner = args[0]
    if get_origin(inner) is Annotated:
        inner = get_args(inner)[0]
    if get_origin(inner) is Literal:
        listed = "{" + ",".join(get_args(inner)) + "}"
        return listed if len(listed) <= 40 else name.upper()  # a long list: in the help text (_option_help)
    return {int: "N", float: "X", str: "TEXT"}.get(inner, "PATH")


def _option_help(info: Any) -> str:
    """An option's help: its description (with its choices when the metavar does not list them: see _metavar), and
    its default where that says something (not None, which the description explains, nor an off switch or an
    empty text)."""
    default = info.default
    text = info.description
    choices = _literals(info)
    if choices and not _metavar(info.annotation).startswith("{") and not all(c in text for c in choices):
        text += f"; one of {', '.join(choices)}"
    if default is True:
        text += " (default: on)"
    elif default is not None and default is not False and default != "" and "default:" not in text:
        text += f" (default: {default})"
    return text.replace("%", "%%")  # argparse formats help


def _add_recipe_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """One flag per leaf option of the Recipe, in argument groups by topic (config.GROUPS); returns dest -> flag."""
    fields = {key: (flag, info) for key, flag, info in leaf_fields()}
    dests = {}
    for title, keys in GROUPS:
        group = parser.add_argument_group(title)
        for key in keys:
            flag, info = fields[key]
            dest = key.replace(".", "__")
            if info.annotation is bool:
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=_option_help(info))
            else:
                group.add_argument(flag, dest=dest, metavar=_metavar(info.annotation, flag[2:]),
                                   default=argparse.SUPPRESS, help=_option_help(info))
            dests[dest] = flag
    return dests


RECIPE_USAGE = "%(prog)s [--config RECIPE] [OPTION ...]"
CONFIG_HELP = ("a YAML recipe file (its relative paths are relative to its folder), or the name of a shipped recipe "
               "(`finetunekit recipes`); flags win over it")


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="also show detail lines and the libraries' own warnings (transformers, timm, torch)")


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = _Parser(prog="finetunekit", description="Fine-tune pretrained models on your own data.")
    parser.add_argument("--version", action="version", version=f"finetunekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    fit = sub.add_parser("fit", help="fine-tune a model (options from --config, overridden by flags)",
                         usage=RECIPE_USAGE, description="Fine-tune a model. Options come from --config (a "
                         "recipe's relative paths are relative to its folder) and flags, which win.")
    fit.add_argument("--config", metavar="RECIPE", help=CONFIG_HELP)
    dests = _add_recipe_flags(fit)

    lf = sub.add_parser("lr-find", help="the learning-rate range test: loss against lr, and a suggested lr",
                        usage=RECIPE_USAGE)
    lf.add_argument("--config", metavar="RECIPE", help=CONFIG_HELP)
    lf.add_argument("--steps", type=int, default=100, metavar="N", help="training steps (default: 100)")
    lf.add_argument("--start", type=float, default=1e-7, metavar="LR", help="first lr (default: 1e-7)")
    lf.add_argument("--end", type=float, default=10.0, metavar="LR", help="last lr (default: 10)")
    _add_recipe_flags(lf)

    se = sub.add_parser("search", help="hyperparameter search with optuna over recipe options (docs/search.md); "
                        "--out is the study folder, each trial a run in it",
                        usage="%(prog)s --space FILE [--config RECIPE] [OPTION ...]")
    se.add_argument("--config", metavar="RECIPE", help=CONFIG_HELP)
    se.add_argument("--space", required=True, metavar="FILE",
                    help="YAML: recipe options by dotted name, each a list of choices or {low, high, log, step}")
    se.add_argument("--trials", type=int, default=20, metavar="N",
                    help="finished (complete or pruned) trials the study should hold (default: 20)")
    se.add_argument("--timeout", metavar="TIME", help="stop starting trials after this long: seconds, or 30m, 2h")
    se.add_argument("--pruner", default="median", metavar="{median,halving,hyperband,none}",
                    help="stop unpromising trials after an epoch: median (default), halving (successive halving), "
                         "hyperband, none")
    se.add_argument("--storage", metavar="URL",
                    help="default: a journal file in the study folder; sqlite:///path (one machine) or "
                         "postgresql://user@host:port/db (several machines)")
    se.add_argument("--study-name", metavar="NAME", help="workers with the same storage and name share a study "
                    "(default: the --out folder's name)")
    se.add_argument("--heartbeat", type=int, default=30, metavar="SECONDS",
                    help="database storages: a running trial's heartbeat; one silent for 2x this is failed and "
                         "queued again (default: 30)")
    _add_recipe_flags(se)

    ev = sub.add_parser("evaluate", help="metrics of a fine-tuned model on labelled data")
    ev.add_argument("run", metavar="RUN", help="run directory (or model folder)")
    ev.add_argument("more", nargs="*", metavar="RUN", help="more runs: an ensemble, their calibrated probabilities "
                    "averaged; each member's metrics, the ensemble's and its gain (docs/ensembles.md)")
    ev.add_argument("--data", metavar="PATH",
                    help="images: folder of class folders or CSV manifest; text: a table with the training columns "
                         "(required, except with --attack/--corruptions: the run's test set by default)")
    ev.add_argument("--batch-size", type=int, default=64, metavar="N", help="samples per batch (default: 64)")
    ev.add_argument("--output", metavar="FILE", help="also write the metrics as JSON to FILE (--attack/--corruptions: "
                    "the report, by default RUN/robustness.json)")
    ev.add_argument("--cpu", action="store_true", help="evaluate on the CPU even when a GPU is present")
    robustness.add_flags(ev)
    _add_verbose(ev)

    pr = sub.add_parser("predict", help="predictions for images (files, folders) or texts (--text, files)")
    pr.add_argument("run", metavar="RUN", help="run directory (or model folder), or an ONNX export (its folder "
                    "or model.onnx: onnxruntime only, no torch)")
    pr.add_argument("inputs", nargs="*", metavar="INPUT",
                    help="images: files or folders; text: .txt files (one text per line) or tables; run or "
                    "model folders first (after RUN): an ensemble, their calibrated probabilities averaged "
                    "(docs/ensembles.md)")
    pr.add_argument("--text", action="append", metavar="TEXT", default=[],
                    help="a text to classify (repeatable; 'first ||| second' for a sentence pair)")
    pr.add_argument("--threshold", type=float, metavar="X", help="multi-label: override the saved threshold")
    pr.add_argument("--format", choices=("csv", "json", "table"), default="table",
                    help="how the predictions are written (default: table)")
    pr.add_argument("--top-k", type=int, default=1, metavar="K",
                    help="classification: the K most likely classes of each input, with their scores (default: 1)")
    pr.add_argument("--batch-size", type=int, default=64, metavar="N", help="inputs per batch (default: 64)")
    pr.add_argument("--output", metavar="FILE", help="write the predictions to FILE instead of stdout")
    pr.add_argument("--draw", metavar="DIR", help="detection: write each image with its boxes drawn to DIR (PNG)")
    pr.add_argument("--strict", action="store_true",
                    help="fail (exit 2) at the first unreadable image instead of skipping it with a warning")
    pr.add_argument("--uncertainty", action="store_true",
                    help="classification: also each item's calibrated max probability, predictive entropy and "
                         "out-of-distribution flag (docs/calibration.md)")
    pr.add_argument("--mc-dropout", type=int, default=0, metavar="N",
                    help="with --uncertainty: N Monte-Carlo dropout passes (dropout layers in train mode): mean "
                         "probability, its entropy, mutual information, variance")
    pr.add_argument("--ood-score", metavar="{energy,msp}",
                    help="with --uncertainty: the out-of-distribution score (default: energy)")
    pr.add_argument("--num-beams", type=int, metavar="N",
                    help="seq2seq: beam width (default: the model folder's generation_config.json)")
    pr.add_argument("--max-new-tokens", type=int, metavar="N",
                    help="seq2seq: at most N generated tokens (default: the model folder's)")
    pr.add_argument("--length-penalty", type=float, metavar="X",
                    help="seq2seq: beam search's length penalty (default: the model folder's)")
    _add_verbose(pr)

    xp = sub.add_parser("explain", help="why the model predicts what it does: Grad-CAM heatmaps over images (PNG), "
                        "token attributions for texts (HTML); docs/explain.md")
    xp.add_argument("run", metavar="RUN", help="run directory (or model folder)")
    xp.add_argument("inputs", nargs="*", metavar="IMAGE", help="image files or folders")
    xp.add_argument("--text", action="append", metavar="TEXT", default=[],
                    help="a text to explain (repeatable; 'first ||| second' for a sentence pair)")
    xp.add_argument("--method", metavar="METHOD", help="; ".join(
        f"{kind}s: " + ", ".join(m for m, (k, _) in EXPLAIN_METHODS.items() if k == kind) +
        f" (default: {default})" for kind, default in EXPLAIN_DEFAULTS.items()))
    xp.add_argument("--target", metavar="CLASS", help="the class to explain (default: the predicted class; "
                    "multi-label: the top class)")
    xp.add_argument("--layer", metavar="NAME", help="images: the module whose output the CAM reads (default: the "
                    "last feature map before pooling; ViTs: the last block's first norm)")
    xp.add_argument("--steps", type=int, default=50, metavar="N",
                    help="texts: integrated-gradients steps (default: 50)")
    xp.add_argument("--out", metavar="DIR", help="where the PNG/.npy or HTML files go (default: RUN/explain)")

    ex = sub.add_parser("export", help="the run's best model as ONNX or TorchScript, checked against PyTorch; "
                        "--merge: a --peft run's adapters folded into an ordinary model folder")
    ex.add_argument("run", metavar="RUN", help="run directory (or model folder)")
    ex.add_argument("--format", metavar="{" + ",".join(EXPORT_FORMATS) + "}",
                    help="the export format, checked against PyTorch on real inputs (default: onnx)")
    ex.add_argument("--merge", action="store_true",
                    help="a --peft lora/dora/ia3 run: fold the adapters into the weights and write an ordinary model "
                         "folder (default --out: RUN/merged) that plain timm/torchvision/transformers loads")
    ex.add_argument("--quantize", metavar="{static,dynamic}",
                    help="ONNX only: also write an int8 model.int8.onnx (static: CNNs, calibrated on training "
                         "images; dynamic: transformer encoders)")
    ex.add_argument("--out", metavar="DIR", help="the export folder (default: RUN/export)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    ex.add_argument("--samples", metavar="PATH",
                    help="inputs for the parity gate (images: files or a folder; text: a .txt file); default: "
                         "the run's validation samples")
    ex.add_argument("--batch-size", type=int, default=8, metavar="N",
                    help="the parity gate's batch N, besides batch 1 (default: 8)")
    ex.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="POINTS",
                    help="int8: warn when validation accuracy drops more than this many points (default: 1)")
    _add_verbose(ex)

    be = sub.add_parser("benchmark", help="latency, throughput, memory, size and accuracy of the run's model: "
                        "eager PyTorch, ONNX Runtime fp32 and int8 (docs/export.md)")
    be.add_argument("run", metavar="RUN", help="run directory")
    be.add_argument("--variants", metavar="LIST",
                    help="comma-separated, of eager-fp32, eager-bf16, onnx-fp32, onnx-int8, torchscript, torchao-int8 "
                         "(default: all but torchscript and torchao-int8; eager-bf16 only on CPUs with AVX512-BF16 "
                         "or AMX-BF16)")
    be.add_argument("--threads", type=int, metavar="N",
                    help="torch and onnxruntime intra-op threads, each variant pinned to N CPUs (default: all usable)")
    be.add_argument("--batch", type=int, default=32, metavar="N", help="the throughput batch (default: 32)")
    be.add_argument("--runs", type=int, default=100, metavar="N", help="timed calls at batch 1 (default: 100)")
    be.add_argument("--warmup", type=int, default=10, metavar="N", help="untimed calls first (default: 10)")
    be.add_argument("--data", metavar="PATH", help="labelled validation data, as for evaluate (default: the run's "
                    "validation split)")
    be.add_argument("--provider", default="cpu", metavar="{cpu,cuda,tensorrt}",
                    help="onnxruntime execution provider of the ONNX variants (default: cpu; cuda and tensorrt "
                         "need onnxruntime-gpu, untested)")
    _add_verbose(be)

    demo = sub.add_parser("demo", help="fine-tune the offline EfficientNet-Lite0 on scikit-learn's digits")
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="run directory (default: runs/demo)")
    demo.add_argument("--epochs", type=int, default=None, metavar="N", help="training epochs (default: 6)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars, log lines only")
    _add_verbose(demo)

    ins = sub.add_parser("inspect", help="a model's layer groups, and when each trains under a strategy")
    ins.add_argument("model", metavar="MODEL", help="a --model spec: efficientnet_lite0, timm:<name>, minilm, ...")
    ins.add_argument("--strategy", default="full", metavar="STRATEGY",
                     help="the fit --strategy whose phases to show (default: full)")
    ins.add_argument("--epochs", type=int, default=10, metavar="N", help="the run's epochs (default: 10)")
    ins.add_argument("--head-epochs", type=int, metavar="N", help="as fit --head-epochs (freeze-unfreeze, lp-ft)")
    ins.add_argument("--unfreeze-every", type=int, default=1, metavar="N",
                     help="as fit --unfreeze-every (gradual; default: 1)")
    ins.add_argument("--freeze", metavar="PATTERNS", help="as fit --freeze: parameter-name globs kept frozen")
    ins.add_argument("--freeze-types", metavar="TYPES", help="as fit --freeze-types: norm, embedding, conv, linear")
    ins.add_argument("--freeze-layers", type=int, metavar="N", help="as fit --freeze-layers (transformers encoders)")
    ins.add_argument("--num-classes", type=int, default=2, metavar="N",
                     help="the head's outputs of the model shown (default: 2)")
    _add_verbose(ins)

    rep = sub.add_parser("report", help="(re)write a run's report.html: curves, confusion matrix, top losses, "
                         "calibration (docs/report.md); prints its path")
    rep.add_argument("run", metavar="RUN", help="run directory")
    rep.add_argument("--out", metavar="FILE", help="write the page here instead of RUN/report.html")

    cmp = sub.add_parser("compare", help="runs of one task side by side: a table (printed) and overlaid learning "
                         "curves in compare.html (docs/report.md)")
    cmp.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    cmp.add_argument("--out", metavar="FILE", help="the page (default: compare.html in the current folder)")

    sub.add_parser("recipes", help="list the shipped recipes")
    return parser, dests


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = args.command or ""
        sub = parser._subparsers._group_actions[0].choices.get(command) if parser._subparsers else None
        flags = [s for a in (sub or parser)._actions for s in a.option_strings]
        word = next((u for u in unknown if u.startswith("-")), unknown[0])
        where = f"{command}: " if command else ""
        if not word.startswith("-"):
            raise UserError(f"{where}unexpected argument {word} (inputs go before the options)")
        raise UserError(f"{where}unknown option {word.split('=')[0]}{did_you_mean(word.split('=')[0], flags)}")
    return args


def resolve_config(name: str) -> Path:
    p = Path(name)
    if p.is_file() or p.suffix in (".yaml", ".yml"):
        return p
    shipped = RECIPES_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    names = [r.stem for r in RECIPES_DIR.glob("*.yaml")]
    raise UserError(f"--config {name}: no such file or shipped recipe{did_you_mean(name, names)}")


def _literals(info: Any) -> tuple:
    """The allowed values of a Literal option (also inside `Literal[...] | None`), else ()."""
    annotation = info.annotation
    if get_origin(annotation) is not Literal:
        annotation = next((a for a in get_args(annotation) if get_origin(a) is Literal), None)
    return get_args(annotation) if annotation is not None else ()


def recipe_from_args(args: argparse.Namespace, dests: dict[str, str]):
    overrides: dict[str, Any] = {}
    names: dict[str, str] = {}
    infos = {key.replace(".", "__"): info for key, _, info in leaf_fields()}
    for dest, flag in dests.items():
        if hasattr(args, dest):
            value = getattr(args, dest)
            # 'none' unsets an optional option, unless 'none' is one of the option's own values (--augment none)
            # ('none' stays a word for an option that cannot be unset: --log-with none)
            if (isinstance(value, str) and value.lower() in ("none", "null") and value not in _literals(infos[dest])
                    and type(None) in get_args(infos[dest].annotation)):
                value = None
            key = dest.replace("__", ".")
            overrides[key], names[key] = value, flag
    base, source, path = {}, "flags", None
    if args.config:
        path = resolve_config(args.config)
        base, source = relative_to(read_yaml(path), path.parent), str(path)  # the file's paths: from its folder
    recipe = build_recipe(base, overrides, source=source, override_names=names)
    recipe._config_path = path
    if recipe.verbose:  # `verbose: true` in the recipe file
        from .verbosity import configure

        configure(True)
    return recipe


def _write(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def _rows(preds: list[dict], top_k: int, key: str, kind: str, error_column: bool) -> tuple[list[str], list[list[str]]]:
    """Predictions as a header and rows of strings. key: path | text; kind: label | labels | value (the task);
    an input that could not be read has empty prediction cells and its reason in the `error` column."""
    source = [p.get(key, "") if isinstance(p.get(key, ""), str) else " ||| ".join(p[key]) for p in preds]
    if kind == "boxes":  # detection: one row per box (an image without boxes: one row with empty cells)
        cols = ["label", "score", "x1", "y1", "x2", "y2"]
        rows = []
        for s, p in zip(source, preds):
            boxes = [] if "error" in p else list(zip(p["labels"], p["scores"], p["boxes"]))
            for label, score, box in boxes or [(None, None, None)]:
                cells = [label, f"{score:.4f}", *(f"{v:.1f}" for v in box)] if label is not None else [""] * len(cols)
                rows.append([s, *cells] + ([p.get("error", "")] if error_column else []))
        return [key, *cols] + (["error"] if error_column else []), rows
    if kind == "value":  # regression
        cols, cells = ["value"], lambda p: [f"{p['value']:.6g}"]
    elif kind == "generated":  # seq2seq
        cols, cells = ["generated"], lambda p: [p["generated"]]
    elif kind == "labels":  # multi-label
        cols, cells = ["labels"], lambda p: ["|".join(p["labels"])]
    else:
        cols = ["label", "score"] + [f"{w}{i}" for i in range(2, top_k + 1) for w in ("label", "score")]

        more = [k for k in UNCERTAINTY_COLUMNS if any(k in p for p in preds)]  # predict --uncertainty
        cols += more

        def cells(p: dict) -> list[str]:
            return [v for alt in p["top_k"] for v in (alt["label"], f"{alt['score']:.4f}")] + [
                str(p[k]).lower() if isinstance(p[k], bool) else p[k] if isinstance(p[k], str) else f"{p[k]:.4f}"
                for k in more]
    rows = []
    for s, p in zip(source, preds):
        row = [s] + (cells(p) if "error" not in p else [""] * len(cols))
        rows.append(row + ([p.get("error", "")] if error_column else []))
    return [key, *cols] + (["error"] if error_column else []), rows


UNCERTAINTY_COLUMNS = ("max_prob", "entropy", "ood_score", "ood", "mc_label", "mc_probability", "mc_entropy",
                       "mutual_information", "mc_variance")  # uncertainty.describe's fields, in table order


def _format_predictions(preds: list[dict], fmt: str, top_k: int, key: str, kind: str) -> str:
    if fmt == "json":
        return json.dumps(preds, indent=2, ensure_ascii=False) + "\n"
    # images: csv always has the error column (one schema for scripts), the table only when an input failed
    error_column = key == "path" and (fmt == "csv" or any("error" in p for p in preds))
    cols, rows = _rows(preds, top_k, key, kind, error_column)
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(cols)
        writer.writerows(rows)
        return buf.getvalue()
    widths = [min(60, max(len(c), *(len(r[i]) for r in rows))) if rows else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(f"{v:<{w}}" for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def _print_metrics(metrics: dict) -> None:
    keys = [k for k in ("accuracy", "top5_accuracy", "macro_f1", "micro_f1", "map50", "map", "map75", "mar",
                        "exact_match", "mae", "rmse", "bleu", "chrf", "rouge_l", "generated",
                        "r2", "spearman", "loss", "samples") if k in metrics]
    print("  ".join(f"{k} {metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
                    for k in keys))
    per_class = metrics.get("per_class") or metrics.get("per_label") or {}
    if per_class:
        width = max(len(c) for c in per_class)
        if all(set(v) == {"ap"} for v in per_class.values()):  # detection
            print(f"{'class':<{width}}  AP@[.5:.95]")
            for c, v in per_class.items():
                print(f"{c:<{width}}  {v['ap']:.4f}")
            return
        print(f"{'class':<{width}}  precision  recall      f1")
        for c, v in per_class.items():
            print(f"{c:<{width}}  {v['precision']:9.4f}  {v['recall']:6.4f}  {v['f1']:6.4f}")
    if metrics.get("confusion_matrix") and metrics.get("confusion_matrix_classes"):
        from .confusion import table

        print("\nconfusion matrix (rows: true class, columns: predicted)")
        print(table(metrics["confusion_matrix"], metrics["confusion_matrix_classes"]), end="")


def _at_least_1(value: int, flag: str) -> None:
    if value < 1:
        raise UserError(f"{flag}: expected a value >= 1, got {value}")


def _recipes(args: argparse.Namespace, dests: dict[str, str]) -> int:
    """`finetunekit recipes`: the shipped recipes, one line each."""
    paths = sorted(RECIPES_DIR.glob("*.yaml"))
    width = max((len(p.stem) for p in paths), default=0)
    for path in paths:
        print(f"{path.stem:<{width}}  {read_yaml(path).get('description', '')}")
    return 0


def _launched(recipe, args: argparse.Namespace) -> int | None:
    """`--processes N` (N > 1) outside a launcher: this same command run in N launched processes, and their exit
    code; None when this process is to do the work itself."""
    n = recipe.train.processes
    if not n or n < 2 or "RANK" in os.environ:
        return None
    from .distributed import launch

    return launch(n, args.argv, cpu=recipe.train.cpu)


def _fit(args: argparse.Namespace, dests: dict[str, str]) -> int:
    """`finetunekit fit`: a recipe from the flags (and --config), validated before torch loads."""
    recipe = recipe_from_args(args, dests)  # validated before torch loads
    if not recipe.resume:  # a resumed run's recipe is the saved one: checked once it is read
        from .preflight import preflight

        preflight(recipe)  # the instant checks come before torch and the libraries load
    if (code := _launched(recipe, args)) is not None:
        return code
    from .run import fit

    fit(recipe)  # its last log line (stderr, also under --quiet) names the run directory
    return 0


def _lr_find(args: argparse.Namespace, dests: dict[str, str]) -> int:
    """`finetunekit lr-find`: the learning-rate range test."""
    from .twostage import resolve as resolve_init

    recipe = resolve_init(recipe_from_args(args, dests))  # --init: its model
    from .lr_find import lr_range_test
    from .run import default_out
    from .runlog import RunLog

    out = recipe.out or default_out("lr-find-" + recipe.model_name)
    if (out / "lr_find.csv").exists() and not recipe.overwrite:
        raise UserError(f"--out {out}: already holds an lr-find result; choose another --out or pass --overwrite")
    with RunLog(None, recipe.quiet, verbose=recipe.verbose):
        result = lr_range_test(recipe, out, start=args.start, end=args.end, steps=args.steps)
    print(f"suggested lr: {result['suggested_lr']:.3g}  (lowest loss at {result['lowest_loss_lr']:.3g}; "
          f"plot: {out / 'lr_find.svg'})")
    return 0


def _seconds(text: str | None, flag: str) -> float | None:
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        value = float(number) * unit
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{flag} {text}: expected a time > 0: seconds, or 30m, 2h")
    return value


def _search(args: argparse.Namespace, dests: dict[str, str]) -> int:
    """`finetunekit search`: every input checked before torch loads (recipe, space, study folder, storage URL)."""
    recipe = recipe_from_args(args, dests)
    from .search.check import check

    opts, space = check(recipe, args.space, trials=args.trials, timeout=_seconds(args.timeout, "--timeout"),
                        pruner=args.pruner, storage=args.storage, study_name=args.study_name,
                        heartbeat=args.heartbeat)
    if (code := _launched(recipe, args)) is not None:  # rank 0 samples, the others follow (search/ranks.py)
        return code
    from .runlog import RunLog
    from .search import ranks
    from .search.study import search

    ranks.configure(recipe.train.cpu)
    main = ranks.is_main()
    if main:
        opts.out.mkdir(parents=True, exist_ok=True)
    with RunLog(opts.out / "search.log" if main else None, recipe.quiet, verbose=recipe.verbose):
        report = search(recipe, space, opts)
    if report is None:
        return 0
    print(report["table"], end="")
    counts = ", ".join(f"{n} {s}" for s, n in report["counts"].items())
    print(f"\ntrials: {counts}; table: {opts.out / 'results.csv'} and results.md")
    if report["importances"] is not None:
        print("importances: " + ", ".join(f"{k} {v:.3f}" for k, v in report["importances"].items()))
    else:
        print(report["importances_note"])
    print(f"best recipe: {report['best']} (finetunekit fit --config {report['best']})" if report["best"] else
          "no complete trial: no best recipe")
    return 0


def _evaluate(args: argparse.Namespace, dests: dict[str, str]) -> int:
    """`finetunekit evaluate RUN DATA`: a saved model's metrics on labelled data."""
    _at_least_1(args.batch_size, "--batch-size")
    if args.more:  # several runs: an ensemble (ensemble.py)
        return _evaluate_ensemble(args)
    if robustness.requested(args):  # --attack / --corruptions: docs/robustness.md
        return robustness.main(args)
    if not args.data:
        raise UserError("evaluate: --data PATH is required (only --attack/--corruptions default to the run's test set)")
    from .run import evaluate

    metrics = evaluate(args.run, args.data, batch_size=args.batch_size, cpu=args.cpu)
    if os.environ.get("RANK", "0") != "0":  # under a launcher: the metrics are every process's; the first says them
        return 0
    _print_metrics(metrics)
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return 0


def _evaluate_ensemble(args: argparse.Namespace) -> int:
    """`finetunekit evaluate RUN_A RUN_B ... --data D`: each member's metrics, the ensemble's, and its gain."""
    for flag in ("attack", "corruptions"):  # robustness flags (another module's) score one model
        if getattr(args, flag, None):
            raise UserError(f"--{flag}: for one model, not an ensemble")
    if not args.data:
        raise UserError("evaluate: --data PATH is required with several runs")
    from .ensemble import evaluate

    result = evaluate([args.run, *args.more], args.data, batch_size=args.batch_size, cpu=args.cpu)
    if os.environ.get("RANK", "0") != "0":
        return 0
    for row in result["members"]:
        print(f"member {row['run']}:")
        _print_metrics({k: v for k, v in row.items() if k not in ("per_class", "per_label", "confusion_matrix")})
    print(f"ensemble of {len(result['members'])} (mean of the calibrated probabilities):")
    _print_metrics(result["ensemble"])
    g = result["gain"]
    print(f"ensemble gain in {g['metric']}: {g['vs_best_member']:+.4f} over the best member, "
          f"{g['vs_mean_member']:+.4f} over the members' mean")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def _predict(args: argparse.Namespace, dests: dict[str, str]) -> int:
    """`finetunekit predict RUN INPUT...`: predictions as csv, json or a table."""
    _at_least_1(args.top_k, "--top-k")
    _at_least_1(args.batch_size, "--batch-size")
    from .ensemble import members

    runs, args.inputs = members(args.run, args.inputs)  # leading run folders: an ensemble (ensemble.py)
    if not args.inputs and not args.text:
        raise UserError("predict: give input files or folders, or --text TEXT")
    from .runtime import export_format

    if len(runs) > 1 and export_format(args.run) is not None:
        raise UserError(f"{args.run}: an export; an ensemble's members are run directories or model folders")
    if export_format(args.run) == "torchscript":
        raise UserError(f"{args.run}: a TorchScript export; load it in PyTorch with torch.jit.load (predict reads "
                        f"runs, model folders and ONNX exports)")
    if export_format(args.run) == "onnx":  # onnxruntime, numpy, Pillow, tokenizers: torch is not imported
        from .runtime import load as load_export

        model = load_export(args.run)
        is_text = model.modality == "text"
    elif len(runs) > 1:
        from .ensemble import Ensemble

        model = Ensemble.load(runs)
        is_text = model.modality == "text"
    else:
        from .artifacts import load
        from .inference import TextModel

        model = load(args.run)
        is_text = isinstance(model, TextModel)
    for item in args.inputs:
        if not Path(item).exists():
            raise UserError(f"{item}: no such file or folder")
    if args.threshold is not None:
        if not 0 < args.threshold < 1 or model.task.kind != "multilabel":
            raise UserError(f"--threshold {args.threshold}: expected a value in (0, 1), for multi-label models")
        model.task.threshold = args.threshold
    if args.text and not is_text:
        raise UserError("--text: this is an image model; pass image files or folders")
    kind = {"regression": "value", "multilabel": "labels", "detection": "boxes",
            "seq2seq": "generated"}.get(model.task.kind, "label")
    generation = {k: getattr(args, k) for k in ("num_beams", "max_new_tokens", "length_penalty")
                  if getattr(args, k) is not None}
    if generation and kind != "generated":
        raise UserError(f"--{next(iter(generation)).replace('_', '-')}: for seq2seq models")
    if args.draw and kind != "boxes":
        raise UserError("--draw: for detection models")
    top_k = args.top_k
    if kind == "label" and top_k > len(model.classes):  # one rectangular table: as many columns as classes
        top_k = len(model.classes)
        print(f"warning: --top-k {args.top_k}: the model has {top_k} classes; showing {top_k}", file=sys.stderr)
    extra = {}
    if args.uncertainty or args.mc_dropout or args.ood_score:
        if not args.uncertainty:
            raise UserError(f"{'--mc-dropout' if args.mc_dropout else '--ood-score'}: goes with --uncertainty")
        from .uncertainty import SCORES

        extra = dict(uncertainty=True, mc_dropout=args.mc_dropout, ood_score=args.ood_score)
        model._check_uncertainty(args.mc_dropout, args.ood_score, SCORES)  # one line before any image is read
    if kind == "generated":
        extra.update(generation)  # seq2seq: the generation settings that override the model folder's
    if is_text:
        texts = [tuple(part.strip() for part in t.split("|||")) if "|||" in t and kind != "generated" else t
                 for t in args.text]
        preds = model.predict(texts, batch_size=args.batch_size, top_k=top_k, **extra) if texts else []
        for item in args.inputs:
            preds += model.predict(Path(item), batch_size=args.batch_size, top_k=top_k, **extra)
    else:
        from .imagefiles import expand_inputs, no_images

        found = {item: expand_inputs(item) for item in args.inputs}
        empty = [item for item, files in found.items() if not files]  # folders without image files
        if len(empty) == len(found):
            raise UserError(no_images(", ".join(empty)))
        for item in empty:
            print(f"warning: {no_images(item)}", file=sys.stderr)
        preds = model.predict([f for files in found.values() for f in files], batch_size=args.batch_size,
                              top_k=top_k, errors="raise" if args.strict else "skip", **extra)
    failed = [p for p in preds if "error" in p]
    if args.draw:
        from .inference import draw

        for p in preds:
            if "error" not in p and "path" in p:
                draw(p["path"], p, Path(args.draw))
    for p in failed:
        print(f"warning: {p['path']}: {p['error']}; skipped", file=sys.stderr)
    _write(_format_predictions(preds, args.format, top_k, "text" if is_text else "path", kind), args.output)
    if failed and len(failed) == len(preds):
        print(f"finetunekit: error: none of the {len(preds)} images could be read", file=sys.stderr)
        return 1
    if failed:
        print(f"warning: {len(failed)} of {len(preds)} images could not be read and were skipped (their rows "
              f"carry the error; --strict fails instead)", file=sys.stderr)
    return 0


def _explain(args: argparse.Namespace, dests: dict[str, str]) -> int:
    """`finetunekit explain RUN IMAGE... | --text TEXT`: one file and one line per input (explain.command)."""
    from .explain.command import Request, check, run as explain

    request = Request(args.run, list(args.inputs), list(args.text), method=args.method, target=args.target,
                      layer=args.layer, out=args.out, steps=args.steps)
    check(request)  # one-line errors before torch loads
    explain(request)
    return 0


def _export(args: argparse.Namespace, dests: dict[str, str]) -> int:
    """`finetunekit export RUN --format onnx|torchscript`: the best model, through the parity gate; with
    --merge, a --peft run's adapters folded into an ordinary model folder."""
    if args.merge:
        return _merge(args)
    args.format = args.format or "onnx"
    from .export.bundle import check, export_run

    options = dict(out=args.out, overwrite=args.overwrite, quantize=args.quantize, samples=args.samples,
                   batch=args.batch_size)
    check(args.run, args.format, **options)  # one-line errors before torch loads
    config = export_run(args.run, args.format, max_accuracy_drop=args.max_accuracy_drop, **options)
    from .export.parity import describe

    print(f"{config['format']}: {Path(config['path']) / config['file']}  ({config['exporter']}; parity "
          f"{describe(config['parity'])})")
    for line in config.get("rejected_exporters") or []:
        print(f"  rejected {line}", file=sys.stderr)
    q = config.get("int8")
    if q:
        acc = q.get("accuracy")
        figures = (f"validation accuracy fp32 {acc['fp32']:.4f}, int8 {acc['int8']:.4f}" if acc else
                   f"top-1 agreement with fp32 {100 * q.get('top1_agreement', float('nan')):.1f}%")
        print(f"int8 ({q['mode']}): {Path(config['path']) / q['file']}  ({figures}; {q['validation_samples']} "
              f"validation samples)")
        if q.get("warning"):
            print(f"warning: {q['warning']}", file=sys.stderr)
    return 0


def _merge(args: argparse.Namespace) -> int:
    """`finetunekit export RUN --merge`: the merged model folder (export.merge)."""
    given = [flag for flag, value in (("--format", args.format), ("--quantize", args.quantize),
                                      ("--samples", args.samples)) if value is not None]
    if given:
        raise UserError(f"{given[0]}: not with --merge, which writes a model folder; export that folder afterwards")
    if not Path(args.run).exists():
        raise UserError(f"{args.run}: no such run or model folder")
    from .export.merge import merge_run

    report = merge_run(args.run, args.out, overwrite=args.overwrite)
    print(f"merged ({report['method']}): {report['folder']}  (largest logit difference from the adapter model "
          f"{report['max_logit_difference']:.2g})")
    return 0


def _benchmark(args: argparse.Namespace, dests: dict[str, str]) -> int:
    """`finetunekit benchmark RUN`: each variant in its own process; a table, and RUN/benchmark.json."""
    from .benchmark import benchmark, check, table

    plan = check(args.run, variants=args.variants, threads=args.threads, batch=args.batch, runs=args.runs,
                 warmup=args.warmup, provider=args.provider, data=args.data)  # one-line errors before torch
    result = benchmark(plan, log=lambda line: print(line, file=sys.stderr))
    print(table(result), end="")
    print(f"written: {result['path']}")
    return 0


def _inspect(args: argparse.Namespace, dests: dict[str, str]) -> int:
    """`finetunekit inspect MODEL`: layer groups and when each trains."""
    from .config import TrainConfig

    strategies = TrainConfig.model_fields["strategy"].annotation.__args__
    if args.strategy not in strategies:
        raise UserError(f"--strategy {args.strategy}: expected one of {', '.join(strategies)}"
                        f"{did_you_mean(args.strategy, list(strategies))}")
    if args.epochs < 1 or args.num_classes < 1:
        raise UserError("--epochs and --num-classes: expected values >= 1")
    from .inspection import describe
    from .models import check_spec

    check_spec(args.model)
    print(describe(args.model, strategy=args.strategy, epochs=args.epochs, num_classes=args.num_classes,
                   head_epochs=args.head_epochs, unfreeze_every=args.unfreeze_every, freeze=args.freeze,
                   freeze_types=args.freeze_types, freeze_layers=args.freeze_layers), end="")
    return 0


def _demo(args: argparse.Namespace, dests: dict[str, str]) -> int:
    """`finetunekit demo`: the main job, offline."""
    from .demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs, quiet=args.quiet, verbose=args.verbose)
    return 0


def _report(args: argparse.Namespace, dests: dict[str, str]) -> int:
    """`finetunekit report RUN`: the run's report.html, written again; prints its path."""
    from .report import build

    if args.out and not Path(args.out).parent.is_dir():
        raise UserError(f"--out {args.out}: its folder {Path(args.out).parent} does not exist")
    print(build(args.run, args.out))
    return 0


def _compare(args: argparse.Namespace, dests: dict[str, str]) -> int:
    """`finetunekit compare RUN...`: the table printed, the page written."""
    from .report.compare import compare

    text, path = compare(args.runs, args.out)
    print(text, end="")
    print(f"written: {path}")
    return 0


# command -> its function; tests/test_registries.py checks the keys against the parser's subcommands
COMMANDS = {"recipes": _recipes, "fit": _fit, "lr-find": _lr_find, "search": _search, "evaluate": _evaluate, "predict": _predict,
            "explain": _explain, "export": _export, "benchmark": _benchmark, "inspect": _inspect, "demo": _demo,
            "report": _report, "compare": _compare}


def run(argv: list[str]) -> int:
    parser, dests = _build_parser()
    args = _parse(parser, argv)
    args.argv = list(argv)  # --processes hands the command on as given
    if args.command is None:
        parser.print_help()
        return 0
    from .verbosity import libraries

    with libraries(bool(getattr(args, "verbose", False))):  # fit, lr-find, search: the recipe's, once it is read
        return COMMANDS[args.command](args, dests)


def _peer_stopped(e: BaseException) -> bool:
    """Whether `e` is torch.distributed's error for a process of the same run that went away (gloo's
    'Connection closed by peer', NCCL's remote errors, a barrier's timeout)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) < 2:
        return False
    names = {c.__name__ for c in type(e).__mro__}
    text = str(e)
    return bool(names & {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out"))


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"finetunekit: error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("finetunekit: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:  # noqa: BLE001 - one of several processes: a peer that stopped is one line, not a trace
        if not _peer_stopped(e):
            raise
        rank = os.environ.get("RANK", "?")
        print(f"finetunekit: process {rank}: stopped: another process of this run stopped first (its error, if "
              f"any, is above; {first_line(e, 120)})", file=sys.stderr)
        code = 1
    except BrokenPipeError:  # `finetunekit predict ... | head`: the reader left; stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        code = 141  # 128 + SIGPIPE
    dist = sys.modules.get("torch.distributed")  # loaded only if the command used torch
    if code == 0 and dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # several processes: left at the end of the command, not of each run
    sys.exit(code)


if __name__ == "__main__":
    main()
