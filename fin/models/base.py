"""What every model shares: the sparse side, the event and candidate encoders, and the tower inputs.

A model embeds each history event once (`events`, [N, d]; in training, each distinct event once, [M, d]:
`fin.embeddings.DistinctEvents`) and the candidate once (`target`, [B, d]), then adds its own interest
vectors, reading the events of its fragments with `Encoded.events_at`; the tower reads [candidate, request
context and user, the candidate's price and distance, statistics, interests (each with its intensities:
`ModelConfig.intensity`), candidate x interest products]. Every model reads the same inputs; they differ
in what they make of the history (laid out by `fin.models.layout`, counted by `fin.models.counts`).

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

from features.fragments import FragmentConfig
from fin.embeddings import SHARED, SINGLE, EmbeddingSizes, SparseArch, SparseOutput, hash_ids
from fin.fusion import ConcatFusion, ConfidenceFusion, ModalityConfidence, UnimodalHeads
from fin.inputs import CANDIDATE_NUMBERS, STAT_FEATURES, Batch
from fin.layers import MLP, MultiHeadTargetAttention, gather
from fin.models.counts import MATCHED, matched_counts


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
    def events_read(fragments: FragmentConfig) -> int | None:
        """The most recent history events the model reads of a request (its longest fragment): a loader
        need not ship older ones, whatever its `max_seq_len`. None: any event of the window it is given."""
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
