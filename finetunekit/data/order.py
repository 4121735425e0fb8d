"""The training data order: seeded per epoch, resumable at any batch, with a seed for every sample.

`EpochBatches` is the batch sampler of every training loader. Epoch e's batches are a pure function of
(seed, e), so a resumed run rebuilds the epoch and starts at the batch where the checkpoint was taken
(`skip`), loading nothing it skips. Each index travels with its own seed, derived from (seed, epoch, index);
the datasets draw a sample's augmentation from that seed (`sample_rng`), so augmentation depends on neither
the worker that loads the sample, nor the number of workers, nor where a run was resumed.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler, get_worker_info

Key = tuple[int, int]  # (sample index, sample seed)


_MASK = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for (seed, epoch, index): SplitMix64's finalizer over a mix of the three (a
    microsecond, where NumPy's SeedSequence took 15 per sample in the loader's main process)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + index * 0x8CB92BA72F3D8DD7 + 1) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return (z ^ (z >> 31)) >> 32


class EpochBatches(Sampler[list[Key]]):
    """Shuffled batches of (index, seed) keys. With `lengths`, indices of similar lengths share a batch
    (sorted within chunks of `mega` batches; the batch order stays random): less padding for text."""

    def __init__(self, n: int, batch_size: int, seed: int, *, drop_last: bool = False,
                 lengths: Sequence[int] | None = None, mega: int = 50):
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.lengths, self.mega = (list(lengths) if lengths is not None else None), mega
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, batches: int) -> None:
        """The next pass starts at this batch of the epoch (a resumed run)."""
        self._skip = batches

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(self.n))
        rng.shuffle(order)
        if self.lengths is None:
            out = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        else:
            size = self.mega * self.batch_size
            out = []
            for start in range(0, self.n, size):
                chunk = sorted(order[start:start + size], key=self.lengths.__getitem__)
                out += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
            rng.shuffle(out)
        if self.drop_last:
            out = [b for b in out if len(b) == self.batch_size]
        return out

    def __iter__(self) -> Iterator[list[Key]]:
        epoch, start = self.epoch, self._skip
        self._skip = 0
        self.epoch += 1  # without set_epoch, the next pass draws a new order, as a shuffling DataLoader would
        for batch in self.batches(epoch)[start:]:
            yield [(i, sample_seed(self.seed, epoch, i)) for i in batch]


def split_key(key: int | Key) -> tuple[int, int | None]:
    return (key[0], key[1]) if isinstance(key, tuple) else (key, None)


@contextlib.contextmanager
def sample_rng(seed: int | None):
    """Inside: Python's and torch's CPU generators seeded from `seed` (the ones the transforms of
    data.transforms draw from: timm's and torchvision's); afterwards, in the main process, their previous
    states are back, so training's own random stream is untouched (a loader worker's generators serve its
    samples alone: nothing to put back). NumPy's generator is left alone: no transform here draws from it,
    and saving its state costs more than a crop. `seed=None` (evaluation) changes nothing."""
    if seed is None:
        yield
        return
    cpu = torch.default_generator  # torch.manual_seed would also seed every accelerator: 100x slower
    restore = get_worker_info() is None
    if restore:
        py, state = random.getstate(), cpu.get_state()
    random.seed(seed)
    cpu.manual_seed(seed)
    try:
        yield
    finally:
        if restore:
            random.setstate(py)
            cpu.set_state(state)
