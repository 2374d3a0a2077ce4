"""An Ingest call's behaviour events -> contract-checked timeline events for the real-time store.

Each event is checked on its own against the contract's `behaviours` table by the contract's rules
(`features.validate.check_arrays`), and accepted events become timeline rows by the job's derivation
(`features.sequences.timeline_arrays`): both are the numpy twins of the features job's polars path, kept
equal to it by tests, because a call holds a few events and a polars query costs a millisecond. So an
ingested event reads exactly as the same event will after the next features run. Plain data in, plain data
out: the server calls it, tests can too.
"""

from __future__ import annotations

import datetime as dt
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from features import contract, sequences
from features.validate import check_arrays

# BehaviourEvent fields by the contract's column names; ids read 0 (event ids and actions: a negative one) and
# cells "" as unknown (null): the contract then refuses a required one as null
_INTS = {"event_id": "event_id", "user_id": "user_id", "ts": "ts_ms", "action": "action", "shop_id": "shop_id",
         "item_id": "item_id", "category_1_id": "category_id", "brand_id": "brand_id", "shop_aoi_id": "shop_aoi_id",
         "aoi_id": "aoi_id", "city_id": "city_id"}
_CELLS = {"shop_geohash_6": "shop_geohash", "geohash_6": "geohash"}
_NEGATIVE_UNKNOWN = ("event_id", "action")  # where 0 is a value (an id, a click), a negative one is unknown
_FIELDS = operator.attrgetter(*_INTS.values(), "price", *_CELLS.values())
_WINDOW_START_MS = 946_684_800_000  # 2000-01-01: earlier times are typing errors, not behaviour
_FUTURE_MS = 86_400_000  # times up to a day ahead of the server's clock are accepted (clock skew)


@dataclass
class CheckedEvents:
    behaviours: pa.Table  # accepted events as the contract's behaviours table, typed (for the log)
    events: pl.DataFrame  # the same as timeline rows: event_id, user_id, TIMELINE_FIELDS
    refused: list[tuple[int, str]]  # (index in the call, reasons)
    checked: np.ndarray  # the indices of the accepted events kept: all but repeats of an earlier one's id
    repeats: int  # accepted events whose id an earlier accepted one had (kept once, counted as duplicates)


def message_columns(messages, utc_offset_hours: float) -> dict[str, np.ndarray]:
    """BehaviourEvent messages -> the contract's `behaviours` columns: numbers as numpy masked arrays (masked:
    null), cells as object arrays (None: null, else cut to the contract's 6 characters), and the local time
    fields derived from the time."""
    values = list(zip(*map(_FIELDS, messages))) if len(messages) else [()] * (len(_INTS) + 1 + len(_CELLS))
    columns = {}
    for i, name in enumerate(_INTS):
        ids = np.array(values[i], np.int64)
        unknown = ids < 0 if name in _NEGATIVE_UNKNOWN else np.zeros(ids.size, bool) if name == "ts" else ids <= 0
        columns[name] = np.ma.masked_array(ids, unknown)
    columns["price"] = np.ma.masked_array(np.array(values[len(_INTS)], np.float64), np.zeros(len(messages), bool))
    for i, name in enumerate(_CELLS):
        columns[name] = np.array([cell[:6] if cell else None for cell in values[len(_INTS) + 1 + i]], object)
    for name, field in contract.local_time_fields(columns["ts"].data, utc_offset_hours).items():
        columns[name] = np.ma.masked_array(field, np.zeros(field.size, bool))
    return columns


def _arrow(column: np.ndarray) -> pa.Array:
    """A `message_columns` column as Arrow (nulls where masked or None)."""
    if column.dtype == object:
        return pa.array(column.tolist(), pa.string())  # the only text columns are geohash cells
    return pa.array(np.ma.getdata(column), mask=np.ma.getmaskarray(column))


def behaviour_table(columns: dict[str, np.ndarray]) -> pa.Table:
    """Checked `message_columns` -> the contract's `behaviours` table (each column cast to its type)."""
    schema = contract.BEHAVIOURS.schema
    return pa.Table.from_arrays([_arrow(columns[f.name]).cast(f.type, safe=False) for f in schema], schema=schema)


def behaviour_rows(messages, utc_offset_hours: float) -> pl.DataFrame:
    """BehaviourEvent messages -> unchecked rows of the contract's `behaviours` columns, as a log holds them
    before validation (wide types: nothing is cast before it is checked)."""
    return pl.DataFrame({name: _arrow(column) for name, column in message_columns(messages, utc_offset_hours).items()})


