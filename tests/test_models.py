"""FIN and the baselines end to end on CPU: loader -> TorchRec tables -> fragments -> attentions -> tower."""

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from features.fragments import MISSING, Fragment, FragmentConfig, Slots
from features.sequences import TIMELINE_FIELDS, geohash_code
from features.simulator import load_sim_config, simulate
from fin.embeddings import SHARED, EmbeddingSizes, SparseArch, hash_ids
from fin.inputs import (
    CANDIDATE_NUMBERS,
    CONTEXT_FEATURES,
    TARGET_FEATURES,
    Histories,
    ItemImages,
    LoaderConfig,
    ScoringRequest,
    requests_batch,
)
from fin.layers import MultiHeadTargetAttention, SimplifiedTargetAttention
from fin.loader import ExampleStream
from fin.metrics import auc
from fin.models import MODELS, ModelConfig
from fin.models.counts import MATCHED, Entries, matched_counts, sorted_counts
from fin.models.fin import MATCHED_TAG, fragment_counts
from fin.models.layout import Padded, SliceWindows, length_groups
from jobs.features_job import FeaturesConfig, run_features

LOADER = LoaderConfig(batch_size=256, max_seq_len=50,
                      fragments=FragmentConfig(full_len=50, location_len=20, meal_len=20, recent_len=10, integrated_len=20))
CONFIG = ModelConfig(dim=16, sim_len=10, embeddings=EmbeddingSizes(dim=8))


def _model(name):
    torch.manual_seed(0)
    return MODELS[name](CONFIG)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_and_backward(features_job, name):
    out, _ = features_job
    model = _model(name)
    batch = next(iter(ExampleStream(out / "data", "train", LOADER)))
    logits = model(batch)
    assert logits.shape == (len(batch),) and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label).backward()
    assert model.sparse.sequence.embeddings["shop"].weight.grad.abs().sum() > 0
    attentions = [m for m in model.modules() if isinstance(m, (SimplifiedTargetAttention, MultiHeadTargetAttention))]
    assert len(attentions) == {"fin": 5, "din": 1, "sim": 1, "dnn": 0}[name]
    assert all(m.key.weight.grad.abs().sum() > 0 for m in attentions)  # every sequence path is used
    assert model.position.weight.grad.abs().sum() > 0  # training batches carry the slot


def test_the_position_term_is_trained_on_and_left_out_of_scores(features_job):
    out, _ = features_job
    train = next(iter(ExampleStream(out / "data", "train", LOADER)))
    assert train.position is not None and bool((train.position >= 0).all())
    assert next(iter(ExampleStream(out / "data", "validation", LOADER))).position is None  # scored as served
    # the train split scored (`fin evaluate --split train`) is scored as served too (before, with its slots)
    scored = next(iter(ExampleStream(out / "data", "train", LOADER, training=False)))
    assert scored.position is None and scored.new_ad is None
    model = _model("dnn").eval()
    with torch.no_grad():
        model.position.weight.normal_()
        moved = model(train) - model(dataclasses.replace(train, position=None))
    torch.testing.assert_close(moved, model.position.weight[hash_ids(train.position, CONFIG.positions), 0].detach())


def test_new_ads_are_read_without_their_ids_and_with_their_statistics(features_job):
    """In training a new ad's candidate reads zero item and shop rows, as an ad first shown after training does,
    and keeps its statistics; the other candidates (no id dropout here) read theirs, and scoring hides none."""
    out, _ = features_job
    batch = next(iter(ExampleStream(out / "data", "train", LOADER)))
    model = MODELS["dnn"](dataclasses.replace(CONFIG, id_dropout=0.0)).train()
    new_ad = torch.arange(len(batch)) % 3 == 0
    sparse = model.sparse(batch)
    found = model.encode(dataclasses.replace(batch, new_ad=new_ad), sparse)
    hidden = sparse.target.clone()
    hidden[new_ad.nonzero(), [list(SHARED).index("item"), list(SHARED).index("shop")]] = 0.0
    torch.testing.assert_close(found.target, model.target(hidden.flatten(1)))
    torch.testing.assert_close(found.stats, model.encode(dataclasses.replace(batch, new_ad=None), sparse).stats)
    assert not torch.allclose(found.target, model.encode(dataclasses.replace(batch, new_ad=None), sparse).target)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(dataclasses.replace(batch, new_ad=new_ad)), model(batch))


