"""Dense building blocks shared by FIN and the baselines: plain torch modules that run on any device.

Embedding lookups (TorchRec) happen before these; everything here takes embedded tensors. Sequences
arrive padded once per *user* ([U, L, d] with a mask; `fin.models.base.Encoded.events_at` gathers them,
and what a masked slot holds is never read: it gets zero weight and zero gradient); a user's candidates
attend over its events together (`by_user`), so scoring many candidates for one user (the server's case)
costs one attention kernel, not one per candidate. The simplified attention also takes per-candidate
windows of a shared sequence (`over_windows`: the requests of one user reading one timeline slice). A
request without padding skips the mask: a served request pays for few operations, and each costs
microseconds whatever its size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def time_gap_boundaries(buckets: int) -> torch.Tensor:
    """Where each time-gap bucket after the first starts (ms): 2^b - 1 minutes for b = 1 .. buckets - 1."""
    return (2 ** torch.arange(1, buckets, dtype=torch.int64) - 1) * 60_000


def time_gap_bucket(gap_ms: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Log2-scale bucket of a time gap in whole minutes m: floor(log2(m + 1)), so 0 below one minute (and for
    negative gaps), then doubling widths, the last bucket open-ended. Exact integer bounds, one operation."""
    return torch.bucketize(gap_ms, boundaries, right=True)


def gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [N, ...] at an index of any shape -> [*index.shape, ...]. `index_select`: about 3x faster than
    advanced indexing on CPU; and reading a small embedding table's weight this way instead of calling the
    module (`embedding`, whose backward sorts the indices) costs about a quarter, forward and backward."""
    return values.index_select(0, index.flatten()).view(*index.shape, *values.shape[1:])


class MLP(nn.Sequential):
    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int | None = None, dropout: float = 0.0):
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(in_dim, h), nn.ReLU(), nn.Dropout(dropout)]
            in_dim = h
        if out_dim is not None:
            layers.append(nn.Linear(in_dim, out_dim))
        super().__init__(*layers)


def by_user(query: torch.Tensor, user_of: torch.Tensor, users: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Candidates grouped by user: query [B, ...] -> [U, C, ...] (C: most candidates of one user, zero-padded)
    and each candidate's column [B], so that `grouped[user_of, column]` is `query` again (one user: column
    None, `grouped[0]` is `query`). Attention then multiplies each user's keys with all of that user's
    queries at once instead of copying the keys per candidate: in training (one candidate per user) C = 1;
    for one request of 200 candidates U = 1."""
    if users == 1:  # one request (the server's common case): no grouping to do
        return query[None], None
    counts = torch.bincount(user_of, minlength=users)
    order = torch.argsort(user_of, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    column = torch.empty_like(user_of)
    column[order] = torch.arange(user_of.numel(), device=user_of.device) - starts[user_of[order]]
    grouped = query.new_zeros(users, int(counts.max()) if user_of.numel() else 0, *query.shape[1:])
    grouped[user_of, column] = query
    return grouped, column


def from_users(grouped: torch.Tensor, user_of: torch.Tensor, column: torch.Tensor | None) -> torch.Tensor:
    """The inverse of `by_user`: [U, C, ...] -> [B, ...]."""
    return grouped[0] if grouped.shape[0] == 1 else grouped[user_of, column]


# Longest padded sequence attended with a plain product, softmax and product instead of the fused kernel, on
# a CPU in eager mode: the fused CPU kernel works in blocks of 32 queries by 512 events, and over a few
# candidates per user and short fragments (recent events, a meal's) the plain form is cheaper forward and
# backward, while the fused kernel wins on long ones (benchmarks/README.md, "Short fragments").
UNFUSED_MAX_LEN = 256
# Events that are both keys and values attended unfused by `_EventAttention`, whose backward is written out
# (False: plain autograd of the same operations; benchmarks/train_step.py compares both)
WRITTEN_BACKWARD = True


def _scores(query: torch.Tensor, keys: torch.Tensor, scale: float | None) -> torch.Tensor:
    return query @ keys.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scale is None else scale)


