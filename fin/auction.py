"""Ad auctions over many requests at once: which candidate gets which slot, and what it pays per click.

Candidates are ranked by expected revenue per impression, `quality x bid` (quality: the click
probability a policy believes in; a model's pCTR, the simulator's true relevance, the logging policy's
own factor). Candidates bidding below the reserve price are not shown. Prices per click:
- "gsp" (generalised second price, the default): the ad ranked k pays the least it could have bid and
  kept its rank, `quality x bid` of the ad ranked k + 1 divided by its own quality, at least the reserve
  and at most its own bid; the last ranked ad pays the reserve;
- "first_price": every shown ad pays its bid.
Everything is vectorised over the flat candidate arrays of many requests (numpy; no loops over rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RULES = ("gsp", "first_price")


@dataclass(frozen=True)
class AuctionConfig:
    rule: str = "gsp"
    slots: int | None = None  # ads shown per request; None: as many as the logging policy showed (replay sets it)
    reserve: float = 0.0  # least price per click; candidates that bid less are not shown

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"auction rule {self.rule!r} is not one of {', '.join(RULES)}")
        if (self.slots is not None and self.slots < 1) or self.reserve < 0:
            raise ValueError(f"an auction needs slots >= 1 and reserve >= 0, got {self.slots} and {self.reserve}")


def ranks(request: np.ndarray, key: np.ndarray, eligible: np.ndarray | None = None) -> np.ndarray:
    """Each candidate's rank within its request by `key`, highest first (ties: the earlier row first);
    -1 for candidates that are not eligible."""
    eligible = np.ones(request.shape, bool) if eligible is None else eligible
    rows = np.flatnonzero(eligible)
    order = rows[np.lexsort((rows, -key[rows], request[rows]))]
    sorted_request = request[order]
    starts = np.flatnonzero(np.r_[True, sorted_request[1:] != sorted_request[:-1]]) if order.size else order
    first = np.repeat(starts, np.diff(np.r_[starts, order.size]))
    out = np.full(request.shape, -1, dtype=np.int64)
    out[order] = np.arange(order.size) - first
    return out


def prices(request: np.ndarray, rank: np.ndarray, quality: np.ndarray, bid: np.ndarray,
           config: AuctionConfig) -> np.ndarray:
    """Price per click of every candidate ranked within the first `slots` (0 for the others), given any
    ranking (`rank` -1: not ranked). GSP prices each ad with the ad ranked right below it."""
    if config.slots is None:
        raise ValueError("the auction's number of slots is not set")
    shown = (rank >= 0) & (rank < config.slots)
    if config.rule == "first_price":
        return np.where(shown, bid, 0.0)
    ranked = np.flatnonzero(rank >= 0)
    order = ranked[np.lexsort((rank[ranked], request[ranked]))]
    below = np.zeros(request.shape)  # quality x bid of the ad ranked right below (0: none)
    same = request[order][1:] == request[order][:-1]
    below[order[:-1][same]] = (quality * bid)[order[1:][same]]
    with np.errstate(divide="ignore", invalid="ignore"):
        second = np.where(quality > 0, below / quality, 0.0)
    return np.where(shown, np.minimum(bid, np.maximum(config.reserve, second)), 0.0)


def auction(request: np.ndarray, quality: np.ndarray, bid: np.ndarray,
            config: AuctionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Run every request's auction: the slot of each candidate (-1: not shown) and its price per click."""
    rank = ranks(request, quality * bid, bid >= config.reserve)
    return np.where(rank < config.slots, rank, -1), prices(request, rank, quality, bid, config)
