"""The batch sampler: one bucket size per batch, seeded shuffles, resumable, sharded over ranks.

An epoch is built as follows. Each bucket's images are shuffled and cut into global batches of
batch_size x world_size images. A bucket's last, partial global batch is kept as a smaller batch:
with one process it is simply shorter; with several processes it is split evenly over the ranks and the
remainder (fewer than world_size images) sits this epoch out, so that no two ranks share an image. The
next epoch's shuffle leaves out others, but a bucket with fewer images than world_size never reaches
a batch (prepare_data warns about it). The list of batches is then
shuffled as a whole, which draws buckets in proportion to the batches they have left. Everything depends
only on (seed, epoch), so every rank computes the same order and a resumed run the same sequence.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


class BucketBatchSampler:
    def __init__(self, item_buckets: Sequence[int], batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.item_buckets = np.asarray(item_buckets, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0  # batches of the current epoch already trained: the checkpoint's TrainState.position

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches for an epoch, in order."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, 0x5A3])
        global_size = self.batch_size * self.world_size
        batches: list[list[int]] = []
        for bucket in np.unique(self.item_buckets):
            items = np.flatnonzero(self.item_buckets == bucket)
            items = rng.permutation(items)
            for begin in range(0, len(items), global_size):
                chunk = items[begin:begin + global_size]
                per_rank = len(chunk) // self.world_size
                if per_rank == 0:
                    continue
                mine = chunk[self.rank * per_rank:(self.rank + 1) * per_rank]
                batches.append([int(i) for i in mine])
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        start, self.start = self.start, 0
        yield from batches[start:]

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch))
