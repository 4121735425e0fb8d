"""Unsupervised domain adaptation (`--domain-adapt coral|mmd --target-data DIR`): the model trains on the labeled
source images as usual, and each training batch is paired with a batch of the same size of unlabeled target-domain
images; a loss between the two batches' features pulls the target features towards the source's:

    loss = task loss + --da-weight x D(features of the source batch, features of the target batch)

    coral   Deep CORAL (Sun & Saenko 2016): ||C_s - C_t||_F^2 / (4 d^2), C the d x d covariance of a batch's
            features (unbiased, n - 1)
    mmd     the squared maximum mean discrepancy (biased V-statistic) under a sum of Gaussian kernels
            exp(-||a - b||^2 / (m * s)), m in MMD_MULTIPLIERS and s the median squared distance between the 2n
            features (the median heuristic; no gradient through s)

The features are the head's input (the pooled features of a CNN, a ViT's class token), caught by a forward hook
on the head, so every backbone source works without an adapter method. The target batch goes through the model
in the same forward call as the source batch: a forward pre-hook on the model appends it to the input and a
forward hook takes the target rows off the output, so the task, its loss and the logged train loss see the source
batch alone, a DDP wrapper sees one forward per step, and BatchNorm layers normalize over both batches together
(their running statistics then average over the two domains, as in Deep CORAL's and DAN's reference code).

The add-on is active in the epochs where any parameter outside the head trains: when the head trains alone (the
head-only phase of lp-ft, freeze-unfreeze and gradual, on cached features or not) the features do not depend on
a trained parameter and the loss could move nothing, so the target images are not read then.

The target images are read with the run's training transforms (same size, normalization and augmentation),
keyed like the training data (data.order): the target batches of epoch e are a pure function of (seed, process,
e), and a checkpoint records how many of them the epoch has used, so a resumed run continues the same stream.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .base import AddOn

log = logging.getLogger("finetunekit")

MMD_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)  # kernel bandwidths, as multiples of the median squared distance


def coral(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Deep CORAL: ||C_s - C_t||_F^2 / (4 d^2) of the unbiased covariances of two [n, d] feature batches."""
    source, target = source.float().flatten(1), target.float().flatten(1)
    d = source.shape[1]

    def cov(x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(0, keepdim=True)
        return x.T @ x / (x.shape[0] - 1)

    return (cov(source) - cov(target)).pow(2).sum() / (4 * d * d)


def mmd(source: torch.Tensor, target: torch.Tensor, multipliers=MMD_MULTIPLIERS) -> torch.Tensor:
    """Squared MMD (biased: the diagonals included, never negative) between two [n, d] feature batches under
    sum_m exp(-||a - b||^2 / (m s)), s the median of the squared distances between distinct rows of both."""
    source, target = source.float().flatten(1), target.float().flatten(1)
    x = torch.cat([source, target])
    sq = (x * x).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)  # squared distances, [2n, 2n]
    n = len(x)
    off = dist.detach()[~torch.eye(n, dtype=torch.bool, device=x.device)]
    scale = off.median().clamp_min(1e-12)
    kernel = sum(torch.exp(-dist / (m * scale)) for m in multipliers)
    ns = len(source)
    return kernel[:ns, :ns].mean() + kernel[ns:, ns:].mean() - 2 * kernel[:ns, ns:].mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"coral": coral, "mmd": mmd}


# --- the target images ----------------------------------------------------------------------------------------

def content_hash(folder: Path, paths: list[str]) -> str:
    """SHA-256 over each file's path relative to `folder` and its bytes' SHA-256 (remembered by the scan that
    read them: no second read)."""
    from ..filehash import sha256_file

    h = hashlib.sha256()
    for p in paths:
        h.update(f"{os.path.relpath(p, folder)}\t{sha256_file(p)}\n".encode())
    return h.hexdigest()