def test_sim_attends_over_the_latest_events_of_the_candidate_s_category(features_job):
    out, _ = features_job
    model = _model("sim").eval()
    batch = next(iter(ExampleStream(out / "data", "train", LOADER)))
    index, gaps, mask, rows = model.attended(batch)
    full, request, category = batch.fragments["full"], batch.candidate_requests(), batch.history["category_1_id"]
    found = 0
    for b in range(len(batch)):
        u = int(request[b])
        events = full.index[full.offsets[u]:full.offsets[u + 1]]
        expected = events[category[events] == batch.ids["category_1_id"][b]][-CONFIG.sim_len:]
        assert torch.equal(index[b][mask[b]], expected)
        assert torch.equal(gaps[b][mask[b]], batch.ts[u] - batch.history["ts"][expected])
        found += expected.numel()
    assert found > 0 and int(mask.sum(1).max()) <= CONFIG.sim_len and torch.equal(rows, torch.arange(len(batch)))


def test_each_model_counts_the_candidate_s_shop_and_category_in_the_events_it_reads(features_job):
    """FIN per fragment (of the integrated sequence, the events both at the place and at the meal time), SIM in
    the events its search keeps: log1p of the events with the candidate's shop, with its category. FIN's counts
    by comparing and by sorting (flat fragments, fixed-width slots as a scored request's, windows of the
    shared slices) give the same."""
    out, _ = features_job
    batch = next(iter(ExampleStream(out / "data", "train", LOADER)))
    user_of, history = batch.candidate_requests(), batch.history

    def expected(events: torch.Tensor, b: int) -> list[float]:
        return [float(np.log1p(int((history[key][events] == batch.ids[key][b]).sum()))) for key in MATCHED]

    some = 0
    for name, frag in batch.fragments.items():
        tag = MATCHED_TAG.get(name)
        counts = fragment_counts(batch, frag, user_of, tag)
        padded = Padded.of(frag)
        assert torch.equal(sorted_counts(batch, Entries.of(frag, tag), user_of), counts)
        assert torch.equal(sorted_counts(batch, Entries.of(Slots(padded.index, padded.mask, padded.tags), tag), user_of),
                           counts)
        if name == "full":
            windows = SliceWindows.of(frag, batch.histories, user_of)
            assert windows is not None  # the loader's user chunks share slices
            assert torch.equal(fragment_counts(batch, frag, user_of, windows=windows), counts)
        for b in range(len(batch)):
            u = int(user_of[b])
            events = frag.index[frag.offsets[u]:frag.offsets[u + 1]]
            if name in MATCHED_TAG:
                events = events[frag.tags[frag.offsets[u]:frag.offsets[u + 1]] == MATCHED_TAG[name]]
            assert counts[b].tolist() == pytest.approx(expected(events, b))
        some += int((counts[:, 0] > 0).sum())
    assert some > 0  # past orders from the candidate's shop are there to count
    sim = _model("sim")
    index, _, mask, rows = sim.attended(batch)
    counts = matched_counts(batch, index, mask, rows)
    for b in range(len(batch)):
        assert counts[b].tolist() == pytest.approx(expected(index[rows[b]][mask[rows[b]]], b))
    assert torch.equal(counts[:, 1], torch.log1p(mask.sum(1).float()))  # SIM keeps the candidate's category only
    # without them (and the log-masses), the tower reads the vectors alone
    torch.manual_seed(0)
    plain = MODELS["fin"](dataclasses.replace(CONFIG, intensity=False))
    assert plain.tower[0].in_features == _model("fin").tower[0].in_features - MODELS["fin"].intensities(CONFIG)
    assert torch.isfinite(plain(batch)).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_request_batch_scores_like_the_training_batches(features_job, name):
    """The server's case: one request, its candidates sharing one history (U = 1). Each candidate's logit
    equals the one it gets as a training example with its own copy of the history; and the same requests
    batched together (as the server batches requests that wait together) score the same again."""
    out, _ = features_job
    model = _model(name).eval()
    loader = dataclasses.replace(LOADER, shuffle=False)
    with torch.no_grad():
        offline = {}
        for batch in ExampleStream(out / "data", "test", loader):
            for i, logit, stats in zip(batch.row_id.tolist(), model(batch), batch.stats):
                offline[i] = (logit, stats)
        examples = pl.read_parquet(out / "data" / "examples" / "test" / "*.parquet").with_columns(
            geohash_code(pl.col("geohash_6")).fill_null(MISSING).alias("geohash6"), pl.col("aoi_id").fill_null(MISSING))
        timelines = pl.read_parquet(out / "data" / "timelines" / "*.parquet")
        requests = examples["request_id"].unique(maintain_order=True)
        scoring, expected = [], []
        for request in requests[:: max(1, len(requests) // 6)]:
            rows = examples.filter(pl.col("request_id") == request)
            user = timelines.filter(pl.col("user_id") == rows["user_id"][0])
            timeline = {f: np.asarray(user[f][0].to_list() if user.height else [], np.int64) for f in TIMELINE_FIELDS}
            context = {c: int(rows[c][0]) for c in ("ts", *CONTEXT_FEATURES)}
            ids = rows["impression_id"].to_list()
            candidates = {c: rows[c].to_numpy() for c in (*TARGET_FEATURES, *CANDIDATE_NUMBERS)}
            scoring.append(ScoringRequest(timeline, context, candidates,
                                          torch.stack([offline[i][1] for i in ids]).numpy()))
            batch = requests_batch(scoring[-1:], loader)
            assert batch.histories.offsets.tolist() == [0, batch.histories.offsets[-1]] and len(batch) == rows.height
            expected.append(torch.stack([offline[i][0] for i in ids]))
            torch.testing.assert_close(model(batch), expected[-1], rtol=1e-5, atol=1e-5)
        together = requests_batch(scoring, loader)
        assert len(together.ts) == len(scoring) > 1
        torch.testing.assert_close(model(together), torch.cat(expected), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def month(tmp_path_factory):
    """A month of 300 users: enough clicks to learn from and to measure AUC on."""
    root = tmp_path_factory.mktemp("month")
    simulate(load_sim_config(days=30, **{"users.users": 300}), root / "logs")
    run_features(root / "logs", root / "features", FeaturesConfig(max_seq_len=50, partitions=2, num_cpus=2,
                                                                  validation_days=3, test_days=4, materialize=False))
    return root / "features"


@pytest.mark.integration  # trains FIN for a simulated month
def test_fin_learns_the_simulated_clicks(month):
    model = _model("fin")
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):  # epochs
        for batch in ExampleStream(month / "data", "train", LOADER):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.label)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        scored = [(torch.sigmoid(model(b)), b.label)
                  for b in ExampleStream(month / "data", "test", LoaderConfig(**{**LOADER.__dict__, "shuffle": False}))]
    preds, labels = (torch.cat(x).numpy() for x in zip(*scored))
    assert auc(labels, preds) > 0.65


@pytest.mark.parametrize("name", ["fin", "sim", "din", "dnn"])
def test_a_shared_timeline_batch_scores_each_example_as_the_per_example_path(features_job, name):
    """The same examples, once in a batch of user chunks (requests grouped, histories windows of shared
    slices) and once each with its own history copy: the same logits."""
    out, _ = features_job
    model = _model(name).eval()
    shared = next(iter(ExampleStream(out / "data", "train", LOADER)))
    assert shared.histories.offsets[-1] < (shared.histories.end - shared.histories.start).sum()
    own = ExampleStream(out / "data", "train", dataclasses.replace(LOADER, shared_timelines=False))
    wanted, found = set(shared.row_id.tolist()), {}
    with torch.no_grad():
        expected = model(shared)
        for batch in own:
            logits = model(batch)
            found |= {i: logits[k] for k, i in enumerate(batch.row_id.tolist()) if i in wanted}
    torch.testing.assert_close(expected, torch.stack([found[i] for i in shared.row_id.tolist()]),
                               rtol=1e-5, atol=1e-5)


def test_length_groups_partition_the_requests_and_pad_less():
    lengths = torch.tensor([3, 1000, 5, 980, 400, 7, 390, 2, 1000, 410])
    for groups in (2, 3):
        split = length_groups(lengths, groups)
        assert len(split) == groups
        assert sorted(torch.cat(split).tolist()) == list(range(lengths.numel()))
        assert sum(int(lengths[g].max()) * g.numel() for g in split) < int(lengths.max()) * lengths.numel()
    assert len(length_groups(torch.full((8,), 50), 3)) == 1  # equal lengths: nothing to gain


def test_fin_over_shared_slices_in_length_groups_gives_the_scores_and_gradients_of_one_padded_group(
        features_job, monkeypatch):
    """A training batch (many requests, a few candidates each, fragment lengths from 0 to the cap): FIN's
    full fragment attended over segments of the shared timeline slices, every fragment in groups of similar
    length (the segments also of similar candidate counts); against every request's fragments gathered and
    padded as one group: the same logits and every gradient the same."""
    out, _ = features_job
    batch = next(iter(ExampleStream(out / "data", "train", LOADER)))
    user_of = batch.candidate_requests()
    windows = SliceWindows.of(batch.fragments["full"], batch.histories, user_of)
    assert windows is not None and len(length_groups(batch.fragments["full"].lengths, 3)) > 1
    assert windows.rows.lengths.numel() < batch.histories.start.numel()  # fewer rows than requests
    assert torch.bincount(windows.row_of).unique().numel() > 1  # segments read by more and fewer candidates
    results = []
    for shared in (False, True):
        if not shared:
            monkeypatch.setattr(SliceWindows, "of", classmethod(lambda cls, *args: None))
        else:
            monkeypatch.undo()
        model = _model("fin").train()
        model.length_groups, model.count_groups = (3, 2) if shared else (1, 1)
        results.append(_logits_and_gradients(model, batch))
    _assert_same_training(*results)


def _logits_and_gradients(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A training forward (with the auxiliary loss) and the gradients of a loss that weighs every logit."""
    logits, auxiliary = model(batch, auxiliary=True)
    (logits * torch.linspace(-1, 1, len(logits)) + auxiliary).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_training(expected, found) -> None:
    (logits, grads), (other_logits, other_grads) = expected, found
    torch.testing.assert_close(other_logits, logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == other_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(other_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", ["fin", "din"])
def test_one_lookup_per_distinct_event_gives_the_scores_and_gradients_of_one_per_event(features_job, name,
                                                                                      monkeypatch):
    """A training batch with creatives (small item and shop tables: different items share rows; each event's
    creative drawn apart from its ids, so that events of the same rows differ by it): each distinct (rows,
    creative) event looked up and encoded once, then spread to its events, against every event looked up and
    encoded: the same logits and every gradient the same."""
    out, _ = features_job
    batch = next(iter(ExampleStream(out / "data", "train", LOADER)))
    table = torch.cat([torch.zeros(1, 4), torch.randn(7, 4, generator=torch.Generator().manual_seed(0))])
    event_images = torch.remainder(batch.history["ts"] // 60_000, 8)
    batch = dataclasses.replace(batch, images=ItemImages(table, batch.ids["item_id"] % 8, event_images))
    sizes = EmbeddingSizes(dim=8, rows={**EmbeddingSizes().rows, "item": 50, "shop": 20})
    config = dataclasses.replace(CONFIG, image_dim=4, embeddings=sizes)
    results = []
    for distinct in (False, True):
        monkeypatch.setattr(SparseArch, "lookup_distinct", distinct)
        torch.manual_seed(0)
        model = MODELS[name](config).train()
        if distinct:
            rows = model.sparse.history_ids(batch)[0].first.numel()
            assert rows < int(batch.histories.offsets[-1])
            # fewer rows than events, more than the tables' rows alone tell apart: the creative is in the key
            images = batch.images
            batch.images = None
            assert model.sparse.history_ids(batch)[0].first.numel() < rows
            batch.images = images
        results.append(_logits_and_gradients(model, batch))
    _assert_same_training(*results)


def _window_events(windows: SliceWindows, candidate: int) -> list[int]:
    rows = windows.rows
    first = int((torch.cumsum(rows.lengths, 0) - rows.lengths)[windows.row_of[candidate]])
    start = first + int(windows.start[candidate])
    assert int(windows.start[candidate]) + int(windows.length[candidate]) <= int(rows.lengths[windows.row_of[candidate]])
    return rows.index[start:start + int(windows.length[candidate])].tolist()


def test_slice_windows_hold_each_request_s_events_in_segments_of_a_long_slice():
    """One user's slice of 10 events read by three requests (windows of 4 from events 0, 3 and 6) and a second
    user's slice of 3 read by one: segments of 8 events from every 4th, each window inside the segment it
    starts in, each candidate reading exactly its request's events."""
    histories = Histories(offsets=torch.tensor([0, 10, 13]), values={}, start=torch.tensor([0, 3, 6, 10]),
                          end=torch.tensor([4, 7, 10, 13]))
    full = Fragment(index=torch.tensor([0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 9, 11, 12]), lengths=torch.tensor([4, 4, 4, 2]))
    user_of = torch.tensor([0, 1, 1, 2, 3])
    windows = SliceWindows.of(full, histories, user_of)
    assert windows.rows.lengths.tolist() == [8, 6, 3]  # events 0-7, 4-9 of the first slice; the second whole
    expected = {0: [0, 1, 2, 3], 1: [3, 4, 5, 6], 2: [6, 7, 8, 9], 3: [11, 12]}
    for c, request in enumerate(user_of.tolist()):
        assert _window_events(windows, c) == expected[request]
    # the cut gives the full fragment as runs (each request's first event), its positions left unspelled: the
    # same windows, read without building the positions (a training batch's million)
    runs_only = Fragment(index=None, lengths=full.lengths, first=torch.tensor([0, 3, 6, 11]))
    windows = SliceWindows.of(runs_only, histories, user_of)
    assert runs_only.stored_index is None
    for c, request in enumerate(user_of.tolist()):
        assert _window_events(windows, c) == expected[request]
    assert runs_only.index.tolist() == full.index.tolist()
    with pytest.raises(ValueError, match="first position"):
        Fragment(index=None, lengths=full.lengths)
    holes = Fragment(index=torch.tensor([0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 11, 12]), lengths=full.lengths)
    assert SliceWindows.of(holes, histories, user_of) is None  # not one run of events per request
    # a request without events after the last slice's end (its window is empty): masked, any row does
    empty = Histories(offsets=torch.tensor([0, 10]), values={}, start=torch.tensor([0, 10]), end=torch.tensor([4, 10]))
    windows = SliceWindows.of(Fragment(index=torch.arange(4), lengths=torch.tensor([4, 0])), empty, torch.tensor([0, 1]))
    assert _window_events(windows, 0) == [0, 1, 2, 3] and _window_events(windows, 1) == []
