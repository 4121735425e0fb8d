"""`finetunekit fit|lr-find|search|evaluate|predict|explain|export|benchmark|inspect|demo|report|compare|recipes`. The `fit` (and `lr-find`) flags are
generated from the Recipe schema (cli_parser.py); what the commands print is in cli_output.py.

Options are validated before torch is imported, so a typo fails in well under a second, as one line
naming the option, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import robustness
from .cli_output import format_predictions, print_metrics, write
from .cli_parser import RECIPES_DIR, build_parser, parse, recipe_from_args
from .config import read_yaml
from .errors import UserError, did_you_mean, first_line


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
    print_metrics(metrics)
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
        print_metrics({k: v for k, v in row.items() if k not in ("per_class", "per_label", "confusion_matrix")})
    print(f"ensemble of {len(result['members'])} (mean of the calibrated probabilities):")
    print_metrics(result["ensemble"])
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
    write(format_predictions(preds, args.format, top_k, "text" if is_text else "path", kind), args.output)
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
    parser, dests = build_parser()
    args = parse(parser, argv)
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
