"""What every model shares: the sparse side, the event and candidate encoders, and the tower inputs.

A model embeds each history event once (`events`, [N, d]; in training, each distinct event once, [M, d]:
`fin.embeddings.DistinctEvents`) and the candidate once (`target`, [B, d]), then adds its own interest
vectors, reading the events of its fragments with `Encoded.events_at`; the tower reads [candidate, request
context and user, the candidate's price and distance, statistics, interests (each with its intensities:
`ModelConfig.intensity`), candidate x interest products]. Every model reads the same inputs; they differ
in what they make of the history.

In training, a shallow position term (one learned bias per slot) is added to the tower's logit, so that
the tower need not explain the click-rate fall-off down the page with the other inputs; scoring leaves it
out (the slot is what the ranking decides): the logit of a scored candidate is position-free and its
calibration is fitted on position-free validation logits.

With an image modality (`ModelConfig.image_dim` > 0), the candidate and every history event also carry the
creative embedding of their item (`Batch.images`), joined to the ids by the model's `fusion`
(`fin.fusion`: a plain projection of both for the baselines, confidence-weighted for FIN).

An ad first shown after training has untrained id rows (about zero) and statistics of its first days, so
training shows the model such candidates (`CTRModel._hide_ids`): the ads that were new at the time
(`Batch.new_ad`) always, and an `id_dropout` share of the others, without their item and shop ids. The
new ones teach it what a new ad's click rate is (about half the average: nobody has ordered from it yet);
the others, whose statistics stay, what to make of the creative when the ids say nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from features.contract import MISSING
from features.fragments import Fragment, FragmentConfig, Slots, runs
from fin.embeddings import SHARED, SINGLE, EmbeddingSizes, SparseArch, SparseOutput, hash_ids
from fin.fusion import ConcatFusion, ConfidenceFusion, ModalityConfidence, UnimodalHeads
from fin.inputs import CANDIDATE_NUMBERS, STAT_FEATURES, Batch, Histories
from fin.layers import MLP, MultiHeadTargetAttention, gather


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 16
    heads: int = 2
    tower: tuple[int, ...] = (256, 128)
    dropout: float = 0.0
    sim_len: int = 50  # SIM-hard: category-matched events kept from the lifelong sequence
    position_bias: bool = True  # the training-only position term (above)
    positions: int = 64  # slots with a bias of their own (later ones share by hashing)
    embeddings: EmbeddingSizes = field(default_factory=EmbeddingSizes)
    image_dim: int = 0  # width of the creative embeddings read (0: no image modality; `fin train` sets it)
    id_dropout: float = 0.1  # share of the other training candidates shown without item/shop ids (besides new ads)
    fusion: str = ""  # how the image modality joins the ids: "concat" or "confidence" ("": the model's own)
    # each sequence a model reads also hands the tower how much of it answers the candidate, not only what it
    # is: its attention's log-mass (`fin.layers._log_mass`) and how many of its events have the candidate's
    # shop and category (`matched_counts`); a softmax alone cannot tell one past order from ten
    intensity: bool = True


@dataclass
class Encoded:
    target: torch.Tensor  # [B, d]
    events: torch.Tensor  # [N, d], one row per history event of the batch, or [M, d] per distinct event
    single: torch.Tensor  # [B, len(SINGLE) * embedding dim]
    stats: torch.Tensor  # [B, len(STAT_FEATURES) + len(CANDIDATE_NUMBERS)], log1p
    target_inputs: tuple[torch.Tensor, ...] | None = None  # with images: the candidate's (ids, table, rows)
    event_row: torch.Tensor | None = None  # [N]: each history event's row of `events` (None: its own)

    def events_at(self, index: torch.Tensor) -> torch.Tensor:
        """The encoded history events at `index` (positions among the batch's N events, any shape) ->
        [*index.shape, d]: one gather, and in backward one scatter, however a fragment was cut; from the
        distinct events' rows where there are, so that backward scatters into M rows, not N."""
        return gather(self.events, index if self.event_row is None else gather(self.event_row, index))


class CTRModel(nn.Module):
    """Base of FIN and the baselines. Subclasses say how many interest vectors they make and make them."""

    interests: int = 0
    # with `ModelConfig.intensity`: the columns its interest vectors carry after their d (log-masses, counts)
    intensities: Callable[[ModelConfig], int] = staticmethod(lambda config: 0)
    # why the model's scoring forward cannot be exported whole (`fin.compiled`), None when it can
    not_exportable: str | None = None
    fusion: str = "concat"  # how the image modality joins the ids (`fin.fusion`): "concat" or "confidence"

    @staticmethod
    def events_read(fragments: FragmentConfig) -> int:
        """The most recent history events the model reads of a request (its longest fragment): a loader
        need not ship older ones, whatever its `max_seq_len`."""
        return fragments.full_len

    def __init__(self, config: ModelConfig = ModelConfig(), device: torch.device | None = None):
        super().__init__()
        self.config = config
        d, e = config.dim, config.embeddings.dim
        self.sparse = SparseArch(config.embeddings, device)
        ids = len(SHARED) * e
        self.unimodal = None
        if not config.image_dim:  # history events and the candidate live in one space
            self.event, self.target = nn.Linear(ids, d), nn.Linear(ids, d)
        elif (config.fusion or self.fusion) == "confidence":
            confidence = ModalityConfidence(ids, config.image_dim)
            self.event = ConfidenceFusion(ids, config.image_dim, d, confidence)
            self.target = ConfidenceFusion(ids, config.image_dim, d, confidence)
            self.unimodal = UnimodalHeads(d, len(SINGLE) * e)
        else:
            self.event, self.target = ConcatFusion(ids, config.image_dim, d), ConcatFusion(ids, config.image_dim, d)
        tower_in = d + len(SINGLE) * e + len(STAT_FEATURES) + len(CANDIDATE_NUMBERS) + 2 * self.interests * d
        tower_in += self.intensities(config) if config.intensity else 0
        self.tower = MLP(tower_in, config.tower, out_dim=1, dropout=config.dropout)
        self.position = nn.Embedding(config.positions, 1) if config.position_bias else None
        if self.position is not None:
            nn.init.zeros_(self.position.weight)  # row 0, the unknown slot, stays 0

    def encode(self, batch: Batch, sparse: SparseOutput | None = None) -> Encoded:
        sparse = self.sparse(batch) if sparse is None else sparse
        target, stats = sparse.target, torch.cat([batch.stats, batch.numbers], dim=1)
        if self.training and (self.config.id_dropout > 0 or batch.new_ad is not None):
            target = self._hide_ids(target, batch.row_id, batch.new_ad)
        x = Encoded(target=None, events=None, single=sparse.single, stats=torch.log1p(stats.clamp(min=0)))
        distinct = sparse.distinct  # history rows per distinct event: each encoded once
        if not self.config.image_dim:
            x.target, events = self.target(target.flatten(1)), self.event(sparse.history.flatten(1))
        else:
            if batch.images is None:
                raise ValueError(f"{type(self).__name__} reads creative embeddings: the batch has none (Batch.images)")
            images = batch.images
            x.target_inputs = (target.flatten(1), images.table, images.candidate)
            x.target = self.target(*x.target_inputs)
            image_rows = images.history if distinct is None else images.history.index_select(0, distinct.first)
            events = self.event(sparse.history.flatten(1), images.table, image_rows)
        x.events, x.event_row = events, None if distinct is None else distinct.row_of
        return x

    def _hide_ids(self, target: torch.Tensor, row_id: torch.Tensor, new_ad: torch.Tensor | None) -> torch.Tensor:
        """New ads and an `id_dropout` share of the other candidates as an ad first shown after training looks:
        item and shop rows zero (an untrained row is about zero). Which others follows from each example's id
        (a multiplicative hash), not from a random stream: N workers and a resumed run hide the same examples
        one worker does. Statistics stay: a new ad's are those of its first days, and they are what tells
        it from a known ad whose ids are hidden (zeroing them too priced new ads as known ones: benchmarks/
        README.md, "Creatives: cold-start ads")."""
        buckets = 1 << 16
        hashed = torch.remainder(row_id * 0x9E3779B1, buckets)  # int64 products wrap; the remainder is >= 0
        hidden = hashed < int(self.config.id_dropout * buckets)
        if new_ad is not None:
            hidden = hidden | new_ad
        tables = torch.zeros(len(SHARED), dtype=torch.bool, device=target.device)
        tables[[list(SHARED).index("item"), list(SHARED).index("shop")]] = True
        return target.masked_fill(hidden[:, None, None] & tables[None, :, None], 0.0)

    def interest_vectors(self, batch: Batch, x: Encoded) -> list[torch.Tensor]:
        """[B, d] each, or with `ModelConfig.intensity` [B, d + k]: the vector, then its k intensities (its
        attention's log-masses, `matched_counts`)."""
        return []

    def forward(self, batch: Batch, sparse: SparseOutput | None = None,
                auxiliary: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B]; `sparse`: the batch's embedding rows when the caller looked them up (an exported graph
        reads its own copy of the tables: `fin.compiled`). With `auxiliary` (training), also each example's
        auxiliary loss [B] (`fin.fusion`; zeros for a model without one), added to its click loss."""
        x = self.encode(batch, sparse)
        vectors, d = self.interest_vectors(batch, x), self.config.dim
        interests = [v[:, :d] for v in vectors]
        intensities = [v[:, d:] for v in vectors]  # [B, 0] without `ModelConfig.intensity`
        features = [x.target, x.single, x.stats, *interests, *intensities, *(x.target * i for i in interests)]
        logit = self.tower(torch.cat(features, dim=1)).squeeze(1)
        if self.position is not None and batch.position is not None:
            logit = logit + gather(self.position.weight, hash_ids(batch.position, self.config.positions)).squeeze(1)
        if not auxiliary:
            return logit
        if self.unimodal is None:
            return logit, torch.zeros_like(logit)
        return logit, self.unimodal.auxiliary_loss(self.target, *x.target_inputs, x.single, batch.label)


@dataclass
class Padded:
    """A fragment padded per request: rows of the batch's history events [U, L], which are real [U, L], and
    (integrated) the set tags [U, L]. Padding slots point at real rows: only masked readers may read them.
    `requests`: which of the batch's requests the U rows are (None: all of them, in order)."""

    index: torch.Tensor
    mask: torch.Tensor
    tags: torch.Tensor | None = None
    requests: torch.Tensor | None = None

    @classmethod
    def of(cls, frag: Fragment | Slots, requests: torch.Tensor | None = None) -> Padded:
        if isinstance(frag, Slots):  # one request's fragment at a fixed width: already padded
            return cls(frag.index, frag.mask, frag.tags)
        pos, mask = frag.padded(requests)
        return cls(gather(frag.index, pos), mask, None if frag.tags is None else gather(frag.tags, pos), requests)

    def request_times(self, ts: torch.Tensor) -> torch.Tensor:
        """The batch's request times [U] at this fragment's rows."""
        return ts if self.requests is None else ts[self.requests]


