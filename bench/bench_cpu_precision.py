"""bf16 autocast against fp32 on the CPU: training-step time, side by side, several rounds.

What `--precision auto` decides on a CPU with AVX-512 BF16 / AMX (see `lscpu`). For each model, one process
builds it once and alternates rounds (fp32, bf16, fp32, ...) of the same training steps on the same
batch: forward under `torch.autocast("cpu", torch.bfloat16)` (or none), cross-entropy, backward, fused
AdamW step, exactly as `finetunekit fit` runs them. The ratio is the median of the per-round ratios.

    .venv/bin/python bench/bench_cpu_precision.py                 # ~4 minutes on 2 CPU cores
    .venv/bin/python bench/bench_cpu_precision.py --models lite0-224 --rounds 5

`--fits DATASETS` measures accuracy and wall time by whole runs instead: `finetunekit fit` with nothing but
the data (bench_defaults.py's datasets and settings) and `--precision no`, then `--precision bf16`, each in
its own process with a cold cache; rows are appended to bench/cpu_precision.jsonl.

    .venv/bin/python bench/bench_cpu_precision.py --fits sst2-800,sst2      # ~10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def image_model(size: int, batch: int):
    from finetunekit.models import create_backbone

    backbone = create_backbone("efficientnet_lite0", 10)
    model = backbone.module.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    return model, lambda m: F.cross_entropy(m(x), y)


def text_model(length: int, batch: int):
    from finetunekit.models import create_text_backbone

    backbone = create_text_backbone("minilm", ["neg", "pos"], "classification")
    model = backbone.module
    ids = torch.randint(1000, 20000, (batch, length))
    mask = torch.ones_like(ids)
    y = torch.randint(0, 2, (batch,))
    return model, lambda m: F.cross_entropy(m(input_ids=ids, attention_mask=mask).logits, y)


def vit_model(size: int, batch: int):
    import timm

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, img_size=size)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    return model, lambda m: F.cross_entropy(m(x), y)


MODELS = {
    "lite0-224": lambda a: image_model(224, a.batch_size),
    "lite0-64": lambda a: image_model(64, a.batch_size),
    "minilm-64": lambda a: text_model(64, a.batch_size),  # SST-2's sentences: mean 25, max 66 tokens
    "vit-s-224": lambda a: vit_model(224, a.batch_size),  # timm's ViT-S/16 (random weights: speed only)
}


def steps_per_s(model, loss_fn, optimizer, steps: int, bf16: bool) -> float:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with ctx:
            loss = loss_fn(model)
        loss.backward()
        optimizer.step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--fits", help="comma-separated bench_defaults.py datasets: whole runs, fp32 then bf16")
    args = parser.parse_args()
    if args.fits:
        return fits(args.fits.split(","))
    torch.manual_seed(0)
    for name in args.models.split(","):
        model, loss_fn = MODELS[name](args)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        for bf16 in (False, True):  # warm-up: oneDNN picks and caches its kernels per dtype
            steps_per_s(model, loss_fn, optimizer, 2, bf16)
        ratios = []
        for r in range(args.rounds):
            fp32 = steps_per_s(model, loss_fn, optimizer, args.steps, False)
            bf16 = steps_per_s(model, loss_fn, optimizer, args.steps, True)
            ratios.append(bf16 / fp32)
            print(f"{name} round {r + 1}: fp32 {fp32 * args.batch_size:.1f} samples/s, bf16 "
                  f"{bf16 * args.batch_size:.1f} samples/s, ratio {bf16 / fp32:.3f}", flush=True)
        print(f"SUMMARY cpu-precision {name}: batch {args.batch_size} threads {torch.get_num_threads()} "
              f"bf16/fp32 median {statistics.median(ratios):.3f} (rounds: "
              f"{', '.join(f'{x:.2f}' for x in ratios)})", flush=True)


def fits(names: list[str]) -> None:
    import json
    import subprocess
    import tempfile

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_defaults import datasets, run_fit

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        sets = datasets(Path(tmp))
        for name in names:
            rows = {}
            for precision in ("no", "bf16"):
                rows[precision] = run_fit(name, sets[name], "auto", Path(tmp), ("--precision", precision))
                row = {"dataset": name, "precision": precision, "commit": commit, **rows[precision]}
                print(json.dumps(row), flush=True)
                with (ROOT / "bench" / "cpu_precision.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
            print(f"SUMMARY cpu-precision fit {name}: accuracy fp32 {rows['no']['accuracy']:.4f} bf16 "
                  f"{rows['bf16']['accuracy']:.4f}; wall fp32 {rows['no']['wall_s']} s bf16 {rows['bf16']['wall_s']} s, "
                  f"ratio {rows['no']['wall_s'] / rows['bf16']['wall_s']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
