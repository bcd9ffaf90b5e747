"""Train configs one after another with the engine's Trainer and record, per config and process, what the
tests compare: the trained weights at the end of the run and which forward passes exchanged gradients.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_probe.py OUT_DIR CONFIG...
    python tests/ddp_probe.py OUT_DIR CONFIG...          (one process)

writes OUT_DIR/<config file stem>-rank<N>.pt:
    {"weights": {name: tensor}, "exchanges": [[forward, ...], ...], "forwards": [count, ...]}
with, per DDP wrapper of the run, the count of its forward passes each time its gradients were all-reduced
(at the bucket that ends an exchange), and its forward passes in all. The engine's own code runs unchanged:
this script wraps torch's DistributedDataParallel, keeps the process group open between the configs and looks
at the trainer's step context when its loop ends.
"""
import os
import sys
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

WRAPPERS = []  # the DDP wrappers of the config being trained


class CountingDDP(DistributedDataParallel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.forwards, self.exchanges = 0, []
        self.register_comm_hook(dist.group.WORLD, self._exchange)
        WRAPPERS.append(self)

    def forward(self, *args, **kwargs):
        self.forwards += 1
        return super().forward(*args, **kwargs)

    def _exchange(self, group, bucket):
        if bucket.is_last():
            self.exchanges.append(self.forwards)
        return allreduce_hook(group, bucket)


def main(out_dir: Path, config_files: list) -> int:
    torch.nn.parallel.DistributedDataParallel = CountingDDP  # what engine.distributed.wrap builds
    closed = distributed.shutdown
    distributed.shutdown = lambda topology: None  # the next config joins the same process group
    loop = engine_train.Trainer._train_loop
    rank = int(os.environ.get("RANK", 0))
    record_as = {}  # the file the running config's record goes to

    def loop_then_record(trainer, context):
        result = loop(trainer, context)
        weights = {f"{part}.{name}": param.detach().clone()
                   for part, model in trained_parts(context.components, context.plan).items()
                   for name, param in model.named_parameters() if param.requires_grad}
        torch.save({"weights": weights, "exchanges": [wrapper.exchanges for wrapper in WRAPPERS],
                    "forwards": [wrapper.forwards for wrapper in WRAPPERS]}, record_as["path"])
        return result

    engine_train.Trainer._train_loop = loop_then_record
    for config_file in config_files:
        WRAPPERS.clear()
        record_as["path"] = out_dir / f"{Path(config_file).stem}-rank{rank}.pt"
        result = engine_train.Trainer(cfg.load(config_file)).run()
        if not isinstance(result, events.Finished):
            print(f"{config_file}: {result.error}", file=sys.stderr)
            return 1
    closed(distributed.Topology(rank, world_size=distributed.world_size_from_environment()))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
