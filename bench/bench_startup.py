"""Start-up cost of an image folder, before and after the one-pass scan: listing, readability scan and content
hash, the work a run does on its images before the first batch.

`before` is the code at --before (default 908371e: a full decode of every file, then every file read again
for its SHA-256), extracted with `git archive` into a temporary folder; `after` is this checkout. Each round
runs both, alternating, each in a fresh process that imports its own finetunekit and times
`data.sources.resolve_splits` (list, scan, split) then `checkpoint.content_hash` (what run.py hashes: the
training and validation files). The files are read once before the first round, so every round finds them in
the OS page cache (warm, both sides alike). The script compares the files each side rejects (and names any
difference) and the content hash of the undamaged files (those not named zz-*: bench/make_big_folder.py), which
must be the same (cache keys unchanged); the run's own content hash differs where the rejected sets do (a file
kept on one side lands in the split).

    flock /tmp/ftk-heavy.lock python bench/bench_startup.py --data /work/bigdata/cifar-big --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
from pathlib import Path
from finetunekit import checkpoint
from finetunekit.data.sources import resolve_splits
import finetunekit
assert finetunekit.__file__.startswith(sys.argv[2]), finetunekit.__file__
started = time.perf_counter()
s = resolve_splits(Path(sys.argv[1]), None, None, 0.1, 0, 0.01)
scanned = time.perf_counter()
whole, _, _ = checkpoint.content_hash({"train": [Path(p) for p in s.train.paths],
                                       "val": [Path(p) for p in s.val.paths]})
hashed = time.perf_counter()
kept = sorted(p for p in s.train.paths + s.val.paths if not Path(p).name.startswith("zz-"))
common, _, _ = checkpoint.content_hash({"train": [Path(p) for p in kept]})  # the undamaged files: both sides keep them
print(json.dumps({"scan": scanned - started, "hash": hashed - scanned,
                  "files": len(s.train) + len(s.val) + len(s.skipped),
                  "skipped": sorted(p for p, _ in s.skipped), "content": whole, "common": common}))
"""


def run_side(code: Path, data: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(data), str(code)], env=env, cwd="/",
                         capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"{code}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm(data: Path) -> int:
    n = 0
    for parent, _, names in os.walk(data):
        for name in names:
            with open(os.path.join(parent, name), "rb") as f:
                while f.read(1 << 20):
                    pass
            n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--before", default="908371e")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ftk-before-") as old:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "finetunekit"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        print(f"warm: read {warm(args.data)} files once", flush=True)
        rows = {"before": [], "after": []}
        for r in range(args.rounds):
            for side, code in (("before", Path(old)), ("after", ROOT)):
                rows[side].append(run_side(code, args.data))
                x = rows[side][-1]
                print(f"round {r + 1} {side}: scan {x['scan']:.2f}s, hash {x['hash']:.2f}s, {x['files']} files, "
                      f"{len(x['skipped'])} skipped", flush=True)
    b, a = rows["before"][0], rows["after"][0]
    files = b["files"]
    per = {side: statistics.median(x["scan"] + x["hash"] for x in rows[side]) * 10_000 / files for side in rows}
    same_skipped = b["skipped"] == a["skipped"]
    print(f"skipped before: {[Path(p).name for p in b['skipped']]}")
    print(f"skipped after:  {[Path(p).name for p in a['skipped']]}")
    if not same_skipped:
        print(f"only before: {sorted(set(b['skipped']) - set(a['skipped']))}")
        print(f"only after:  {sorted(set(a['skipped']) - set(b['skipped']))}")
    scan = {side: statistics.median(x["scan"] for x in rows[side]) * 10_000 / files for side in rows}
    hashed = {side: statistics.median(x["hash"] for x in rows[side]) * 10_000 / files for side in rows}
    print(f"SUMMARY startup: files={files} rounds={args.rounds} cache=warm at={commit} before={args.before} "
          f"s_per_10k: before={per['before']:.2f} (scan {scan['before']:.2f} + hash {hashed['before']:.2f}) "
          f"after={per['after']:.2f} (scan {scan['after']:.2f} + hash {hashed['after']:.2f}) "
          f"speedup={per['before'] / per['after']:.2f}x same_skipped={same_skipped} "
          f"same_content_hash={b['content'] == a['content']} same_hash_of_undamaged={b['common'] == a['common']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
