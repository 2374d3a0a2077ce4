"""Local SGD (`fin.local_sgd`): two replicas merged over a real gloo group of their own, each a lone TorchRec
worker to its sharded model."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from fin.local_sgd import Peers, Replicas
from fin.models import MODELS, ModelConfig
from fin.sharding import shard
from tests.conftest import free_port

TABLE, DENSE = "sparse.sequence.embeddings.item.weight", "event.weight"


def _replica(rank: int, world: int, port: int, out: str) -> None:
    """Rank r changes rows r and 5 of a table, its Adagrad accumulator at row r, and a dense weight by r + 1;
    it records what it holds after one step (no merge yet) and after the second (the merge)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.manual_seed(0)
    model = shard(MODELS["fin"](ModelConfig(dim=16, heads=2, tower=(32,), sim_len=10)), torch.device("cpu"),
                  "table_wise", 0.1, 1)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                  lambda params: torch.optim.Adam(params, lr=1e-3))
    optimizer = CombinedOptimizer([model.fused_optimizer, dense])
    replicas = Replicas(model, optimizer, Peers(rank, world), every=2)

    state = model.state_dict()
    table, weight = state[TABLE].local_shards()[0].tensor, state[DENSE]
    accumulator = next(v for v in optimizer.state_dict()["state"][TABLE].values()).local_shards()[0].tensor
    seen = {"table_start": table[:6].clone(), "dense_start": weight.clone(), "accumulator_start": accumulator[:6].clone()}
    with torch.no_grad():
        table[rank] += rank + 1
        table[5] += rank + 1
        accumulator[rank] += 10 * (rank + 1)
        weight.add_(rank + 1)
    replicas.stepped()
    seen["table_one_step"] = table[:6].clone()
    replicas.stepped()
    seen |= {"table": table[:6].clone(), "dense": weight.clone(), "accumulator": accumulator[:6].clone()}
    replicas.merge()  # nothing pending: no change
    seen["table_again"] = table[:6].clone()
    torch.save(seen, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_a_merge_averages_dense_weights_and_keeps_every_replica_s_table_updates(tmp_path):
    mp.spawn(_replica, args=(2, free_port(), str(tmp_path)), nprocs=2)
    seen = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in (0, 1)]
    start = seen[0]["table_start"]
    assert torch.equal(start, seen[1]["table_start"])  # the same seed: the same replica before training
    assert seen[1]["table_one_step"][0].equal(start[0])  # before the merge, rank 0's change is rank 0's alone
    for mine in seen:
        assert torch.allclose(mine["table"][0], start[0] + 1)  # one replica's row: its whole update, not halved
        assert torch.allclose(mine["table"][1], start[1] + 2)
        assert torch.allclose(mine["table"][5], start[5] + 3)  # both replicas' row: both updates
        assert mine["table"][2:5].equal(start[2:5])
        assert torch.allclose(mine["accumulator"][:2], seen[0]["accumulator_start"][:2] + torch.tensor([10., 20.]))
        assert torch.allclose(mine["dense"], seen[0]["dense_start"] + 1.5)  # dense: the replicas' mean
        assert mine["table_again"].equal(mine["table"])
    for key in ("table", "dense", "accumulator"):  # after the merge the replicas are one model
        assert seen[0][key].equal(seen[1][key])