def check_events(messages, utc_offset_hours: float, now_ms: int | None = None) -> CheckedEvents:
    """Accept or refuse each event of one call (a reason per refused one); accepted ones as timeline rows, in
    time order. Checked by `features.validate.check_arrays` (the contract's rules, as the job checks them)
    and turned into timeline rows by `features.sequences.timeline_arrays` (the job's derivation): numpy for
    a call's few events, kept equal to the job's polars path by tests."""
    now_ms = now_ms if now_ms is not None else int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
    columns = message_columns(messages, utc_offset_hours)
    # every event is checked (ids for form: the world tables live with the job), then of the accepted ones
    # each id's first copy is kept (a retry in one call: one event, counted as a duplicate; the job drops such
    # an exact copy too); a refused copy keeps no later copy of its id from being stored
    checks = check_arrays(contract.BEHAVIOURS, columns, (_WINDOW_START_MS, now_ms + _FUTURE_MS))
    failed = np.column_stack([bad for _, bad in checks])
    bad = failed.any(axis=1)
    refused = [(int(row), ";".join(name for (name, _), fails in zip(checks, failed[row]) if fails))
               for row in np.flatnonzero(bad)]
    good = np.flatnonzero(~bad)  # each with an id: a missing one is refused
    index = np.sort(good[np.unique(columns["event_id"].data[good], return_index=True)[1]])
    accepted = {name: column[index] for name, column in columns.items()}
    events = pl.DataFrame(sequences.timeline_arrays(accepted)) if len(accepted["ts"]) else pl.DataFrame()
    return CheckedEvents(behaviours=behaviour_table(accepted), events=events, refused=refused,
                         checked=index, repeats=len(good) - len(index))


@dataclass(frozen=True)
class CallResult:
    accepted: int  # events now in their users' timelines (new ones and repeats)
    duplicates: int  # of them, those whose id was stored already or came earlier in the group
    refused: list[tuple[int, str]]  # (index in the call, reasons)


def ingest_calls(calls: Sequence[Sequence], utc_offset_hours: float, log, realtime,
                 now_ms: int | None = None) -> list[CallResult]:
    """Check the events of several Ingest calls as one group, make the accepted ones durable in the
    behaviour `log` (`features.behaviour_log.BehaviourLog`), then add them to the `realtime` store
    (`features.realtime`), all before any call is answered: one check, one fsynced log append and one store
    transaction for the group (a group commit), so calls from many clients share those costs instead of
    queueing behind each other. Each call gets what it would get alone: an event whose id came in an
    earlier call of the group counts as a duplicate, as it would after that call."""
    sizes = np.array([len(events) for events in calls])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    checked = check_events([event for events in calls for event in events], utc_offset_hours, now_ms)
    appended = None
    if checked.events.height:
        log.append(checked.behaviours)
        appended = realtime.append(checked.events)
    total = int(starts[-1])
    refused = np.zeros(total, bool)
    refused[[i for i, _ in checked.refused]] = True
    repeat = ~refused  # a repeat of an earlier accepted event's id in the group
    repeat[checked.checked] = False
    held = np.zeros(total, bool)  # an accepted event whose id the store held already
    if appended is not None and appended.duplicate_ids:
        ids = np.array([event.event_id for call in calls for event in call], np.int64)
        held[checked.checked] = np.isin(ids[checked.checked], list(appended.duplicate_ids))
    duplicates = repeat | (held & ~refused)
    out = []
    for call, (lo, hi) in enumerate(zip(starts[:-1].tolist(), starts[1:].tolist())):
        reasons = [(i - lo, reason) for i, reason in checked.refused if lo <= i < hi]
        out.append(CallResult(accepted=int(sizes[call]) - len(reasons), duplicates=int(duplicates[lo:hi].sum()),
                              refused=reasons))
    return out


def behaviour_events(rows: pl.DataFrame) -> list:
    """Rows of the contract's behaviours table -> BehaviourEvent messages (nulls as the message's unknowns):
    what a client of Ingest sends, e.g. `fin ingest` replaying a log folder."""
    from serving.pb import ctr_scoring_pb2 as pb

    # (an unknown event id or action is -1 on the wire: 0 is an id, and a click)
    ints = rows.select(*[pl.col(c).cast(pl.Int64).fill_null(-1 if c in _NEGATIVE_UNKNOWN else 0).alias(f)
                         for c, f in _INTS.items()])
    cells = rows.select(*[pl.col(c).fill_null("").alias(f) for c, f in _CELLS.items()])
    prices = rows["price"].cast(pl.Float64).fill_null(0.0).to_list()
    return [pb.BehaviourEvent(**i, **c, price=p)
            for i, c, p in zip(ints.iter_rows(named=True), cells.iter_rows(named=True), prices)]
