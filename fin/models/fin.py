"""FIN: Fragment Network + Integrate Network over a user's lifelong spatial-temporal timeline.

Follows docs/design.md, "FIN"; choices that are our reconstruction rather than the paper's text:
- an event is the projection of its item, shop, category, brand, place cell and AOI embeddings (the
  tables it shares with the candidate and the request; `fin.models.base`);
- Fragment Network: simplified (one-head, dot-product, no MLP) target attention over the location, meal
  and full fragments; multi-head target attention with time-gap embeddings over the recent fragment;
- Integrate Network: the integrated sequence (location and meal fragments' union, each event tagged
  both / location-only / meal-only by an added embedding) through multi-head target attention;
- with creatives (`ModelConfig.image_dim`), each event and the candidate fuse ids and creative embedding
  with confidence-aware weights (`fin.fusion`, after Predictive Dynamic Fusion);
- intensity (`ModelConfig.intensity`): each fragment's vector is followed by counts of the candidate's shop
  and category in it (of the integrated sequence, its intersection: the events at this place and meal
  time) and, but for the full fragment's, its attention's log-mass (`fin.models.counts.matched_counts`,
  `fin.layers._log_mass`): a softmax cannot tell one past order from ten;
- tower: MLP over [candidate, request context, point-in-time statistics, the five interest vectors and
  their intensities, candidate x interest products] -> one logit, trained with binary cross-entropy.
"""

from __future__ import annotations

import torch
from torch import nn

from features.fragments import TAG_BOTH, Fragment, FragmentConfig, Slots
from fin.inputs import Batch
from fin.layers import MultiHeadTargetAttention, SimplifiedTargetAttention, gather
from fin.models.base import CTRModel, Encoded, ModelConfig
from fin.models.counts import MATCHED, Entries, matched_counts, sorted_counts
from fin.models.layout import Padded, SliceWindows, attend_by_length, selected, time_gaps

SIMPLIFIED = ("location", "meal", "full")
MULTI_HEAD = ("recent", "integrated")
MATCHED_TAG = {"integrated": TAG_BOTH}  # of the integrated sequence, its intersection is counted
COMPARE_PER_ENTRY = 4  # `fragment_counts` compares while candidates x longest row is at most this x the events


def fragment_counts(batch: Batch, frag: Fragment | Slots, user_of: torch.Tensor, tag: int | None = None,
                    windows: SliceWindows | None = None) -> torch.Tensor:
    """`matched_counts` over each candidate's fragment (`user_of` [B]: its row of `frag`); with `tag`, only the
    integrated events of that set tag; with `windows` (the full fragment as windows of the shared timeline
    slices), in each candidate's window of its slice. Each candidate's row compared whole where that costs
    less than sorting the fragment's events (a training batch's one or two candidates a request), else by
    sorting (`sorted_counts`: a scored request's many candidates, the shared slices)."""
    if windows is not None:
        return sorted_counts(batch, Entries.of(windows.rows), windows.row_of, windows.start, windows.length)
    # (per element, a comparison costs about a quarter of an entry's share of the sort: measured on a CPU)
    if isinstance(frag, Fragment) and user_of.numel() * _longest(frag) <= COMPARE_PER_ENTRY * frag.index.numel():
        padded = Padded.of(frag)
        return matched_counts(batch, padded.index, padded.mask if tag is None else padded.mask & (padded.tags == tag), user_of)
    return sorted_counts(batch, Entries.of(frag, tag), user_of)


def _longest(frag: Fragment) -> int:
    return int(frag.lengths.max()) if frag.lengths.numel() else 0


