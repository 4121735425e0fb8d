"""`finetunekit benchmark RUN`: how fast, how big and how accurate a run's model is in each form it ships in.

    eager-fp32    the loaded model in PyTorch (torch.inference_mode), as `finetunekit predict` runs it
    eager-bf16    the same under CPU bf16 autocast; only on CPUs with AVX512-BF16 or AMX-BF16
    onnx-fp32     RUN/export/model.onnx in onnxruntime (written by `finetunekit export` when missing)
    onnx-int8     RUN/export/model.int8.onnx (static int8 for images, dynamic for text)
    torchscript   model.pt (RUN/export-torchscript, written when missing), in PyTorch; not in the default set
    torchao-int8  the eager model with torchao int8 Linear layers (int8 weights and dynamic int8 activations):
                  the run's model.int8.safetensors when it trained with --qat, else post-training quantization
                  of its weights (addons/qat.py); models that compute in Linear layers only (transformers), not
                  in the default set

Each variant runs in its own process (so one variant's memory never counts for another; the ONNX ones import
no torch, as a server with the runtime extra would run them), pinned to the first `threads` CPUs, with
torch's and onnxruntime's intra-op threads set to the same number. In that process, in order:

    1. load the model (timed: load_s)
    2. every validation sample once, in batches of `batch`: preprocessing timed per sample (decode, resize,
       crop, normalize; or tokenize) apart from the model; the logits give accuracy and, in the parent,
       top-1 agreement with eager-fp32
    3. warm-up: `warmup` calls at batch 1, one at batch `batch`
    4. latency: `runs` calls at batch 1 over the preprocessed samples, in turn (p50, p95, mean)
    5. throughput: max(3, runs // 10) calls at batch `batch`, in samples per second
    6. peak RSS: the process's own high-water mark (Linux VmHWM; see peak_rss_mb), at the end

The results go to RUN/benchmark.json (benchmark-2.json, -3, ... when it exists: an earlier result is never
replaced) and a table on screen (docs/export.md, "Benchmark").
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError, did_you_mean

VARIANTS = ("eager-fp32", "eager-bf16", "onnx-fp32", "onnx-int8", "torchscript", "torchao-int8")
DEFAULT_VARIANTS = ("eager-fp32", "eager-bf16", "onnx-fp32", "onnx-int8")  # eager-bf16 only where the CPU has it
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU bf16 instructions: without them autocast bf16 is emulated
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
TORCHSCRIPT_DIR = "export-torchscript"  # RUN/export holds one format; TorchScript goes beside it


class BenchmarkFailed(UserError):
    """A variant's process failed (exit code 1): its last error line."""

    exit_code = 1


@dataclass
class Plan:
    run: Path
    folder: Path  # RUN/model
    task: str
    variants: list[str]
    threads: int
    batch: int = 32
    runs: int = 100
    warmup: int = 10
    provider: str = "cpu"
    data: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)  # variant -> the file it runs
    to_export: list[tuple[str, str | None, Path]] = field(default_factory=list)  # (format, quantize, out)


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def check(run: str | os.PathLike, *, variants: str | None = None, threads: int | None = None, batch: int = 32,
          runs: int = 100, warmup: int = 10, provider: str = "cpu", data: str | os.PathLike | None = None) -> Plan:
    """The checks before any model loads: a Plan, or a one-line UserError (exit 2)."""
    path = Path(run)
    folder = path / "model"
    if not (folder / "config.json").is_file():
        raise UserError(f"{path}: not a finetunekit run directory (no model/config.json)")
    from .export.bundle import _task_of

    task = _task_of(folder)
    if task == "detection" or task.endswith("-detection"):
        raise UserError(f"{path}: benchmark of detection models is not supported yet")
    for value, flag, least in ((threads, "--threads", 1), (batch, "--batch", 1), (runs, "--runs", 1),
                               (warmup, "--warmup", 0)):
        if value is not None and value < least:
            raise UserError(f"{flag} {value}: expected a value >= {least}")
    if provider not in PROVIDERS:
        raise UserError(f"--provider {provider}: expected one of {', '.join(PROVIDERS)}"
                        f"{did_you_mean(provider, PROVIDERS)}")
    if data is not None and not Path(data).exists():
        raise UserError(f"--data {data}: no such file or folder")
    if variants is None:
        chosen = [v for v in DEFAULT_VARIANTS if v != "eager-bf16" or _bf16_flag()]
    else:
        chosen = list(dict.fromkeys(v.strip() for v in variants.split(",") if v.strip()))
        for v in chosen:
            if v not in VARIANTS:
                raise UserError(f"--variants {v}: expected some of {', '.join(VARIANTS)}{did_you_mean(v, VARIANTS)}")
        if not chosen:
            raise UserError(f"--variants: expected some of {', '.join(VARIANTS)}")
        if "eager-bf16" in chosen and not _bf16_flag():
            raise UserError(f"--variants eager-bf16: this CPU has neither {' nor '.join(BF16_FLAGS)}; bf16 would "
                            f"be emulated")
    if "torchao-int8" in chosen:
        _check_torchao(folder)
    onnx = [v for v in chosen if v.startswith("onnx-")]
    if onnx and provider != "cpu":
        import onnxruntime as ort

        available = ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            needs = "CUDA and TensorRT" if provider == "tensorrt" else "CUDA"
            raise UserError(f"--provider {provider}: {PROVIDERS[provider]} is not in this onnxruntime (available: "
                            f"{', '.join(available)}); install onnxruntime-gpu with {needs}")
    plan = Plan(path, folder, task, chosen, threads or len(usable_cpus()), batch, runs, warmup, provider,
                Path(data) if data is not None else None)
    weights = sorted(folder.glob("*.safetensors"))
    for v in chosen:
        if v.startswith("eager-"):
            plan.files[v] = weights[0] if len(weights) == 1 else folder
        elif v == "torchao-int8" and (folder / "model.int8.safetensors").is_file():  # --qat's; else PTQ, no file
            plan.files[v] = folder / "model.int8.safetensors"
    _plan_exports(plan, onnx)
    return plan


