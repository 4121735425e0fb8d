"""2-process DDP against 2-process FSDP2 on the CPU (gloo), side by side (run under torchrun, 2 processes):

  ddp   torch's DistributedDataParallel (what finetunekit wraps a model in without --fsdp): every process holds
        the whole model, gradients are all-reduced
  fsdp  torch's fully_shard on each block and the head, then the root, exactly as finetunekit's --fsdp does it
        on the CPU (finetunekit.sharding.shard's units): each process holds about half of the parameters,
        gradients and AdamW moments; each block's weights are all-gathered for its forward and backward

    PYTHONPATH=. OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/ddp_fsdp.py [--steps 20]

timm's vit_small_patch16_224 (22M parameters, random init) at 64 px, batch 16 per process, AdamW, real
CIFAR-10-mini images; the same number of steps each way (after 3 warm-up steps), alternating ddp, fsdp, ddp,
fsdp. Rank 0 prints one JSON line and appends it to bench/ddp_fsdp.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from ddp_phase import batch  # noqa: E402
from finetunekit.models import create_backbone  # noqa: E402
from finetunekit.sharding import local_share, units  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--model", default="timm:vit_small_patch16_224")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    x, y = batch(16, args.size, rank)
    results: dict[str, list] = {}
    for way in ("ddp", "fsdp", "ddp", "fsdp"):
        torch.manual_seed(0)
        backbone = create_backbone(args.model, 10, pretrained=False, image_size=args.size)
        model = backbone.module
        if way == "ddp":
            wrapped = DDP(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for _, sub in units(model, backbone.adapter.layer_groups(backbone)):
                fully_shard(sub)
            wrapped = fully_shard(model)
        held, total = local_share(model)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-4, fused=True)
        for step in range(args.steps + 3):
            if step == 3:
                dist.barrier()
                t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(wrapped(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        dist.barrier()
        per_step = (time.perf_counter() - t0) / args.steps
        counts = [0, 0]
        dist.all_gather_object(counts, held)
        results.setdefault(way, []).append({"step_ms": round(per_step * 1000, 1), "params_per_process": counts,
                                            "loss": round(float(loss), 4)})
        del wrapped, model, opt
    if rank == 0:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        line = {"model": args.model, "parameters": total, "size": args.size, "batch_per_process": 16,
                "processes": 2, "steps": args.steps, "optimizer": "adamw (fused)", "commit": commit,
                "torch": torch.__version__, **results,
                "fsdp_over_ddp": round(sum(r["step_ms"] for r in results["fsdp"])
                                       / sum(r["step_ms"] for r in results["ddp"]), 2)}
        print(json.dumps(line))
        with (ROOT / "bench" / "ddp_fsdp.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
