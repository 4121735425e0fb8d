"""Peak memory of one training step with and without `--grad-checkpointing`, side by side in one run.

    .venv/bin/python bench/bench_grad_checkpointing.py [--steps 3]

Each case runs in a fresh process: the model is built through finetunekit's adapters and the add-on
(addons/grad_checkpointing.py), then `--steps` forward + backward + AdamW steps run on real data:
  - minilm (all-MiniLM-L6-v2), batch 32 of SST-2 sentences padded to 128 tokens;
  - timm vit_small_patch16_224 (random init: no weights offline), batch 32 of CIFAR-10 mini images at 224 px.
On a GPU the figure is torch.cuda.max_memory_allocated; on the CPU it is the growth of the process's peak
resident memory (ru_maxrss) over what it held before the first step (the model, its optimizer state after
one warm-up step is included in neither case's baseline the same way). Steps are timed too.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def case(model: str, checkpointing: bool, steps: int) -> dict:
    import torch

    from finetunekit.addons.grad_checkpointing import GradCheckpointing
    from finetunekit.models import create_backbone, create_text_backbone

    torch.manual_seed(0)
    if model == "minilm":
        backbone = create_text_backbone("minilm", ["negative", "positive"], "classification")
        lines = (SHARED / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:33]
        sentences = [line.split("\t")[0] for line in lines]
        enc = backbone.tokenizer(sentences, padding="max_length", truncation=True, max_length=128,
                                 return_tensors="pt")
        batch = {k: enc[k] for k in ("input_ids", "attention_mask")}
        target = torch.tensor([int(line.split("\t")[1]) for line in lines])
        forward = lambda m: m(**batch).logits  # noqa: E731
    else:
        from PIL import Image

        backbone = create_backbone("timm:vit_small_patch16_224", 10, pretrained=False)
        files = sorted((SHARED / "cifar10-mini" / "train" / "airplane").glob("*.jpg"))[:32]
        pre = backbone.preprocessing
        from finetunekit.data import build_transform

        tf = build_transform(pre, "none")
        x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
        target = torch.zeros(32, dtype=torch.long)
        forward = lambda m: m(x)  # noqa: E731
    module = backbone.module
    if checkpointing:
        module = GradCheckpointing(backbone).wrap_model(module)
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    gpu = torch.cuda.is_available()
    if gpu:
        module.cuda()

    def step():
        loss = torch.nn.functional.cross_entropy(forward(module), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up: optimizer state allocated, kernels chosen
    before = _current_rss_mb()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    losses = [step() for _ in range(steps)]
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else _rss_mb() - before
    return {"model": model, "grad_checkpointing": checkpointing, "peak_mb": round(peak, 1),
            "seconds_per_step": round(seconds, 3), "losses": losses, "device": "cuda" if gpu else "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # model, on|off: one case, in this process
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(args.case[0], args.case[1] == "on", args.steps)))
        return
    rows = []
    for model in ("minilm", "vit_small"):
        for flag in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--case", model, flag],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{model:10s} grad checkpointing {flag:3s}: peak +{r['peak_mb']:8.1f} MB  "
                  f"{r['seconds_per_step']:.2f} s/step  ({r['device']})", flush=True)
    for model in ("minilm", "vit_small"):
        off, on = (r for r in rows if r["model"] == model)
        print(f"SUMMARY {model}: peak memory {off['peak_mb']:.0f} -> {on['peak_mb']:.0f} MB "
              f"({on['peak_mb'] / off['peak_mb']:.2f}x), step time {on['seconds_per_step'] / off['seconds_per_step']:.2f}x; "
              f"losses {'identical' if on['losses'] == off['losses'] else 'differ: %s vs %s' % (on['losses'], off['losses'])}")


if __name__ == "__main__":
    main()
