"""TorchRec model parallelism for every model: plan the tables, shard, and gather back a plain state dict.

The sparse side (`fin.embeddings.SparseArch`) is planned by TorchRec's EmbeddingShardingPlanner over the
process group and wrapped in DistributedModelParallel; the dense side (attentions, tower) is replicated
with data parallelism. Tables are trained by TorchRec's fused row-wise Adagrad (applied in backward),
dense weights by Adam.

Sharding choices (`--sharding`):
    auto        the planner's choice among what the sharders allow on the device
    table_wise  every table whole on one worker (the default plan on CPU)
    row_wise    every table split by rows over all workers. The stock EmbeddingBagCollection sharder offers
                row-wise on CUDA only; `RowWiseEmbeddingBagCollectionSharder` also offers it on CPU, where
                its kernels run correctly over gloo (docs/design.md, "Training").
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.types import HardwareConfig, KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingType
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from fin.embeddings import SHARED, SINGLE
from fin.models import CTRModel

SHARDINGS = ("auto", "table_wise", "row_wise")


class RowWiseEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """Offers row-wise sharding on every device, not only CUDA."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        return types + [t.value for t in (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE) if t.value not in types]


def _constraints(sharding: str) -> dict[str, ParameterConstraints] | None:
    if sharding not in SHARDINGS:
        raise ValueError(f"unknown sharding {sharding!r}; choose one of {', '.join(SHARDINGS)}")
    if sharding == "auto":
        return None
    return {table: ParameterConstraints(sharding_types=[sharding]) for table in (*SHARED, *SINGLE)}


def shard(model: CTRModel, device: torch.device, sharding: str = "auto", sparse_lr: float = 0.05,
          local_world_size: int | None = None) -> DistributedModelParallel:
    """Plan `model`'s tables over the default process group and wrap it in DistributedModelParallel.

    Call on every worker with the same (seeded) model; its weights become the sharded model's weights.
    """
    world = dist.get_world_size()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    apply_optimizer_in_backward(RowWiseAdagrad, model.sparse.parameters(), {"lr": sparse_lr})
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world, local_world_size=local_world_size or world), HardwareConfig(),
        KernelConfig(compute_device=device.type))
    sharders = [EmbeddingCollectionSharder(), RowWiseEmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(topology=topology, constraints=_constraints(sharding), debug=False)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    sharded = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    sharded.load_state_dict(initial)  # sharding re-initialises tables: every plan starts from the same weights
    return sharded


def plan_summary(model: DistributedModelParallel) -> dict[str, str]:
    """table -> sharding type, as planned."""
    return {f"{module}.{table}" if module else table: option.sharding_type
            for module, params in model.plan.plan.items() for table, option in params.items()}


def full_state_dict(model: DistributedModelParallel) -> dict[str, torch.Tensor] | None:
    """Every weight gathered whole onto rank 0, as a plain state dict (None on other ranks).

    A collective when there are several workers: every worker must call it. Keys are those of the
    unsharded model.
    """
    if dist.get_world_size() == 1:  # every shard is local: no gloo collective (fin/train.py, "One worker")
        return {key: (_assembled(value) if isinstance(value, ShardedTensor)
                      else value.detach().cpu().clone(memory_format=torch.contiguous_format))
                for key, value in model.state_dict().items()}
    rank = dist.get_rank()
    # the gather's buffers live where the collective runs: NCCL gathers GPU tensors only
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype, device=on) if rank == 0 else None
            value.gather(dst=0, out=full)
        else:
            full = value.detach()
        if rank == 0:
            out[key] = full.to("cpu", copy=True).contiguous()
    return out if rank == 0 else None


def _assembled(value: ShardedTensor) -> torch.Tensor:
    """A sharded tensor whose shards are all local, whole on the CPU."""
    full = torch.empty(value.size(), dtype=value.dtype)
    for piece in value.local_shards():
        offsets, sizes = piece.metadata.shard_offsets, piece.metadata.shard_sizes
        full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))] = piece.tensor
    return full