class TargetBatches(torch.utils.data.Sampler):
    """An endless stream of batches of (index, sample seed) keys over n target images: shuffled passes one after
    another, each a pure function of (seed, epoch, pass); `start(epoch, batch)` begins the stream of `epoch` at its
    batch `batch` without generating what it skips."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.first = 0, 0

    def start(self, epoch: int, batch: int) -> None:
        self.epoch, self.first = epoch, batch

    def _pass(self, p: int) -> list[int]:
        order = list(range(self.n))
        random.Random(f"{self.seed}/{self.epoch}/{p}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        from ..data.order import sample_seed

        position = self.first * self.batch_size  # of the first sample, in the epoch's stream
        p, at = divmod(position, self.n)
        order = self._pass(p)
        while True:
            batch = []
            while len(batch) < self.batch_size:
                if at == self.n:
                    p, at = p + 1, 0
                    order = self._pass(p)
                batch.append((order[at], sample_seed(self.seed, self.epoch, p * self.n + at)))
                at += 1
            yield batch


def target_loader(paths: list[str], transform, batch_size: int, *, seed: int, workers: int):
    """A loader of target images (their label: 0, never read) over TargetBatches."""
    from ..data import ImageDataset, Split, die_with_parent

    dataset = ImageDataset(Split(paths, [0] * len(paths)), transform)
    sampler = TargetBatches(len(paths), batch_size, seed)
    # its own generator seeds the workers: starting the stream draws nothing from training's random numbers
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed),
                                       worker_init_fn=die_with_parent if workers else None), sampler


# --- the add-on -------------------------------------------------------------------------------------------------

class DomainAdapt(AddOn):
    name = "domain-adapt"

    def __init__(self, method: str, weight: float, backbone, loader, sampler, *, folder: Path, images: int,
                 digest: str | None):
        self.method, self.weight, self.loss_fn = method, weight, LOSSES[method]
        self.backbone, self.loader, self.sampler = backbone, loader, sampler
        self.folder, self.images, self.digest = folder, images, digest
        self._stream: Iterator | None = None
        self._epoch: int | None = None  # the epoch whose target stream `_stream` is
        self._batches = 0  # target batches this epoch has used (checkpointed: a resume continues the stream)
        self._active: bool | None = None
        self._checked = False  # whether this epoch's first batch has decided `_active`
        self._pending: torch.Tensor | None = None  # the target batch the next forward appends
        self._split: int | None = None  # rows of the current forward that are the source's
        self._features: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sum: torch.Tensor | None = None
        self._count = 0
        self.by_epoch: list[float] = []
        self._hooks: list = []

    # hooks on the model: the target batch rides along with the source batch
    def wrap_model(self, module: torch.nn.Module) -> torch.nn.Module:
        head = module.get_submodule(self.backbone.heads[0])
        self._hooks = [module.register_forward_pre_hook(self._append),
                       head.register_forward_hook(self._catch),
                       module.register_forward_hook(self._take_off)]
        return module

    def _append(self, module, args):
        if self._pending is None:
            return None
        x, self._pending = args[0], self._pending.to(device=args[0].device, dtype=args[0].dtype)
        self._split = len(x)
        joined = torch.cat([x, self._pending])
        self._pending = None
        return (joined, *args[1:])

    def _catch(self, module, args, output):
        if self._split is not None:
            f = args[0]
            self._features = (f[:self._split], f[self._split:])

    def _take_off(self, module, args, output):
        n, self._split = self._split, None
        if n is None:
            return None
        if isinstance(output, torch.Tensor):
            return output[:n]
        output["logits"] = output["logits"][:n]  # a transformers ModelOutput
        return output

    def _is_active(self) -> bool:
        b = self.backbone
        return any(p.requires_grad for n, p in b.module.named_parameters() if not b.is_head(n))

    def train_batch(self, batch, epoch: int):
        if epoch != self._epoch:
            if self._count:  # resumed after the end-of-epoch checkpoint: that epoch's after_epoch did not run here
                self.by_epoch.append(float(self._sum) / self._count)
            self._epoch, self._batches, self._stream, self._sum, self._count = epoch, 0, None, None, 0
            self._checked = False
        if not self._checked:  # the epoch's first batch: the phase (what trains) is set for the epoch
            active = self._is_active()
            if active != self._active:
                log.info("domain adaptation: %s from epoch %d", f"{self.method} on" if active else
                         "off while the head alone trains (the features it aligns do not change)", epoch + 1)
            self._active, self._checked = active, True
        if not self._active:
            return batch
        if self._stream is None:
            self.sampler.start(epoch, self._batches)
            self._stream = iter(self.loader)
        x = next(self._stream)[0]
        self._batches += 1
        n = len(batch[0])
        self._pending = x[:n] if len(x) >= n else torch.cat([x] * -(-n // len(x)))[:n]
        return batch

    def extra_loss(self, batch, outputs) -> torch.Tensor | None:
        if self._features is None:
            return None
        source, target = self._features
        self._features = None
        loss = self.loss_fn(source, target)
        value = loss.detach()
        self._sum = value if self._sum is None else self._sum + value
        self._count += 1
        return self.weight * loss

    def after_epoch(self, epoch: int, val: dict[str, Any]) -> bool:
        if self._count:
            mean = _mean_over_processes(float(self._sum), self._count)
            self.by_epoch.append(mean)
            log.info("domain adaptation: epoch %d, mean %s loss %.4g (x %g in the loss)", epoch, self.method, mean,
                     self.weight)
        self._sum, self._count = None, 0
        return False

    def fingerprint(self) -> dict[str, Any]:
        return {"target_data": self.digest}  # the target images' content: resume's drift guard compares it

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Where the epoch's target stream is, the epoch's loss so far, and the earlier epochs' means."""
        return {"domain_adapt.safetensors": {
            "position": torch.tensor([self._epoch if self._epoch is not None else -1, self._batches, self._count]),
            "loss_sum": torch.tensor([0.0 if self._sum is None else float(self._sum)], dtype=torch.float64),
            "by_epoch": torch.tensor(self.by_epoch, dtype=torch.float64)}}

    def load_state_dict(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """A resumed run: its first batch continues the saved epoch's target stream (or, saved at an epoch's end,
        the next epoch's stream starts afresh, as it would have)."""
        saved = tensors.get("domain_adapt.safetensors")
        if saved is None:
            return
        epoch, self._batches, self._count = (int(v) for v in saved["position"])
        self._epoch = epoch if epoch >= 0 else None
        self._sum = torch.tensor(float(saved["loss_sum"][0])) if self._count else None
        self.by_epoch = [float(v) for v in saved["by_epoch"]]

    def finish(self, best, folder, score) -> dict[str, Any]:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return {"domain_adapt": {"method": self.method, "weight": self.weight, "target_data": str(self.folder),
                                 "target_images": self.images, "target_hash": self.digest,
                                 "loss_by_epoch": [round(v, 6) for v in self.by_epoch]}}


def _mean_over_processes(total: float, count: int) -> float:
    """The epoch's mean alignment loss over every process's batches (each process aligns its own target stream);
    one process: total / count. Every process calls it after each epoch (a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return total / count
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    both = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(both)
    return float(both[0] / both[1])