def _null_logsumexp(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(1 + sum_i exp(score_i)) over the slots of `scores` [..., L] where `mask` (broadcast): a null event of
    score 0 beside the real ones, so that a row without any is 0 (and its gradient 0, not NaN)."""
    return torch.logsumexp(F.pad(scores.masked_fill(~mask, float("-inf")), (1, 0)), -1)


def _unfused(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attn_mask: torch.Tensor,
             scale: float | None = None, log_mass: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`F.scaled_dot_product_attention` with a boolean mask, unfused (every row has an unmasked slot), and with
    `log_mass` log(1 + sum_i exp(score_i)) over the unmasked slots (`_log_mass`; else None), read off the softmax
    instead of a second pass of exponentials: log sum_i exp(s_i) = max s - log max p (the largest score's
    weight; its gradient through both maxima is p, as it should be). Where the events are both keys and
    values (one head of them: the simplified attention, the folded multi-head one), by `_EventAttention`."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if WRITTEN_BACKWARD and keys is values and query.shape[1] == keys.shape[1] == 1:
        # (squeezed, not indexed: an index's backward would fill a zero tensor of the events' size first)
        out, mass = _EventAttention.apply(query.squeeze(1) * scale, keys.squeeze(1), attn_mask.squeeze(1), log_mass)
        return out.unsqueeze(1), None if mass is None else mass.unsqueeze(1)
    scores = _scores(query, keys, scale).masked_fill(~attn_mask, float("-inf"))
    weights = torch.softmax(scores, -1)
    mass = F.softplus(_logsumexp_of(scores, weights)) if log_mass else None
    return weights @ values, mass


def _logsumexp_of(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log sum_i exp(s_i) over the last dimension, read off the softmax `weights` of `scores`: max s - log max p."""
    return scores.amax(-1) - weights.amax(-1).log()


class _EventAttention(torch.autograd.Function):
    """softmax(q e^T) e over events `e` [U, L, d] that are both keys and values, for queries `q` [U, Q, d]
    (scaled) where `mask` [U, 1 or Q, L] (every row with an unmasked slot), and with `log_mass` the log-mass
    log(1 + sum_i exp(s_i)) [U, Q] (else None), with its backward written out. Autograd of the plain form keeps
    the masked scores and the softmax, differentiates each operation apart and sums the events' two gradients
    (as keys, as values) in a pass of its own; here the events' gradient is one product accumulated into the
    other (g_e = g_s^T q + p^T g_out), the scores' gradient is formed in place, and the log-mass's gradient is
    read off the weights (d/ds_i log(1 + sum exp s) = p_i sigmoid(log sum exp s)). A training step of FIN
    attends this way over four of its five fragments: 1.2-1.3x faster steps on a CPU (benchmarks/README.md,
    "Attention over events, its backward written out")."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, events: torch.Tensor, mask: torch.Tensor,
                log_mass: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        scores = torch.bmm(query, events.transpose(1, 2)).masked_fill_(~mask, float("-inf"))
        weights = torch.softmax(scores, -1)
        logsumexp = _logsumexp_of(scores, weights) if log_mass else None
        ctx.save_for_backward(query, events, weights, None if logsumexp is None else torch.sigmoid(logsumexp))
        return torch.bmm(weights, events), None if logsumexp is None else F.softplus(logsumexp)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor, grad_mass: torch.Tensor | None):
        query, events, weights, mass_share = ctx.saved_tensors
        grad_scores = torch.bmm(grad_out, events.transpose(1, 2))  # first the weights' gradient, then in place:
        centre = (grad_scores * weights).sum(-1, keepdim=True)  # the softmax's backward
        if grad_mass is not None and mass_share is not None:
            centre -= (grad_mass * mass_share)[..., None]
        grad_scores.sub_(centre).mul_(weights)
        grad_events = torch.bmm(grad_scores.transpose(1, 2), query).baddbmm_(weights.transpose(1, 2), grad_out)
        return torch.bmm(grad_scores, events), grad_events, None, None


def _bytes(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as uint8, for reductions: min / max over bytes take a tenth of the time of all / any over
    booleans on a CPU (4 against 44 us over 300 x 200)."""
    return mask.view(torch.uint8)


def _log_mass(query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """How much of each query's attention its events hold before the softmax divides it away: log(1 + sum_i
    exp(score_i)) over the unmasked events (the "1": a null event of score 0), [U, H, C] for query [U, H, C, h],
    keys [U, H or 1, L, h] and mask [U, L] or [U, C, L]. The softmax keeps where the attention goes and drops
    how much there is: ten orders from a shop at this place and one look at it pool to the same vector. This
    keeps the amount (DIN leaves the softmax out for the same reason; here the softmax stays and its
    log-partition goes beside it). No events: 0."""
    mask = mask if mask.dim() == 3 else mask[:, None]  # [U, C or 1, L]
    return _null_logsumexp(_scores(query, keys, scale), mask[:, None])


def _attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
               scale: float | None = None, log_mass: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(query keys^T * scale) values over each user's events where `mask` [U, L] (or, per query, [U, C,
    L]), fused (`scaled_dot_product_attention`); query [U, H, C, h], keys and values [U, H, L, h] (4-D: the
    fused CPU kernel takes nothing else). A user (query) without events gets zeros: its first slot is
    unmasked for the kernel (so no backend sees an all-masked row and no gradient is NaN) and its result is
    zeroed. A batch without any event gets one masked slot: the projections stay in the graph (zero
    gradients), which DistributedModelParallel's static-graph replication requires of every step.
    -> (that, and with `log_mass` `_log_mass` [U, H, C], else None): from the same scores where the attention
    is unfused."""
    length = mask.shape[-1]
    # no padding (one request, or users of equal lengths): no mask to apply; a graph being exported has a
    # mask whatever its values (its shapes do not depend on them) and always applies it
    if length and not torch.compiler.is_compiling() and (mask.numel() == 0 or bool(_bytes(mask).amin())):
        out = F.scaled_dot_product_attention(query, keys, values, scale=scale)
        return out, _log_mass(query, keys, mask, scale) if log_mass else None
    if length == 0:
        keys, values = F.pad(keys, (0, 0, 0, 1)), F.pad(values, (0, 0, 0, 1))
        mask, length = mask.new_zeros(*mask.shape[:-1], 1), 1
    mask = mask if mask.dim() == 3 else mask[:, None]  # [U, C or 1, L]
    empty = _bytes(mask).amax(-1) == 0
    kernel_mask = torch.cat([mask[..., :1] | empty[..., None], mask[..., 1:]], dim=-1)
    if length > UNFUSED_MAX_LEN or query.device.type != "cpu" or torch.compiler.is_compiling():
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=kernel_mask[:, None], scale=scale)
        mass = _log_mass(query, keys, mask, scale) if log_mass else None
    else:
        out, mass = _unfused(query, keys, values, kernel_mask[:, None], scale, log_mass)
        if mass is not None:  # a row without events read its unmasked first slot: its mass is 0
            mass = mass.masked_fill(empty[:, None], 0.0)
    return out.masked_fill(empty[:, None, :, None], 0.0), mass


class SimplifiedTargetAttention(nn.Module):
    """FIN's cheap attention for long fragments (our reconstruction): one head, scaled dot product between
    the candidate and each event, no MLP.

    The projections act on the candidates, not on the events: q . (W_k e) = (W_k^T q) . e and
    sum_i a_i (W_v e_i) = W_v (sum_i a_i e_i), so the attention runs over the events as they are and costs
    no per-event matrix product (L = 1,000 events against C = 200 candidates of a request; C = 1 per user
    in training)."""

    def __init__(self, dim: int, intensity: bool = False):
        super().__init__()
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.scale = 1.0 / math.sqrt(dim)
        self.intensity = intensity  # also return each candidate's `_log_mass`: [B, d + 1]
        self.outputs = dim + intensity

    def forward(self, query: torch.Tensor, sequence: torch.Tensor, mask: torch.Tensor,
                user_of: torch.Tensor) -> torch.Tensor:
        """query [B, d] against its user's (`user_of` [B]) events, sequence [U, L, d] and mask [U, L] -> [B, d]
        (with `intensity`, [B, d + 1]: the pooled vector, then the log-mass)."""
        grouped, column = by_user(query @ self.key.weight, user_of, sequence.shape[0])  # [U, C, d]
        return self._pooled(grouped, sequence, mask, user_of, column)

    def _pooled(self, grouped: torch.Tensor, sequence: torch.Tensor, mask: torch.Tensor, user_of: torch.Tensor,
                column: torch.Tensor | None) -> torch.Tensor:
        events = sequence[:, None]
        pooled, mass = _attention(grouped[:, None], events, events, mask, self.scale, self.intensity)
        if mass is None:
            return self.value(from_users(pooled[:, 0], user_of, column))  # one head
        out = from_users(torch.cat([pooled[:, 0], mass[:, 0, :, None]], -1), user_of, column)  # [B, d + 1]
        return torch.cat([self.value(out[:, :-1]), out[:, -1:]], 1)

    def over_windows(self, query: torch.Tensor, sequence: torch.Tensor, start: torch.Tensor, length: torch.Tensor,
                     user_of: torch.Tensor) -> torch.Tensor:
        """`forward` where each query attends over a window of its user's events, `length` [B] events from
        `start` [B] of sequence [U, L, d] (the requests of one user read windows of one timeline slice, held
        once): per-query masks instead of a gathered copy of every request's events."""
        grouped, column = by_user(query @ self.key.weight, user_of, sequence.shape[0])  # [U, C, d]
        if column is None:
            first, count = start[None], length[None]
        else:
            first = start.new_zeros(grouped.shape[:2]).index_put_((user_of, column), start)
            count = length.new_zeros(grouped.shape[:2]).index_put_((user_of, column), length)
        slot = torch.arange(sequence.shape[1], device=sequence.device)
        mask = (slot >= first[..., None]) & (slot < (first + count)[..., None])  # [U, C, L]
        return self._pooled(grouped, sequence, mask, user_of, column)


