"""Train configs one after another with the engine's Trainer and record, per config and process, what the
tests compare: the trained weights at the end of the run and which forward passes exchanged gradients.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_probe.py OUT_DIR CONFIG...
    python tests/ddp_probe.py OUT_DIR CONFIG...          (one process)

writes OUT_DIR/<config file stem>-rank<N>.pt:
    {"weights": {name: tensor}, "exchanges": [[forward, ...], ...], "forwards": [count, ...], "alive_at_end": n}
with, per DDP wrapper of the run, the count of its forward passes each time its gradients were all-reduced
(at the bucket that ends an exchange), and its forward passes in all; and how many of the run's DDP wrappers
still existed when the trainer ended its process group. The engine's own code runs unchanged: this script wraps
torch's DistributedDataParallel, keeps the process group open between the configs and looks at the trainer's
step context when its loop ends.
"""
import os
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import config as cfg  # noqa: E402
from engine import distributed, events  # noqa: E402
from engine import train as engine_train  # noqa: E402
from engine.setup import trained_parts  # noqa: E402

WRAPPERS = []  # the DDP wrappers of the config being trained, until its loop ends
EVER = []  # weak references to them, which outlive the loop


class Counts:
    """A wrapper's forward passes, and their count at each exchange. Kept apart from the wrapper: a hook that
    reached the wrapper would hold it from inside the reducer, where the collector cannot see, for good."""

    def __init__(self):
        self.forwards, self.exchanges = 0, []


def _exchange(counts: Counts, bucket):
    if bucket.is_last():
        counts.exchanges.append(counts.forwards)
    return allreduce_hook(dist.group.WORLD, bucket)


class CountingDDP(DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counts = Counts()
        self.register_comm_hook(self.counts, _exchange)
        WRAPPERS.append(self)
        EVER.append(weakref.ref(self))

    def forward(self, *args, **kwargs):
        self.counts.forwards += 1
        return super().forward(*args, **kwargs)


def main(out_dir: Path, config_files: list) -> int:
    torch.nn.parallel.DistributedDataParallel = CountingDDP  # what engine.distributed.wrap builds
    closed = distributed.shutdown
    loop = engine_train.Trainer._train_loop
    rank = int(os.environ.get("RANK", 0))
    record_as = {}  # the file the running config's record goes to, and the record

    def loop_then_record(trainer, context):
        result = loop(trainer, context)
        weights = {f"{part}.{name}": param.detach().clone()
                   for part, model in trained_parts(context.components, context.plan).items()
                   for name, param in model.named_parameters() if param.requires_grad}
        record_as["record"] = {"weights": weights, "exchanges": [wrapper.counts.exchanges for wrapper in WRAPPERS],
                               "forwards": [wrapper.counts.forwards for wrapper in WRAPPERS]}
        WRAPPERS.clear()
        return result

    def record_at_end(topology):
        """Where the trainer ends its process group: recorded instead, as the next config joins the same group."""
        record_as["record"]["alive_at_end"] = sum(wrapper() is not None for wrapper in EVER)
        torch.save(record_as["record"], record_as["path"])

    engine_train.Trainer._train_loop = loop_then_record
    distributed.shutdown = record_at_end
    for config_file in config_files:
        EVER.clear()
        record_as["path"] = out_dir / f"{Path(config_file).stem}-rank{rank}.pt"
        result = engine_train.Trainer(cfg.load(config_file)).run()
        if not isinstance(result, events.Finished):
            print(f"{config_file}: {result.error}", file=sys.stderr)
            return 1
    closed(distributed.Topology(rank, world_size=distributed.world_size_from_environment()))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
