"""Several processes (torch.distributed, through accelerate): which process writes, the start-up line that says
how many processes train, DistributedDataParallel across a strategy's phase changes, and `--processes N`.

A run launched by `torchrun`, `accelerate launch` or `finetunekit fit --processes N` (which hands the same
command to torch's elastic launcher) has one process per device, each with `RANK` and `WORLD_SIZE` in its
environment. Every process checks the recipe, the data and `--out` (reading only, identically); process 0
alone writes the run directory (its claim, log.txt, recipe.yaml, checkpoints, the model folder, metrics),
and the others wait for it at the barriers the run passes (docs/distributed.md).

A phase change under DDP: DDP's reducer holds the parameters that required a gradient when it was built.
A parameter unfrozen later is never all-reduced (each process would drift on its own), and a parameter frozen
later makes the reducer wait for a gradient that never comes ("Expected to have finished reduction in the
prior iteration"). So `for_phase` builds a new DDP wrapper around the same model, with the same options,
whenever the trainable set changed (measured against the alternative in docs/distributed.md).
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import UserError

log = logging.getLogger("finetunekit")


def rank() -> int:
    """This process's rank (0 without a launcher); known before the process group is set up."""
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main() -> bool:
    return rank() == 0


# each wrapper for_phase built -> the parameters its reducer holds (DDP keeps no record of them; a wrapper
# built elsewhere, accelerate's, is rebuilt at the first phase: one broadcast of the weights)
_REDUCED: weakref.WeakKeyDictionary[DistributedDataParallel, frozenset[int]] = weakref.WeakKeyDictionary()


def _trainable(module: nn.Module) -> frozenset[int]:
    return frozenset(id(p) for p in module.parameters() if p.requires_grad)


def for_phase(accelerator, module: nn.Module) -> nn.Module:
    """`module` (the prepared model) after a phase changed which parameters train: a DDP wrapper whose reducer
    holds exactly the trainable ones. The same wrapper when nothing changed, or when `module` is not DDP."""
    if not isinstance(module, DistributedDataParallel):
        return module
    inner = module.module
    if _REDUCED.get(module) == _trainable(inner):
        return module
    handler = accelerator.ddp_handler
    kwargs = handler.to_kwargs() if handler is not None else {}
    kwargs.pop("comm_hook", None)
    same = dict(find_unused_parameters=module.find_unused_parameters, static_graph=module.static_graph,
                gradient_as_bucket_view=module.gradient_as_bucket_view)
    if "broadcast_buffers" not in kwargs:
        same["forward_sync_buffers"] = module.forward_sync_buffers
    new = DistributedDataParallel(inner, device_ids=module.device_ids, output_device=module.output_device,
                                  **{**same, **kwargs})
    if handler is not None:
        handler.register_comm_hook(new)
    _REDUCED[new] = _trainable(inner)
    models = accelerator._models  # accelerate's own list: save_state, unwrap and no_sync see the new wrapper
    for i, m in enumerate(models):
        if m is module:
            models[i] = new
    del module  # the old reducer goes with its wrapper, and its hooks with it
    return new


def drift(accelerator, model: nn.Module) -> float | None:
    """The largest |difference| between any parameter on any process and process 0's: 0.0 when the processes
    trained in step, as DDP keeps them (None with one process, or a sharded model: each parameter's shards are
    held once, there is no copy to compare). One broadcast per tensor: run once, at the end."""
    from .sharding import is_sharded

    if accelerator.num_processes < 2 or is_sharded(model):
        return None
    worst = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for p in model.parameters():
            first = p.detach().clone()
            torch.distributed.broadcast(first, src=0)
            if p.numel():
                worst = torch.maximum(worst, (p.detach().double() - first.double()).abs().max())
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    return float(worst)


def check_backend(accelerator) -> None:
    """An accelerate config that selects sharded training: FSDP version 2 is taken (accelerate shards the model in
    `prepare`; checkpoints and the model folder gather whole state dicts: finetunekit.sharding); FSDP version 1,
    DeepSpeed and Megatron are refused before the run takes its folder (docs/distributed.md says why)."""
    kind = accelerator.distributed_type.value
    if kind == "FSDP" and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise UserError("accelerate config: fsdp_version 1: finetunekit shards with FSDP2 only (its phase changes "
                        "flip requires_grad per parameter, which FSDP1's flat parameters do not allow); set "
                        "fsdp_version: 2, or use --fsdp")
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise UserError(f"accelerate config: distributed_type {kind}: not supported by finetunekit (its engine owns "
                        f"the optimizer step, clipping and the optimizer's partitions, which the loop, phase changes "
                        f"and checkpoints manage); for a model that does not fit one device use --fsdp (FSDP2, "
                        f"ZeRO-3-like sharding) or distributed_type FSDP with fsdp_version 2; see docs/distributed.md")


