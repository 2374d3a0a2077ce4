"""An Ingest call's behaviour events -> contract-checked timeline events for the real-time store.

Each event is checked on its own with the features job's own validator against the contract's
`behaviours` table (`features.validate.validate_table`), and accepted events become timeline rows through
the job's own `features.sequences.timeline_events`, so an ingested event reads exactly as the same event
will after the next features run. Plain data in, plain data out: the server calls it, tests can too.
"""

from __future__ import annotations

import datetime as dt
import operator
from dataclasses import dataclass

import numpy as np
import polars as pl

from features import contract, sequences
from features.validate import REASON, validate_table

# BehaviourEvent fields by the contract's column names; ids read 0 (event ids: a negative one) and cells ""
# as unknown (null): the contract then refuses a required one as null
_INTS = {"event_id": "event_id", "user_id": "user_id", "ts": "ts_ms", "action": "action", "shop_id": "shop_id",
         "item_id": "item_id", "category_1_id": "category_id", "brand_id": "brand_id", "shop_aoi_id": "shop_aoi_id",
         "aoi_id": "aoi_id", "city_id": "city_id"}
_CELLS = {"shop_geohash_6": "shop_geohash", "geohash_6": "geohash"}
_FIELDS = operator.attrgetter(*_INTS.values(), "price", *_CELLS.values())
_INDEX = "_index"
_WINDOW_START_MS = 946_684_800_000  # 2000-01-01: earlier times are typing errors, not behaviour
_FUTURE_MS = 86_400_000  # times up to a day ahead of the server's clock are accepted (clock skew)


@dataclass
class CheckedEvents:
    behaviours: pl.DataFrame  # accepted events as rows of the contract's behaviours table (for the log)
    events: pl.DataFrame  # the same as timeline rows: event_id, user_id, TIMELINE_FIELDS
    refused: list[tuple[int, str]]  # (index in the call, reasons)
    repeats: int  # events whose id came earlier in the same call (kept once, counted as duplicates)


def behaviour_rows(messages, utc_offset_hours: float) -> pl.DataFrame:
    """BehaviourEvent messages -> rows of the contract's `behaviours` table (local time fields from the time)."""
    columns = list(zip(*map(_FIELDS, messages))) if len(messages) else [()] * (len(_INTS) + 1 + len(_CELLS))
    data = {name: np.array(columns[i], np.int64) for i, name in enumerate(_INTS)}
    frame = pl.DataFrame({**data, "price": np.array(columns[len(_INTS)], np.float64),
                          **{name: list(columns[len(_INTS) + 1 + i]) for i, name in enumerate(_CELLS)}},
                         schema_overrides={name: pl.String for name in _CELLS})
    local = contract.local_time_fields(data["ts"], utc_offset_hours)
    return frame.with_columns(
        *[pl.when(pl.col(c) > 0).then(pl.col(c)).alias(c) for c in _INTS if c not in ("event_id", "ts", "action")],
        pl.when(pl.col("event_id") >= 0).then(pl.col("event_id")).alias("event_id"),
        *[pl.when(pl.col(c) != "").then(pl.col(c).str.slice(0, 6)).alias(c) for c in _CELLS],
        **{name: pl.Series(values) for name, values in local.items()})


def check_events(messages, utc_offset_hours: float, now_ms: int | None = None) -> CheckedEvents:
    """Accept or refuse each event (a reason per refused one); accepted ones as timeline rows, in time order."""
    now_ms = now_ms if now_ms is not None else int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
    rows = behaviour_rows(messages, utc_offset_hours).with_row_index(_INDEX)
    first = rows.unique("event_id", keep="first", maintain_order=True)  # a retry inside one call: one event
    result = validate_table(first, contract.BEHAVIOURS, window=(_WINDOW_START_MS, now_ms + _FUTURE_MS),
                            known_keys={})  # ids are checked for form; the world tables live with the job
    refused = [(int(i), reason) for i, reason in result.quarantine.select(_INDEX, REASON).iter_rows()]
    events = sequences.timeline_events(result.clean, keep_event_id=True) if result.clean.height else pl.DataFrame()
    return CheckedEvents(behaviours=result.clean, events=events, refused=sorted(refused),
                         repeats=rows.height - first.height)


def behaviour_events(rows: pl.DataFrame) -> list:
    """Rows of the contract's behaviours table -> BehaviourEvent messages (nulls as the message's unknowns):
    what a client of Ingest sends, e.g. `fin ingest` replaying a log folder."""
    from serving.pb import ctr_scoring_pb2 as pb

    ints = rows.select(*[pl.col(c).cast(pl.Int64).fill_null(0).alias(f) for c, f in _INTS.items()])
    cells = rows.select(*[pl.col(c).fill_null("").alias(f) for c, f in _CELLS.items()])
    prices = rows["price"].cast(pl.Float64).fill_null(0.0).to_list()
    return [pb.BehaviourEvent(**i, **c, price=p)
            for i, c, p in zip(ints.iter_rows(named=True), cells.iter_rows(named=True), prices)]
