"""A head-only phase under DDP, two ways (run under torchrun, 2 processes):

  rebuild  the DDP wrapper rebuilt at the phase change (finetunekit's way, distributed.for_phase): its reducer
           holds the head alone; the frozen backbone needs no weight gradients and nothing of it is all-reduced
  zeroed   one wrapper over every parameter for the whole run; frozen parameters keep requires_grad and have
           their gradients dropped (set to None) after the all-reduce, before the optimizer step

    PYTHONPATH=. OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/ddp_phase.py [--steps 20]

EfficientNet-Lite0 (built in), 64 px, batch 16 per process, AdamW, real CIFAR-10-mini images; times the same
number of steps both ways (after 3 warm-up steps), and the cost of building a new wrapper. Rank 0 prints one
JSON line and appends it to bench/ddp_phase.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from finetunekit.models import create_backbone  # noqa: E402

CIFAR = ROOT.parent / "shared" / "data" / "cifar10-mini" / "train"


def batch(n: int, size: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    classes = sorted(p.name for p in CIFAR.iterdir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((CIFAR / c).glob("*.jpg"))[:20]]
    files = files[offset::7][:n]
    x = torch.stack([torch.from_numpy(__import__("numpy").asarray(Image.open(f).convert("RGB").resize((size, size))))
                     .permute(2, 0, 1).float() / 255 for f, _ in files])
    return (x - 0.5) / 0.5, torch.tensor([y for _, y in files])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    x, y = batch(16, args.size, rank)
    results = {}
    for way in ("rebuild", "zeroed", "rebuild", "zeroed"):
        torch.manual_seed(0)
        backbone = create_backbone("efficientnet_lite0", 10, pretrained=True)
        model = backbone.module
        head = [p for n, p in model.named_parameters() if backbone.is_head(n)]
        frozen = [p for n, p in model.named_parameters() if not backbone.is_head(n)]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        started = time.perf_counter()
        if way == "rebuild":
            for p in frozen:
                p.requires_grad_(False)
        wrapped = DDP(model)
        build = time.perf_counter() - started
        for step in range(args.steps + 3):
            if step == 3:
                dist.barrier()
                t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(wrapped(x), y)
            loss.backward()
            if way == "zeroed":
                for p in frozen:
                    p.grad = None
            opt.step()
            opt.zero_grad(set_to_none=True)
        dist.barrier()
        per_step = (time.perf_counter() - t0) / args.steps
        results.setdefault(way, []).append({"step_ms": round(per_step * 1000, 1), "build_ms": round(build * 1000, 1)})
        assert all(p.grad is None for p in frozen)
        del wrapped
    if rank == 0:
        line = {"model": "efficientnet_lite0", "size": args.size, "batch_per_process": 16, "processes": 2,
                "steps": args.steps, **results,
                "zeroed_over_rebuild": round(sum(r["step_ms"] for r in results["zeroed"])
                                             / sum(r["step_ms"] for r in results["rebuild"]), 2)}
        print(json.dumps(line))
        with (ROOT / "bench" / "ddp_phase.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