class MultiHeadTargetAttention(nn.Module):
    """Multi-head target attention with time-gap embeddings (FIN's recent and integrated sequences,
    DIN and SIM baselines): each candidate's query attends over its user's events (event embedding + its
    time-gap embedding), H heads of h = d / H.

    Two equal forms, chosen by the shape. With many candidates per user (a served request: C = 200), keys and
    values are projected once per event and shared by them all. With few (training: C of 1-4), the per-event
    projections cost more than they share, and the projections move to the candidates instead, as in
    `SimplifiedTargetAttention`: per head, q_h . (W_k^h x) = (W_k^h^T q_h) . x and sum_i a_i W_v^h x_i =
    W_v^h sum_i a_i x_i, so the events are attended over as they are, by H x C queries of width d. Per
    event, the folded form multiplies 2 H C d numbers against 2 d d + 2 C d for the projected one: cheaper
    while C (H - 1) < d. A graph being compiled keeps the projected form."""

    fold_queries = True  # the folded form where it is cheaper (False: always projected; benchmarks compare both)

    def __init__(self, dim: int, heads: int = 2, time_gap_buckets: int = 24, intensity: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.intensity = intensity  # also return each candidate's `_log_mass` per head: [B, d + H]
        self.outputs = dim + heads * intensity
        self.time_gap = nn.Embedding(time_gap_buckets, dim)
        self.register_buffer("gap_boundaries", time_gap_boundaries(time_gap_buckets), persistent=False)
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, sequence: torch.Tensor, gap_ms: torch.Tensor, mask: torch.Tensor,
                user_of: torch.Tensor) -> torch.Tensor:
        """query [B, d] against its user's (`user_of` [B]) events, sequence [U, L, d] with their time gaps to
        the request [U, L] and mask [U, L] -> [B, d] (with `intensity`, [B, d + H]: then each head's log-mass)."""
        x = sequence + gather(self.time_gap.weight, time_gap_bucket(gap_ms, self.gap_boundaries))
        q = self.query(query).view(-1, self.heads, self.head_dim)  # [B, H, h]
        grouped, column = by_user(q, user_of, x.shape[0])  # [U, C, H, h]
        # (compiling first: a test of the candidates' count would constrain an exported graph's dynamic shape)
        folded = (self.fold_queries and not torch.compiler.is_compiling()
                  and grouped.shape[1] * (self.heads - 1) < x.shape[-1])
        # [U, C, H, h], and with `intensity` each head's log-mass [U, C, H]
        pooled, mass = self._folded(grouped, x, mask) if folded else self._projected(grouped, x, mask)
        if mass is None:
            return self.out(from_users(pooled, user_of, column).reshape(query.shape[0], -1))
        out = from_users(torch.cat([pooled.flatten(2), mass], -1), user_of, column)
        return torch.cat([self.out(out[:, :-self.heads]), out[:, -self.heads:]], 1)

    def _projected(self, grouped: torch.Tensor, x: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        split = (*x.shape[:2], self.heads, self.head_dim)
        keys, values = self.key(x).view(split).transpose(1, 2), self.value(x).view(split).transpose(1, 2)
        pooled, mass = _attention(grouped.transpose(1, 2), keys, values, mask, log_mass=self.intensity)
        return pooled.transpose(1, 2), None if mass is None else mass.transpose(1, 2)

    def _folded(self, grouped: torch.Tensor, x: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        users, candidates, heads, h = grouped.shape
        split = (heads, h, x.shape[-1])  # a projection's weight [d, d] as each head's rows W^h: [H, h, d]
        queries = torch.einsum("uchk,hkd->uhcd", grouped, self.key.weight.view(split)).reshape(users, 1, -1, x.shape[-1])
        # [U, 1, H x C, d], and with `intensity` the log-masses [U, 1, H x C]
        events = x[:, None]  # keys and values both: one tensor, so that `_unfused` attends over it as such
        pooled, mass = _attention(queries, events, events, mask, h ** -0.5, self.intensity)
        pooled = torch.einsum("uhcd,hkd->uchk", pooled.view(users, heads, candidates, -1), self.value.weight.view(split))
        return pooled, None if mass is None else mass.view(users, heads, candidates).transpose(1, 2)