def length_groups(lengths: torch.Tensor, groups: int, cuts: int = 32) -> list[torch.Tensor]:
    """The rows (indices into `lengths` [U]) in at most `groups` groups of similar length, cut where the padded
    area (each group's rows times its longest, summed) is least: a shortest path over the sorted lengths
    whose cut points are searched among `cuts` quantiles, so the search costs the same for any U."""
    order = torch.argsort(lengths)
    count = order.numel()
    if groups < 2 or count < 2:
        return [order]
    ascending = lengths[order].cpu()
    at = torch.unique(torch.cat([torch.tensor([0, count]), torch.linspace(1, count - 1, min(cuts, count - 1)).round().long()]))
    # area[i, j]: one group of the sorted rows at[i] .. at[j] - 1, padded to the longest of them (i == j: none)
    area = ((at[None, :] - at[:, None]) * ascending[(at - 1).clamp(min=0)][None, :]).double()
    area = area.masked_fill(at[None, :] < at[:, None], float("inf"))
    best = torch.full((at.numel(),), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    came_from = []
    for _ in range(groups):  # best[j]: least area of the rows before at[j] in the groups so far
        best, previous = (best[:, None] + area).min(0)
        came_from.append(previous)
    bounds, j = [at.numel() - 1], at.numel() - 1
    for previous in reversed(came_from):
        j = int(previous[j])
        bounds.append(j)
    cuts_at = sorted({int(at[b]) for b in bounds} | {0, count})
    return [order[lo:hi] for lo, hi in zip(cuts_at[:-1], cuts_at[1:]) if hi > lo]


# attend(candidates, padded fragment, each of those candidates' row in it) -> [b, ...]; candidates: the
# indices of the candidates to attend for (None: all of them, in order)
Attend = Callable[[torch.Tensor | None, Padded, torch.Tensor], torch.Tensor]


def attend_by_length(frag: Fragment | Slots, user_of: torch.Tensor, attend: Attend, groups: int,
                     count_groups: int = 1) -> torch.Tensor:
    """`attend` for every candidate (`user_of` [B]: its row of `frag`) -> [B, ...], with the rows (requests,
    or shared timeline slices) in up to `groups` groups of similar length (`length_groups`), each padded to
    its own longest and attended over by its own candidates: a training batch's full fragments run from a
    few events to 1,000, and padding them all to the longest gathers, attends over and scatters back about
    2.6 times the real events (1.3 times in three groups). With `count_groups`, each group is split again
    into up to that many of similar candidate counts, each padded to its own most (rows of slice segments
    hold 1 to 76 candidates in a training batch of 2,048). Every candidate gets what one group would give
    it: attention is per row."""
    if isinstance(frag, Slots) or groups < 2 or frag.lengths.numel() < 2 * groups:
        return attend(None, Padded.of(frag), user_of)
    rows = length_groups(frag.lengths, groups)
    if count_groups > 1:
        per_row = torch.bincount(user_of, minlength=frag.lengths.numel())
        rows = [members[part] for members in rows for part in length_groups(per_row[members], count_groups)]
    if len(rows) == 1:
        return attend(None, Padded.of(frag), user_of)
    group_of, local = torch.empty_like(frag.lengths), torch.empty_like(frag.lengths)
    for g, members in enumerate(rows):
        group_of[members] = g
        local[members] = torch.arange(members.numel(), device=members.device)
    order = torch.argsort(group_of[user_of], stable=True)  # candidates, group by group
    counts = torch.bincount(group_of[user_of], minlength=len(rows)).tolist()
    out = [attend(cand, Padded.of(frag, members), local[user_of[cand]])
           for members, cand in zip(rows, torch.split(order, counts)) if cand.numel()]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return torch.cat(out).index_select(0, inverse)


def selected(values: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
    """`values` [B, ...] of the `candidates` an `Attend` is called for."""
    return values if candidates is None else values.index_select(0, candidates)


@dataclass
class SliceWindows:
    """A contiguous fragment (the full one: every event before the request, the most recent ones) as windows
    into the batch's timeline slices, where the requests of one user share a slice, so that each event is
    gathered and attended over for all of them at once. A slice of many requests can be long (a user's
    overlapping windows merge into one), so the rows are segments of the slices: 2W events from every W-th
    (W: the longest window), each window held whole by the segment it starts in. `rows`: the segments as rows
    of a fragment; per candidate its row [B] and its window's first event in it and length [B]."""

    rows: Fragment
    row_of: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor

    @classmethod
    def of(cls, frag: Fragment | Slots, histories: Histories, user_of: torch.Tensor) -> SliceWindows | None:
        """None where no slice is shared (one request, or one history copy per request: nothing to gain), where
        no request has an event, or where the fragment is not one run of events per request."""
        offsets = histories.offsets
        if isinstance(frag, Slots) or offsets.numel() - 1 >= histories.start.numel() or not frag.index.numel():
            return None
        head = frag.first  # each request's first event, where the cut says its events are one run
        if head is None:
            first = torch.cumsum(frag.lengths, 0) - frag.lengths
            head = frag.index[first.clamp(max=frag.index.numel() - 1)]
            if not torch.equal(frag.index, runs(head, frag.lengths)):
                return None
        width = int(frag.lengths.max())
        # (a request without events may sit at the end of the last slice: any row does for it)
        request_slice = (torch.searchsorted(offsets, histories.start, right=True) - 1).clamp(max=offsets.numel() - 2)
        local = torch.where(frag.lengths > 0, head - offsets[request_slice], 0)  # the window's start in its slice
        segment = local // width
        per_slice = int(segment.max()) + 1
        keys, request_row = torch.unique(request_slice * per_slice + segment, return_inverse=True)
        row_slice, row_segment = keys // per_slice, keys % per_slice
        row_first = offsets[row_slice] + row_segment * width
        row_length = torch.minimum(offsets[row_slice + 1] - row_first, row_first.new_tensor(2 * width))
        start = local - segment * width
        return cls(Fragment(runs(row_first, row_length), row_length), request_row[user_of], start[user_of], frag.lengths[user_of])


def time_gaps(request_ts: torch.Tensor, event_ts: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Request time [R] minus the time of each event at `index` [R, L] (ms, exact int64; 0 where masked)."""
    return (request_ts[:, None] - gather(event_ts, index)).masked_fill(~mask, 0)


MATCHED = ("shop_id", "category_1_id")  # the candidate's ids counted in the events a model reads


def matched_counts(batch: Batch, index: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """log1p of how many events each candidate reads (the batch's events at `index` [R, L] where `mask`, row
    `rows` [B] for each candidate) have its shop, its category: [B, len(MATCHED)] (0 for an unknown id). The
    simulated click rate grows with such counts (a habit is a count), which an attention's weighted average
    cannot give and its log-mass gives only softly. Each candidate's row compared whole: B x L, for the
    short sequences of the baselines; FIN's fragments are counted by sorting (`sorted_counts`)."""
    mask = mask.index_select(0, rows)
    counts = []
    for key in MATCHED:  # (index_select: gather's, several times faster than advanced indexing on a CPU)
        candidate = batch.ids[key]
        hits = (gather(batch.history[key], index).index_select(0, rows) == candidate[:, None]) & mask
        counts.append((hits & (candidate != MISSING)[:, None]).sum(1))
    return torch.log1p(torch.stack(counts, 1).to(torch.float32))


@dataclass
class Entries:
    """A fragment's events one by one, to be counted by sorting: each one's position among the batch's events
    [E], its row (a request, or a shared timeline slice) [E] and its place in that row [E]; only those where
    `real` [E] (None: all) count."""

    index: torch.Tensor
    row: torch.Tensor
    place: torch.Tensor
    real: torch.Tensor | None = None

    @classmethod
    def of(cls, frag: Fragment | Slots, tag: int | None = None) -> Entries:
        """The events of `frag` (with `tag`, only the integrated events of that set tag)."""
        if isinstance(frag, Slots):  # [R, K] slots, the masked ones not counted
            rows, width = frag.index.shape
            row = torch.arange(rows, device=frag.index.device)[:, None].expand(rows, width).flatten()
            place = torch.arange(width, device=frag.index.device)[None].expand(rows, width).flatten()
            real = frag.mask if tag is None else frag.mask & (frag.tags == tag)
            return cls(frag.index.flatten(), row, place, real.flatten())
        total = frag.index.numel()
        row = torch.repeat_interleave(torch.arange(frag.lengths.numel(), device=frag.index.device), frag.lengths,
                                      output_size=total)
        first = torch.cumsum(frag.lengths, 0) - frag.lengths
        place = torch.arange(total, device=frag.index.device) - first.index_select(0, row)
        return cls(frag.index, row, place, None if tag is None else frag.tags == tag)


def sorted_counts(batch: Batch, entries: Entries, rows: torch.Tensor, start: torch.Tensor | None = None,
                  length: torch.Tensor | None = None) -> torch.Tensor:
    """`matched_counts` of the events `entries` holds in each candidate's row (`rows` [B]), or, with `start` and
    `length` [B], in its window of that row (the places start .. start + length - 1), counted by sorting: each
    event keyed (row, id, place) in one sorted order, each candidate's count is the distance between where
    (its row, its id, its window's first place) and (.., its window's end) would go. E log E + B log E
    instead of B x L comparisons: far less for many candidates a row (a scored request's 200 over one
    timeline) and for the full fragment's shared slices, sorted once for all the requests that read
    windows of them; somewhat more for one or two a row (`fin.models.fin.fragment_counts` picks)."""
    if entries.index.numel() == 0:
        return rows.new_zeros(rows.numel(), len(MATCHED), dtype=torch.float32)
    places = entries.place.amax() + 1  # keys (row, id + 1, place) as one int64: ((row x ids) + id + 1) x places + place
    counts = []
    for key in MATCHED:
        values, candidate = gather(batch.history[key], entries.index), batch.ids[key]
        ids = torch.maximum(values.amax(), candidate.amax()) + 2
        keys = (entries.row * ids + values + 1) * places + entries.place
        if entries.real is not None:
            keys = keys.masked_fill(~entries.real, -1)  # before every candidate's range
        ordered = torch.sort(keys).values
        low = (rows * ids + candidate + 1) * places
        high = low + places if start is None else low + start + length
        low = low if start is None else low + start
        found = torch.searchsorted(ordered, high) - torch.searchsorted(ordered, low)
        counts.append(found.masked_fill(candidate == MISSING, 0))
    return torch.log1p(torch.stack(counts, 1).to(torch.float32))


class TargetAttentionModel(CTRModel):
    """A baseline with one multi-head target attention over a sequence it chooses (`attended`)."""

    interests = 1
    intensities = staticmethod(lambda config: config.heads + len(MATCHED))

    def __init__(self, config: ModelConfig = ModelConfig(), device: torch.device | None = None):
        super().__init__(config, device)
        self.attention = MultiHeadTargetAttention(config.dim, config.heads, intensity=config.intensity)

    def attended(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The events to attend over: their positions among the batch's events [R, L], time gaps [R, L], mask
        [R, L], and the row of each candidate [B] (R: one row per request, or per candidate when the events
        depend on it)."""
        raise NotImplementedError

    def interest_vectors(self, batch: Batch, x: Encoded) -> list[torch.Tensor]:
        index, gaps, mask, rows = self.attended(batch)
        vector = self.attention(x.target, x.events_at(index), gaps, mask, rows)
        if not self.config.intensity:
            return [vector]
        return [torch.cat([vector, matched_counts(batch, index, mask, rows)], 1)]