def _check_torchao(folder: Path) -> None:
    """torchao-int8 needs torchao and a model whose layer weights are mostly Linear (as --qat does)."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise UserError("--variants torchao-int8: needs torchao (pip install 'finetunekit[qat]')") from None
    from safetensors import safe_open

    conv = linear = 0
    for file in folder.glob("model*.safetensors"):
        if file.name.endswith(".int8.safetensors"):
            continue
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                if key.endswith("weight") and len(shape) == 4:
                    conv += int(np.prod(shape))
                elif key.endswith("weight") and len(shape) == 2 and "embed" not in key:
                    linear += int(np.prod(shape))
    if conv > linear:
        raise UserError(f"--variants torchao-int8: {folder} keeps {100 * conv / (conv + linear):.0f}% of its layer "
                        f"weights in convolutions and torchao's int8 here quantizes Linear layers; the int8 of a CNN "
                        f"is onnx-int8 (static)")


def _bf16_flag() -> str | None:
    from .fastpath import cpu_flags

    flags = cpu_flags()
    return next((f for f in BF16_FLAGS if f in flags), None)


def _plan_exports(plan: Plan, onnx: list[str]) -> None:
    """The ONNX and TorchScript files the variants run: existing exports, or the ones to write first (an
    existing export folder is never rewritten)."""
    from .export.bundle import EXPORT_DIR

    text = plan.task.startswith("text-")
    export = plan.run / EXPORT_DIR
    config = _read_config(export)
    if onnx:
        if config is None:
            plan.to_export.append(("onnx", ("dynamic" if text else "static") if "onnx-int8" in onnx else None, export))
        elif config.get("format") != "onnx":
            raise UserError(f"{export}: holds a {config.get('format')} export, not ONNX; run `finetunekit export "
                            f"{plan.run} --format onnx --overwrite`, or leave out {', '.join(onnx)}")
        elif "onnx-int8" in onnx and not (export / (config.get("int8") or {}).get("file", "model.int8.onnx")).is_file():
            mode = "dynamic" if text else "static"
            raise UserError(f"{export}: no int8 model; run `finetunekit export {plan.run} --quantize {mode} "
                            f"--overwrite`, or leave out onnx-int8")
        plan.files["onnx-fp32"] = export / "model.onnx"
        plan.files["onnx-int8"] = export / "model.int8.onnx"
    if "torchscript" in plan.variants:
        if config is not None and config.get("format") == "torchscript":
            plan.files["torchscript"] = export / "model.pt"
        else:
            other = plan.run / TORCHSCRIPT_DIR
            if _read_config(other) is None:
                plan.to_export.append(("torchscript", None, other))
            plan.files["torchscript"] = other / "model.pt"
    plan.files = {v: f for v, f in plan.files.items() if v in plan.variants}


def _read_config(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def benchmark(plan: Plan, *, log=print) -> dict:
    """Run every variant of `plan` in its own process; returns what is written to RUN/benchmark.json (its
    path under "path")."""
    from . import __version__
    from .artifacts import load

    model = load(plan.folder)
    samples, labels, source = _validation(plan, model)
    if not samples:
        raise UserError(f"{plan.run}: no validation samples recorded with the run; pass --data")
    for fmt, quantize, out in plan.to_export:
        from .export.bundle import export_run

        log(f"benchmark: exporting {fmt}{f' with int8 ({quantize})' if quantize else ''} to {out}")
        export_run(plan.run, fmt, out=out, quantize=quantize)
    del model
    cpus = usable_cpus()
    pinned = cpus[:plan.threads] if plan.threads <= len(cpus) else cpus
    result: dict[str, Any] = {
        "finetunekit_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": str(plan.run.resolve()), "task": plan.task, "machine": machine(),
        "settings": {"threads": plan.threads, "pinned_cpus": pinned, "batch": plan.batch, "runs": plan.runs,
                     "warmup": plan.warmup, "throughput_calls": max(3, plan.runs // 10), "provider": plan.provider,
                     "data": source, "samples": len(samples), "labelled": labels is not None},
        "variants": []}
    reference = None
    with tempfile.TemporaryDirectory(prefix="finetunekit-bench-") as tmp:
        for variant in plan.variants:
            log(f"benchmark: {variant} ...")
            entry, logits = _run_variant(plan, variant, samples, labels, pinned, Path(tmp))
            if reference is None and variant == "eager-fp32":
                reference = logits
            result["variants"].append(entry)
            entry["_logits"] = logits
    for entry in result["variants"]:
        logits = entry.pop("_logits")
        several = logits.ndim == 2 and logits.shape[1] > 1
        entry["agreement"] = (float((logits.argmax(-1) == reference.argmax(-1)).mean())
                              if reference is not None and several else None)
        entry["max_abs_diff"] = float(np.abs(logits - reference).max()) if reference is not None else None
    target = _free_name(plan.run)
    from .artifacts import write_json

    write_json(target, result)
    result["path"] = str(target)
    return result


def _free_name(run: Path) -> Path:
    """RUN/benchmark.json, or benchmark-2.json, -3, ... when taken."""
    target, n = run / "benchmark.json", 2
    while target.exists():
        target, n = run / f"benchmark-{n}.json", n + 1
    return target


def _validation(plan: Plan, model: Any) -> tuple[list, list[int] | None, str]:
    """(samples: image paths or text tuples, their class indices or None, where they came from)."""
    text = model.backbone.adapter.modality == "text"
    classification = model.task.kind == "classification"
    if plan.data is not None:
        if text:
            from .data.tables import read_labelled_texts

            split, _ = read_labelled_texts(plan.data, model.task_name, model.text_columns, model.label_columns,
                                           model.label_delimiter, list(model.classes))
            return [tuple(t) for t in split.texts], (
                [int(t) for t in split.targets] if classification else None), str(plan.data)
        from .data.sources import labeled_split, read_labeled_files

        split = labeled_split(read_labeled_files(plan.data, "--data"), list(model.classes), "the model's classes")
        return list(split.paths), (list(split.labels) if classification else None), str(plan.data)
    from .export.bundle import _validation_samples

    samples, labels = _validation_samples(plan.run, text, model)
    if not text and samples:
        from .export.int8 import validation_labels

        labels = validation_labels(plan.run, samples, list(model.classes)) if classification else None
    return [tuple(s) if text else s for s in samples], (
        [int(x) for x in labels] if labels is not None and classification else None), "the run's validation split"


def _run_variant(plan: Plan, variant: str, samples: list, labels: list[int] | None, pinned: list[int],
                 tmp: Path) -> tuple[dict, np.ndarray]:
    spec = {"variant": variant, "folder": str(plan.folder), "file": str(plan.files.get(variant, "")),
            "threads": plan.threads, "cpus": pinned, "batch": plan.batch, "runs": plan.runs, "warmup": plan.warmup,
            "provider": PROVIDERS[plan.provider], "samples": samples,
            "out": str(tmp / f"{variant}.json"), "logits": str(tmp / f"{variant}.npy")}
    spec_file = tmp / f"{variant}.spec.json"
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    package_root = str(Path(__file__).resolve().parent.parent)
    threads = str(plan.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "finetunekit.benchmark", str(spec_file)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not Path(spec["out"]).is_file():
        lines = [x for x in (proc.stderr or proc.stdout).strip().splitlines() if x.strip()]
        raise BenchmarkFailed(f"benchmark {variant}: its process failed (exit {proc.returncode}): "
                              f"{lines[-1] if lines else 'no output'}")
    entry = json.loads(Path(spec["out"]).read_text(encoding="utf-8"))
    logits = np.load(spec["logits"])
    file = plan.files.get(variant)
    entry["file"] = str(file) if file else None
    entry["file_bytes"] = (sum(p.stat().st_size for p in file.glob("*.safetensors")) if file and file.is_dir()
                           else file.stat().st_size if file else None)
    if labels is not None:
        entry["accuracy"] = float((logits.argmax(-1) == np.asarray(labels)).mean())
    else:
        entry["accuracy"] = None
    return {"variant": variant, **entry}, logits


def machine() -> dict:
    """The CPU model, cores, the instruction-set flags that decide int8 and bf16 speed, library versions."""
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    ort = next((v for v in map(version, ("onnxruntime", "onnxruntime-gpu")) if v), None)
    return {"cpu": name, "logical_cores": os.cpu_count(), "usable_cores": len(usable_cpus()),
            "flags": {f: f in flags for f in FLAGS}, "python": platform.python_version(), "torch": version("torch"),
            "onnxruntime": ort, "platform": platform.platform()}


def table(result: dict) -> str:
    """The machine, the settings, and one row per variant, for the screen."""
    m, st = result["machine"], result["settings"]
    flags = ", ".join(f"{f} {'yes' if m['flags'][f] else 'no'}" for f in
                      ("avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"))
    lines = [f"machine: {m['cpu']}, {m['logical_cores']} logical cores ({m['usable_cores']} usable); {flags}",
             f"         torch {m['torch']}, onnxruntime {m['onnxruntime']}, python {m['python']}",
             f"settings: {st['threads']} threads pinned to CPUs {','.join(map(str, st['pinned_cpus']))}; latency: "
             f"{st['runs']} calls at batch 1 after {st['warmup']} warm-up; throughput: {st['throughput_calls']} calls "
             f"at batch {st['batch']}; {st['samples']} samples from {st['data']}; provider {st['provider']}",
             ""]
    head = ["variant", "p50 ms", "p95 ms", f"samples/s @{st['batch']}", "peak RSS MB", "size MB", "accuracy",
            "agreement", "preprocess ms"]

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    rows = [[v["variant"], num(v["latency_ms"]["p50"], ".2f"), num(v["latency_ms"]["p95"], ".2f"),
             num(v["throughput"]["samples_per_s"], ".1f"), num(v["peak_rss_mb"], ".0f"),
             num(v["file_bytes"] / 1e6 if v["file_bytes"] is not None else None, ".1f"), num(v["accuracy"], ".4f"),
             num(v["agreement"], ".4f"), num(v["preprocess_ms"]["mean"], ".2f")] for v in result["variants"]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    lines += [fmt(head)] + [fmt(r) for r in rows]
    return "\n".join(lines) + "\n"


# ---- the per-variant process: python -m finetunekit.benchmark SPEC.json ----

def _worker(spec: dict) -> None:
    threads = int(spec["threads"])
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec["cpus"])
    variant = spec["variant"]
    start = time.perf_counter()
    if variant.startswith("onnx-"):
        prepare, collate, forward, info = _onnx_engine(spec, threads)
    else:
        prepare, collate, forward, info = _torch_engine(spec, threads)
    load_s = time.perf_counter() - start
    samples = [tuple(s) if isinstance(s, list) else s for s in spec["samples"]]
    batch, held = int(spec["batch"]), []
    prep, outputs = [], []
    for lo in range(0, len(samples), batch):  # 2. accuracy pass; preprocessing timed per sample
        items = []
        for s in samples[lo:lo + batch]:
            t = time.perf_counter()
            items.append(prepare(s))
            prep.append(time.perf_counter() - t)
        outputs.append(forward(collate(items)))
        if len(held) < batch:
            held += items[:batch - len(held)]
    logits = np.concatenate(outputs).astype(np.float32)
    big = collate([held[i % len(held)] for i in range(batch)])
    singles = [collate([x]) for x in held]
    for i in range(int(spec["warmup"])):  # 3. warm-up
        forward(singles[i % len(singles)])
    forward(big)
    gc.collect()
    gc.disable()  # no collector pauses inside the timed calls
    latency = []
    for i in range(int(spec["runs"])):  # 4. latency at batch 1
        t = time.perf_counter()
        forward(singles[i % len(singles)])
        latency.append(time.perf_counter() - t)
    calls = max(3, int(spec["runs"]) // 10)
    t = time.perf_counter()
    for _ in range(calls):  # 5. throughput at batch `batch`
        forward(big)
    elapsed = time.perf_counter() - t
    gc.enable()
    ms = np.asarray(latency) * 1000
    np.save(spec["logits"], logits)
    Path(spec["out"]).write_text(json.dumps({
        **info, "load_s": load_s, "samples": len(samples),
        "preprocess_ms": {"mean": 1000 * float(np.mean(prep)), "p50": 1000 * float(np.percentile(prep, 50))},
        "latency_ms": {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
                       "mean": float(ms.mean()), "calls": len(ms)},
        "throughput": {"samples_per_s": calls * batch / elapsed, "batch": batch, "calls": calls},
        "peak_rss_mb": peak_rss_mb(),
        "torch_imported": "torch" in sys.modules}), encoding="utf-8")


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MiB. Linux: VmHWM, the high-water mark of this process's own
    memory since exec. Not getrusage's ru_maxrss: Linux carries that across fork and exec, so a variant's
    process would report its parent's peak (which holds torch and the model) when that was higher."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _pad(items: list[dict], pad_id: int, left: bool) -> dict[str, np.ndarray]:
    """Tokenized samples ({name: [ids]}) as one int64 batch padded to the longest (as PadCollate pads)."""
    width = max(len(x["input_ids"]) for x in items)
    out = {}
    for key in items[0]:
        fill = pad_id if key == "input_ids" else 0
        out[key] = np.array([[fill] * (width - len(x[key])) + list(x[key]) if left else
                             list(x[key]) + [fill] * (width - len(x[key])) for x in items], dtype=np.int64)
    return out


def _onnx_engine(spec: dict, threads: int):
    """onnxruntime only, as `finetunekit predict` on an export runs it: no torch in this process."""
    import onnxruntime as ort

    from . import runtime
    from .imagefiles import load_rgb

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = [spec["provider"]] + (["CPUExecutionProvider"] if spec["provider"] != "CPUExecutionProvider" else [])
    model = runtime.load(spec["file"], providers=providers, session_options=options)
    info = {"engine": f"onnxruntime {ort.__version__}", "providers": model.session.get_providers()}
    if model.modality == "text":
        pad, left = int(model.text["pad_id"]), model.text.get("padding_side") == "left"
        prepare = lambda s: {k: v[0] for k, v in model.encode([s]).items()}  # noqa: E731
        return prepare, lambda items: _pad(items, pad, left), model.logits, info
    name = model.inputs[0]
    return (lambda s: model.preprocess(load_rgb(s)), lambda items: {name: np.stack(items)},  # [B, 3, H, W]
            model.logits, info)


def _torch_engine(spec: dict, threads: int):
    """The loaded model (eager-fp32, eager-bf16: autocast) or the TorchScript file, in PyTorch."""
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    from .artifacts import load
    from .export import graph as G

    bf16 = spec["variant"] == "eager-bf16"
    info = {"engine": f"torch {torch.__version__}" + (" (bf16 autocast)" if bf16 else ""), "providers": None}
    if spec["variant"] == "torchao-int8":
        from .addons import qat

        if spec["file"]:
            model, info["int8"] = qat.load_int8(spec["folder"]), "the --qat run's model.int8.safetensors"
        else:
            model, info["int8"] = load(spec["folder"]), "post-training quantization of the fp32 weights"
            qat.ptq(model.module.float())
        info["engine"] = f"torch {torch.__version__} + torchao int8"
    else:
        model = load(spec["folder"])
    text = model.backbone.adapter.modality == "text"
    if text:
        from .data.text import tokenize

        tok, max_length = model.tokenizer, model.max_length
        names = list(tokenize(tok, [("a",) * len(model.text_columns)], max_length))
        graph = G.TextLogits(model.module.float().eval(), names)
        prepare = lambda s: {k: v[0] for k, v in tokenize(tok, [s], max_length).items()}  # noqa: E731
        collate = lambda items: _pad(items, tok.pad_token_id, tok.padding_side == "left")  # noqa: E731
    else:
        from .data import build_transform, load_rgb

        names = [G.PIXELS]
        tf = build_transform(model.backbone.preprocessing, augment="none")
        graph = G.ImageLogits(model.module.float().eval(), model.tta)
        prepare = lambda s: tf(load_rgb(s)).numpy()  # noqa: E731 - [3, H, W]
        collate = lambda items: {G.PIXELS: np.stack(items)}  # noqa: E731
    if spec["variant"] == "torchscript":  # the eager model only gave the preprocessing: let it go
        del graph, model
        gc.collect()
        graph = torch.jit.load(spec["file"], map_location="cpu").eval()

    @torch.inference_mode()
    def forward(feeds: dict[str, np.ndarray]) -> np.ndarray:
        args = [torch.from_numpy(feeds[n]) for n in names]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return graph(*args).float().numpy()

    return prepare, collate, forward, info


if __name__ == "__main__":
    _worker(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))
