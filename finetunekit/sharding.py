"""`--fsdp`: the model sharded across the processes with torch's FSDP2 (`fully_shard`), and the glue that lets
checkpoints, `--resume`, the model folder and the test set read and write whole state dicts of it.

Who shards: on GPUs, accelerate (`FullyShardedDataParallelPlugin(fsdp_version=2)`, from `--fsdp` or from an
accelerate config with `distributed_type: FSDP`), inside `accelerator.prepare`. On the CPU accelerate keeps
MULTI_CPU (it selects FSDP for GPU-like devices only), so `shard` applies `fully_shard` itself: to each layer
group of the backbone that is one submodule (timm's blocks, a transformer's layers, the head), then to the
root, and points the optimizer at the sharded parameters (by name, keeping its order and param groups). The
model is then registered with accelerate by `prepare_model(..., evaluation_mode=True)`: autocast and the
model list as usual, but no DistributedDataParallel wrapper (DDP refuses DTensor parameters, and FSDP already
reduces the gradients).

Whole state dicts (torch.distributed.checkpoint.state_dict): every process takes part in the gather, process 0
receives the full tensors (`full_state_dict=True, cpu_offload=True`). The optimizer's comes keyed by parameter
name; it is re-keyed by position, as `optimizer.state_dict()` keys it, so a checkpoint of a sharded run has the
format of an unsharded one (and resumes in one process). Loading goes the other way: every process reads the
full tensors and keeps its shard (`set_model_state_dict`; the optimizer's moments cut like their parameters).

The model folder needs a whole module of the source library's own class to save: `shard` keeps, on process 0,
a copy of the model's structure whose parameters are on the meta device (no memory), and `gathered` fills it
with the full weights for the export.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch
from torch import nn

log = logging.getLogger("finetunekit")


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` holds FSDP2-sharded (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def units(module: nn.Module, groups: Iterable) -> list[tuple[str, nn.Module]]:
    """The submodules to shard one by one (each all-gathered in its own forward and freed after): every layer
    group whose parameters are exactly one submodule's (timm's blocks and head, a transformer's layers). Groups
    that span several modules (the stem with the position embedding, the last block with the final norm) stay
    with the root."""
    names = dict(module.named_modules())
    out = []
    for group in groups:
        prefix = _common_prefix(group.params)
        if not prefix or prefix not in names:
            continue
        sub = names[prefix]
        if sorted(f"{prefix}.{n}" for n, _ in sub.named_parameters()) == sorted(group.params):
            out.append((prefix, sub))
    return out


def _common_prefix(params: list[str]) -> str:
    parts = [p.split(".")[:-1] for p in params]
    common = []
    for atoms in zip(*parts):
        if len(set(atoms)) != 1:
            break
        common.append(atoms[0])
    return ".".join(common)


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` (its own class, hooks, config) whose parameters are on the meta device: the
    structure to load a gathered state dict into, for the model folder. Buffers are copied (small)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


class Sharding:
    """What `--fsdp` needs after the model is sharded: process 0's skeleton of the unsharded model."""

    def __init__(self, skeleton: nn.Module | None, engine: str):
        self.skeleton = skeleton  # process 0: the unsharded structure (meta parameters); others: None
        self.engine = engine  # "fully_shard" (ours, on the CPU) or "accelerate"

    # ---- whole state dicts (collectives: every process calls them) ----

    def model_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's state dict on process 0 (CPU tensors); {} on the others."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, module: nn.Module, optimizer) -> dict:
        """The optimizer's whole state dict on process 0, keyed by parameter position as `optimizer.state_dict()`
        keys it (the unsharded checkpoint format); {} on the others."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(module, _base(optimizer),
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not osd:
            return {}
        index: dict[str, int] = {}
        groups = []
        for group in osd["param_groups"]:
            groups.append({**group, "params": [index.setdefault(n, len(index)) for n in group["params"]]})
        return {"state": {index[n]: v for n, v in osd["state"].items()}, "param_groups": groups}

    def load_model(self, module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True):
        """Every process: `state` (whole tensors) into its shards. Returns (missing, unexpected) keys."""
        return load_whole(module, state, strict)

    def load_optimizer(self, module: nn.Module, optimizer, state: dict) -> None:
        """Every process: a whole optimizer state dict keyed by position (a checkpoint's) into its shards. Each
        state tensor shaped like its parameter is cut as the parameter is (`distribute_tensor` of the local copy,
        no communication: every process read the same checkpoint), then the optimizer's own `load_state_dict`.
        (torch's `set_optimizer_state_dict` maps the saved param groups onto the live ones key by key, and a
        live group does not have the keys a phase change adds yet: KeyError 'param_groups.0.base_lr_scale'.)"""
        from torch.distributed.tensor import DTensor, distribute_tensor

        base = _base(optimizer)
        params = [p for g in base.param_groups for p in g["params"]]
        cut: dict[int, dict] = {}
        for i, entry in state["state"].items():
            p = params[int(i)]
            cut[int(i)] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                           if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                           for k, v in entry.items()}
        base.load_state_dict({"state": cut, "param_groups": state["param_groups"]})

    def gathered(self, module: nn.Module) -> nn.Module | None:
        """Process 0: the unsharded model (the source library's class) holding `module`'s whole weights, for the
        model folder; None on the others. Every process must call it (the weights are gathered)."""
        state = self.model_state(module)
        if self.skeleton is None:
            return None
        self.skeleton.load_state_dict(state, assign=True)
        return self.skeleton

    def release(self) -> None:
        """After an export: process 0's copy of the whole weights goes back to the meta device."""
        if self.skeleton is not None:
            self.skeleton.to("meta")


def load_whole(module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    return set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def local_share(module: nn.Module) -> tuple[int, int]:
    """(parameters this process holds, parameters of the whole model): about total / N each under FSDP."""
    from torch.distributed.tensor import DTensor

    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in module.parameters())
    return local, sum(p.numel() for p in module.parameters())


def _base(optimizer):
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def shard(accelerator, module: nn.Module, optimizer, groups) -> tuple[nn.Module, Sharding]:
    """The CPU path (accelerate cannot shard there): `fully_shard` on each unit and the root, the optimizer's
    parameters swapped for the sharded ones, the model registered with accelerate without a DDP wrapper."""
    from torch.distributed.fsdp import fully_shard

    skeleton = _meta_copy(module) if accelerator.is_main_process else None
    base = _base(optimizer)
    names = {id(p): n for n, p in module.named_parameters()}
    order = [[names[id(p)] for p in g["params"]] for g in base.param_groups]
    if base.state:
        raise RuntimeError("--fsdp: the optimizer has state before sharding")
    parts = units(module, groups)
    for _, sub in parts:
        fully_shard(sub)
    fully_shard(module)
    sharded = dict(module.named_parameters())
    for group, names_in in zip(base.param_groups, order):
        group["params"] = [sharded[n] for n in names_in]
    log_share(accelerator, module, f"torch's fully_shard ({len(parts)} units + the root: "
                                   f"{', '.join(n for n, _ in parts[:4])}{', ...' if len(parts) > 4 else ''})")
    # no DDP around it: accelerate's prepare_model in evaluation mode applies autocast and records the model
    module = accelerator.prepare_model(module, evaluation_mode=True)
    return module, Sharding(skeleton, "fully_shard")


def for_accelerate(accelerator, module: nn.Module, groups) -> Sharding:
    """The GPU path, before `accelerator.prepare` shards the model: process 0's skeleton, and the units' classes
    for accelerate's transformer-based auto-wrap policy when the model does not name its own
    (`_no_split_modules`: transformers' models do) and the config named none."""
    plugin = accelerator.state.fsdp_plugin
    if getattr(module, "_no_split_modules", None) is None and not plugin.transformer_cls_names_to_wrap:
        generic = ("Sequential", "ModuleList", "ModuleDict")
        body = [g for g in groups if not g.is_head]  # a Linear head's class would wrap every Linear
        names = sorted({type(sub).__name__ for _, sub in units(module, body)} - set(generic))
        if names:
            plugin.transformer_cls_names_to_wrap = names
    return Sharding(_meta_copy(module) if accelerator.is_main_process else None, "accelerate")


def log_share(accelerator, module: nn.Module, by: str) -> None:
    local, total = local_share(accelerator.unwrap_model(module, keep_torch_compile=False))
    log.info("--fsdp: the model sharded over %d processes by %s; process 0 holds %.3gM of %.3gM parameters",
             accelerator.num_processes, by, local / 1e6, total / 1e6)


def held(accelerator, module: nn.Module) -> dict:
    """How many parameters each process holds (a gather): {"per_process": [...], "total": N}."""
    local, total = local_share(accelerator.unwrap_model(module, keep_torch_compile=False))
    counts = accelerator.gather(torch.tensor([local], device=accelerator.device)).tolist()
    return {"per_process": counts, "total": total}