def shard_mode(accelerator, fsdp: bool) -> str | None:
    """Who shards the model: "accelerate" (an FSDP accelerate state: GPUs, from --fsdp or an accelerate config),
    "fully_shard" (--fsdp in several CPU processes, where accelerate keeps MULTI_CPU), or None (unsharded)."""
    if accelerator.distributed_type.value == "FSDP":
        return "accelerate"
    if fsdp and accelerator.num_processes > 1:
        return "fully_shard"
    if fsdp:
        log.info("--fsdp: one process, nothing to shard: the model trains unsharded")
    return None


def check_compile(accelerator, strategy: str, compile: bool) -> None:
    """--compile with several processes and a strategy whose phases change what trains: refused before the run
    takes its folder (the compiled graph wraps the DDP wrapper that `for_phase` would have to rebuild)."""
    if compile and accelerator.num_processes > 1 and strategy in ("freeze-unfreeze", "lp-ft", "gradual"):
        raise UserError(f"--compile: not with --strategy {strategy} in {accelerator.num_processes} processes yet (its "
                        f"phase changes rebuild the DDP wrapper that torch.compile would have captured); drop "
                        f"--compile, or use full, linear-probe, bitfit or norm-head")


def startup_line(accelerator, batch_size: int, grad_accum: int) -> str:
    """How many processes train, on what, and the global batch: the line that makes a silent single-process
    launch visible (`accelerate launch --cpu --num_processes 2` starts one process: accelerate's --cpu takes its single-process launcher)."""
    n = accelerator.num_processes
    backend = torch.distributed.get_backend() if n > 1 and torch.distributed.is_initialized() else None
    per = f"batch {batch_size}" + (f" x --grad-accum {grad_accum}" if grad_accum > 1 else "")
    if n == 1:
        return f"processes: 1 ({accelerator.device}); global batch {batch_size * grad_accum} ({per})"
    return (f"processes: {n} ({accelerator.distributed_type.value}, {backend}, rank 0 on {accelerator.device}); "
            f"global batch {batch_size * grad_accum * n} ({per} per process)")


def check_world(requested: int | None) -> None:
    """`--processes N` inside a launched process: the launcher's world size must be N."""
    if requested and world_size() != requested and "RANK" in os.environ:
        raise UserError(f"--processes {requested}: this process was launched with {world_size()} processes "
                        f"(WORLD_SIZE); drop --processes under torchrun or accelerate launch")


def launch(processes: int, argv: Sequence[str], cpu: bool) -> int:
    """`finetunekit fit|search ... --processes N`: the same command in N processes on this machine, started by torch's
    elastic launcher (what `torchrun --nproc_per_node N` runs). Returns the exit code: 0, or a failed process's
    own code (2 for a bad input), after its one-line error."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    gpus = torch.cuda.device_count() if not cpu else 0
    if gpus and processes > gpus:
        raise UserError(f"--processes {processes}: this machine has {gpus} GPUs (one process per GPU; --cpu "
                        f"trains on the CPU)")
    if "OMP_NUM_THREADS" not in os.environ:  # the cores shared out, as torchrun's default of 1 would waste them
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its failure report is a stack trace: ours is a line
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id="finetunekit",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)("-m", "finetunekit.cli", *argv)
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        code = first.exitcode if first.exitcode > 0 else 128 - first.exitcode  # -9: killed by SIGKILL
        print(f"finetunekit: {argv[0] if argv else 'fit'} --processes {processes}: process {first.local_rank} stopped (exit code "
              f"{first.exitcode}){'' if code == 2 else '; its error is above'}", file=sys.stderr)
        return code
    return 0


def end_trackers(accelerator) -> None:
    """The end of a run: its trackers (tensorboard) finished. Not accelerate's end_training, which also destroys
    the process group: a search trains its next trial in the same group (search/ranks.py); cli.main ends it at the command's exit."""
    for tracker in accelerator.trackers:
        tracker.finish()

