"""The sparse side on TorchRec (CPU): shared tables, hashing, one lookup per history event."""

import numpy as np
import torch

from fin.embeddings import SHARED, SINGLE, DistinctEvents, EmbeddingSizes, SparseArch, hash_ids
from fin.inputs import LoaderConfig
from fin.loader import ExampleStream


def test_hashing_keeps_row_zero_for_unknown_ids_and_never_overflows():
    ids = torch.tensor([-1, 0, 5, 9, 10**15, 2**62])
    rows = hash_ids(ids, 10)
    assert rows[0] == 0 and bool(((rows >= 1) & (rows < 10))[1:].all())
    assert hash_ids(torch.tensor([3]), 10) == hash_ids(torch.tensor([12]), 10)  # 3 and 12 collide mod 9


def test_target_and_history_share_tables(features_job):
    out, _ = features_job
    sizes = EmbeddingSizes(dim=8)
    arch = SparseArch(sizes)
    batch = next(iter(ExampleStream(out / "data", "test", LoaderConfig(batch_size=32, max_seq_len=50))))
    result = arch(batch)
    n_events = int(batch.histories.offsets[-1])
    assert result.target.shape == (len(batch), len(SHARED), 8)
    distinct = result.distinct.first.numel()
    assert distinct < n_events and result.history.shape == (distinct, len(SHARED), 8)  # looked up once each
    assert result.history[result.distinct.row_of].shape == (n_events, len(SHARED), 8)
    assert result.single.shape == (len(batch), 8 * len(SINGLE))
    # the candidate's shop and the same shop in a history share one embedding row
    shop = list(SHARED).index("shop")
    shop_ids = batch.ids["shop_id"]
    hist = batch.history["shop_id"]
    i = next(i for i in range(len(batch)) if (hist == shop_ids[i]).any())
    j = int(torch.nonzero(hist == shop_ids[i])[0])
    assert torch.equal(result.target[i, shop], result.history[result.distinct.row_of][j, shop])
    result.target[:, shop].sum().backward()
    assert arch.sequence.embeddings["shop"].weight.grad is not None


def test_eval_mode_reads_the_same_rows_without_keyed_jagged_tensors(features_job, monkeypatch):
    out, _ = features_job
    arch = SparseArch(EmbeddingSizes(dim=8, rows={**EmbeddingSizes().rows, "item": 50, "shop": 20}))  # collisions
    batch = next(iter(ExampleStream(out / "data", "test", LoaderConfig(batch_size=64, max_seq_len=50))))
    batch.ids["brand_id"][:3] = torch.tensor([-1, 0, 2**62])  # unknown, zero and huge ids
    through_torchrec = arch(batch)
    monkeypatch.setattr(arch, "inputs", None)  # eval mode must not build KeyedJaggedTensors
    direct = arch.eval()(batch)
    assert int(batch.histories.offsets[-1]) > 0
    assert torch.equal(direct.history, through_torchrec.history[through_torchrec.distinct.row_of])
    for side in ("target", "single"):
        assert torch.equal(getattr(direct, side), getattr(through_torchrec, side)), side


def test_distinct_events_are_the_distinct_key_tuples_even_past_64_bits():
    """Key columns whose sizes multiply past 2^62 (so the packed key is renumbered on the way): every event's
    row holds exactly its own key, and there are as many rows as distinct tuples."""
    rng = np.random.default_rng(0)
    sizes = [2**40, 2**30, 5, 2**20]
    tuples = np.stack([rng.integers(0, n, 40) for n in sizes], axis=1)
    events = tuples[rng.integers(0, 40, 1000)]
    columns = [(torch.from_numpy(events[:, k]), n) for k, n in enumerate(sizes)]
    distinct = DistinctEvents.of(columns)
    assert distinct.first.numel() == len(np.unique(events, axis=0))
    for values, _ in columns:
        assert torch.equal(values[distinct.first][distinct.row_of], values)
    assert DistinctEvents.of([(torch.zeros(0, dtype=torch.int64), 10)]).first.numel() == 0
