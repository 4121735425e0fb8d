"""bf16 autocast against fp32 on the CPU: training-step time, side by side, several rounds.

What `--precision auto` decides on a CPU with AVX-512 BF16 / AMX (see `lscpu`). For each model, one process
builds it once and alternates rounds (fp32, bf16, fp32, ...) of the same training steps on the same
batch: forward under `torch.autocast("cpu", torch.bfloat16)` (or none), cross-entropy, backward, fused
AdamW step, exactly as `finetunekit fit` runs them. The ratio is the median of the per-round ratios.

    .venv/bin/python bench/bench_cpu_precision.py                 # ~4 minutes on 2 CPU cores
    .venv/bin/python bench/bench_cpu_precision.py --models lite0-224 --rounds 5

Accuracy is measured by whole runs (`finetunekit fit --precision bf16` against `--precision no`); the
commands and figures are in docs/speed.md.
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


MODELS = {
    "lite0-224": lambda a: image_model(224, a.batch_size),
    "lite0-64": lambda a: image_model(64, a.batch_size),
    "minilm-64": lambda a: text_model(64, a.batch_size),  # SST-2's sentences: mean 25, max 66 tokens
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
