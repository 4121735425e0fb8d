"""The command line's parser: a flag per recipe option (generated from the Recipe schema, grouped by topic), the
subcommands and their options, and the recipe that flags and a --config file make together. Torch-free, so a typo
fails in well under a second, as one line naming the option, with exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, get_args, get_origin

from . import __version__, robustness
from .config import GROUPS, build_recipe, leaf_fields, read_yaml, relative_to
from .errors import UserError, did_you_mean
from .explain import DEFAULT_METHOD as EXPLAIN_DEFAULTS
from .explain import METHODS as EXPLAIN_METHODS

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


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
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


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
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