class FIN(CTRModel):
    interests = len(SIMPLIFIED) + len(MULTI_HEAD)
    # the fragments whose attention also hands the tower its log-mass (`ModelConfig.intensity`): not the full
    # one, whose mass says little beyond its length and, attended fused, would cost a pass of its own
    intensity_fragments = ("location", "meal", "recent", "integrated")
    intensities = staticmethod(lambda config: sum(config.heads if f in MULTI_HEAD else 1 for f in FIN.intensity_fragments)
                               + FIN.interests * len(MATCHED))
    fusion = "confidence"  # with creatives: per-row weights of ids and image (`fin.fusion.ConfidenceFusion`)
    # requests in up to this many groups of similar fragment length, each padded to its own longest
    # (`attend_by_length`): the same scores, computed over less padding
    length_groups = 3
    # the full fragment's rows (segments of the shared slices) split again by how many candidates read them
    # (`attend_by_length`): a user with many requests in the batch fills one row with dozens
    count_groups = 2

    @staticmethod
    def events_read(fragments: FragmentConfig) -> int | None:
        # the location, meal and integrated fragments are cut from the whole window, older than the full
        # fragment's `full_len` too: a loader that shipped only those would train on other fragments than
        # evaluation and the server cut from the window they read
        return None

    def __init__(self, config: ModelConfig = ModelConfig(), device: torch.device | None = None):
        super().__init__(config, device)
        d = config.dim
        intensity = {f: config.intensity and f in self.intensity_fragments for f in (*SIMPLIFIED, *MULTI_HEAD)}
        self.simplified = nn.ModuleDict({f: SimplifiedTargetAttention(d, intensity[f]) for f in SIMPLIFIED})
        self.multi_head = nn.ModuleDict({f: MultiHeadTargetAttention(d, config.heads, intensity=intensity[f])
                                         for f in MULTI_HEAD})
        self.set_tag = nn.Embedding(4, d)  # rows TAG_BOTH / TAG_LOCATION_ONLY / TAG_MEAL_ONLY (1-3); 0 unused

    def interest_vectors(self, batch: Batch, x: Encoded) -> list[torch.Tensor]:
        user_of = batch.candidate_requests()
        windows = SliceWindows.of(batch.fragments["full"], batch.histories, user_of)
        out = [self._simplified(name, batch, x, user_of, windows if name == "full" else None) for name in SIMPLIFIED]
        for name in MULTI_HEAD:
            def attend(cand: torch.Tensor | None, frag: Padded, users: torch.Tensor, attention=self.multi_head[name]):
                seq = x.events_at(frag.index)
                if frag.tags is not None:
                    seq = seq + gather(self.set_tag.weight, frag.tags)
                gaps = time_gaps(frag.request_times(batch.ts), batch.history["ts"], frag.index, frag.mask)
                return attention(selected(x.target, cand), seq, gaps, frag.mask, users)
            out.append(attend_by_length(batch.fragments[name], user_of, attend, self.length_groups))
        if not self.config.intensity:
            return out
        # each fragment's counts of the candidate's shop and category after its vector (`matched_counts`)
        return [torch.cat([vector, fragment_counts(batch, batch.fragments[name], user_of, MATCHED_TAG.get(name),
                                                   windows if name == "full" else None)], 1)
                for name, vector in zip((*SIMPLIFIED, *MULTI_HEAD), out)]

    def _simplified(self, name: str, batch: Batch, x: Encoded, user_of: torch.Tensor,
                    windows: SliceWindows | None) -> torch.Tensor:
        attention = self.simplified[name]
        if windows is None:
            def attend(cand: torch.Tensor | None, frag: Padded, users: torch.Tensor) -> torch.Tensor:
                return attention(selected(x.target, cand), x.events_at(frag.index), frag.mask, users)
            return attend_by_length(batch.fragments[name], user_of, attend, self.length_groups)

        def attend_windows(cand: torch.Tensor | None, rows: Padded, users: torch.Tensor) -> torch.Tensor:
            # the shared slices' events once; each candidate's own window masked in them
            return attention.over_windows(selected(x.target, cand), x.events_at(rows.index), selected(windows.start, cand),
                                          selected(windows.length, cand), users)
        return attend_by_length(windows.rows, windows.row_of, attend_windows, self.length_groups, self.count_groups)
