"""Local SGD on CPU workers: each worker trains a whole replica of the model and the replicas are merged every
few steps, instead of reducing every step.

Why. FIN's step on a CPU is thousands of small operations (benchmarks/README.md, "Threads"): two
trainings side by side, one per core, do about twice the work of one, but two workers of one sharded model
(TorchRec's all-to-all of the table lookups and DDP's gradient all-reduce every step, over gloo) do about
what one does (0.85-1.05x). A replica holds every table (FIN's are ~17 MB here), so its steps need no
collective; merging costs one all-reduce of the model and its optimizer state per `every` steps.

How. To TorchRec each replica is a lone worker (a process group of its own, so its plan, checkpoints and
state dicts are exactly one worker's); the replicas reach each other over a gloo group of their own
(`Peers`), which merges them and sums what the training loop counts.

What a merge does, so that after it every replica holds the same weights and optimizer state (checkpoints
and the artifact are then any replica's, rank 0's):
- dense weights and their Adam moments: the replicas' mean (local SGD; "Don't Use Large Mini-Batches, Use
  Local SGD", Lin et al., ICLR 2020);
- tables and their row-wise Adagrad accumulators: the last merge's value plus every replica's change since.
  A row that only one replica's batches touched keeps that replica's whole update (a mean would halve it);
  a row that several touched gets them all, as TorchRec sums the table gradients of synchronous workers.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor


def _states(model, optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(tensors merged by their mean, tensors merged by summed changes): views of the live weights and optimizer
    state, in an order every replica shares (state dict order)."""
    mean, summed = [], []
    for value in [*model.state_dict().values(),
                  *(v for state in optimizer.state_dict()["state"].values() for v in state.values())]:
        if isinstance(value, ShardedTensor):  # a table, or its Adagrad accumulator: all its shards are local
            summed.extend(piece.tensor for piece in value.local_shards())
        elif torch.is_tensor(value) and value.is_floating_point():
            mean.append(value)
    return mean, summed


class Peers:
    """The replicas' own gloo group: `rank` of `world` processes, meeting at MASTER_ADDR:MASTER_PORT (as
    `torch.distributed` does)."""

    def __init__(self, rank: int, world: int, timeout: datetime.timedelta = datetime.timedelta(minutes=30)):
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=rank == 0, timeout=timeout)
        self.world = world
        self.group = dist.ProcessGroupGloo(dist.PrefixStore("replicas", store), rank, world, timeout)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sums `tensor` over the replicas, in place."""
        self.group.allreduce([tensor]).wait()

    def barrier(self) -> None:
        self.group.barrier().wait()


class Replicas:
    """Merges the replicas of a lone worker's `model` and `optimizer` over `peers`, every `every` steps
    (`stepped`) and when asked (`merge`). Make it when every replica holds the same state (the same seed, or a
    restored checkpoint); every replica takes the same number of steps."""

    def __init__(self, model, optimizer, peers: Peers, every: int):
        self.model, self.optimizer, self.peers, self.every = model, optimizer, peers, every
        self.merged = [t.detach().clone() for t in _states(model, optimizer)[1]]  # the tables at the last merge
        self.pending = 0  # steps since the last merge

    def stepped(self) -> None:
        self.pending += 1
        if self.pending >= self.every:
            self.merge()

    def merge(self) -> None:
        if self.pending == 0:
            return
        mean, summed = _states(self.model, self.optimizer)
        with torch.no_grad():
            flat = torch.cat([t.reshape(-1) for t in mean]
                             + [(t - before).reshape(-1) for t, before in zip(summed, self.merged, strict=True)])
            self.peers.all_reduce(flat)
            at = 0
            for t in mean:
                t.copy_(flat[at:at + t.numel()].view_as(t) / self.peers.world)
                at += t.numel()
            for t, before in zip(summed, self.merged):
                before.add_(flat[at:at + t.numel()].view_as(t))
                t.copy_(before)
                at += t.numel()
        self.pending = 0
