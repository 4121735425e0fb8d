#!/bin/bash
# usage: bash bench/peft_images.sh [OUT]   (~4 minutes on 2 CPU cores)
# issue 16 images (docs/peft.md, "Images"): LoRA on the built-in CNN vs full and the linear probe; LoRA and visual prompts on a ViT-Tiny
# built from timm's config (random weights, seed 0: no pretrained ViT installs offline)
cd "$(dirname "$0")/.."
O=${1:-/tmp/fk-peft-images}  # where the runs go
mkdir -p "$O"
DATA=$(cd ../shared/data && pwd)
export O DATA
B=.venv/bin/finetunekit
.venv/bin/python - <<'PY'
import torch, timm
from safetensors.torch import save_file
torch.manual_seed(0)
m = timm.create_model("vit_tiny_patch16_224", pretrained=False)
save_file({k: v.contiguous() for k, v in m.state_dict().items()}, __import__("os").environ["O"] + "/vit_tiny_random.safetensors")
PY
python3 - <<'PY'
from pathlib import Path
root = Path(__import__("os").environ["DATA"]) / "cifar10-mini" / "train"
lines = ["path,label"]
for c in sorted(d.name for d in root.iterdir() if d.is_dir()):
    lines += [f"{p},{c}" for p in sorted((root / c).glob("*.jpg"))[:200]]
(Path(__import__("os").environ["O"]) / "train.csv").write_text("\n".join(lines) + "\n")
PY
C="--data $O/train.csv --test $DATA/cifar10-mini/test --image-size 64 --epochs 3 --seed 0 --quiet --overwrite"
for v in "full:--strategy full" "lp:--strategy linear-probe" "lora:--peft lora --strategy full"; do
  n=${v%%:*}; a=${v#*:}
  /usr/bin/time -f "$n wall %e s maxrss %M KB" $B fit --model efficientnet_lite0 $C $a --out $O/lite0-$n
done
W="--model timm:vit_tiny_patch16_224 --weights $O/vit_tiny_random.safetensors"
for v in "full:--strategy full" "lp:--strategy linear-probe" "lora:--peft lora --strategy full" "vpt:--peft prompt --prompt-tokens 10 --strategy full"; do
  n=${v%%:*}; a=${v#*:}
  /usr/bin/time -f "vit-$n wall %e s maxrss %M KB" $B fit $W $C $a --out $O/vit-$n
done
for d in $O/lite0-* $O/vit-*; do
  python3 -c "
import json,sys; m=json.load(open('$d/metrics.json')); print('$d', 'test', round(m['test']['accuracy'],4), 'val', round(m['val']['accuracy'],4), 'sps', m.get('train_samples_per_s'))"
  du -sh $d/model | cut -f1
done
