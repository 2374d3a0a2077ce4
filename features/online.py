"""User timelines in the Feast online store: one online read for a batch of users, and a fast bulk write.

Feast's own write path (`write_to_online_store`) builds every list value element by element in Python,
about 90 µs per 1,000-event list; a run writes one list per user and timeline field (13 x users). Here
the list values are encoded for a whole column at once with numpy, as the protobuf bytes Feast stores,
then handed to the online store as ValueProtos through the provider's `online_write_batch`: the same
store API Feast's path ends in, so the stored values and any online store (sqlite, Redis) are unchanged.
Feast itself is imported only where a store is written: the import takes seconds, and the features
job's Ray workers, which only encode, never pay it.
"""

from __future__ import annotations

import contextlib
import io
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl

from features.dataset import EVENT_TIMESTAMP, STATS_VIEWS, TIMELINE_VIEW, Dataset
from features.sequences import TIMELINE_FIELDS

TIMELINE_FEATURES = [f"{TIMELINE_VIEW}:{f}" for f in TIMELINE_FIELDS]
ENTITY = "user_id"
# Protobuf wire tags: Value.int64_list_val (field 14) and Int64List.val (field 1), both length-delimited
_INT64_LIST_VAL, _VAL = bytes([14 << 3 | 2]), bytes([1 << 3 | 2])


def read_timelines(store, user_ids: list[int]) -> list[dict[str, np.ndarray] | None]:
    """Each user's stored timeline (TIMELINE_FIELDS -> int64 array, oldest first), or None if unknown."""
    response = store.get_online_features(features=TIMELINE_FEATURES,
                                         entity_rows=[{ENTITY: int(u)} for u in user_ids]).to_dict()
    out: list[dict[str, np.ndarray] | None] = []
    for i in range(len(user_ids)):
        if response[TIMELINE_FIELDS[0]][i] is None:
            out.append(None)
        else:
            out.append({f: np.asarray(response[f][i], dtype=np.int64) for f in TIMELINE_FIELDS})
    return out


def encode_timelines(timelines: pl.DataFrame) -> pl.DataFrame:
    """A `user_timeline` source frame (user_id, TIMELINE_FIELDS lists, event_timestamp) -> the same rows
    with each list replaced by its serialised ValueProto (a Binary column): what `write_encoded_timelines`
    stores. Encoding is the costly part of a write, and it can run where the frame was built."""
    return timelines.select(ENTITY, EVENT_TIMESTAMP, *(pl.Series(f, int64_list_bytes(timelines[f]), dtype=pl.Binary)
                                                 for f in TIMELINE_FIELDS))


def write_encoded_timelines(store, encoded: pl.DataFrame) -> int:
    """Write the rows of an `encode_timelines` frame to the online store; returns the rows written."""
    from feast.infra.provider import get_provider
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    if encoded.height == 0:
        return 0
    keys = [EntityKeyProto(join_keys=[ENTITY], entity_values=[ValueProto(int64_val=u)])
            for u in encoded[ENTITY].to_list()]
    stamps = encoded[EVENT_TIMESTAMP].cast(pl.Datetime("us", "UTC")).to_list()  # timezone-aware datetimes
    values = [map(ValueProto.FromString, encoded[f].to_list()) for f in TIMELINE_FIELDS]
    rows = [(key, dict(zip(TIMELINE_FIELDS, row)), stamp, None) for key, stamp, row in zip(keys, stamps, zip(*values))]
    get_provider(store.config).online_write_batch(store.config, store.get_feature_view(TIMELINE_VIEW), rows,
                                                  progress=None)
    return len(rows)


def timelines_before(timelines: pl.DataFrame, cutoff_ms: int, max_len: int) -> pl.DataFrame:
    """Offline timelines (one row per user, TIMELINE_FIELDS lists in time order) -> each user's newest
    `max_len` events before `cutoff_ms`, as a `user_timeline` source frame (the event time is the newest
    event's, or the cutoff for a user with none yet)."""
    before = pl.col("ts").list.eval((pl.element() < cutoff_ms).sum()).list.first().fill_null(0).cast(pl.Int64)
    start = pl.max_horizontal(before - max_len, 0)
    cut = timelines.with_columns(_start=start, _len=before - start)
    return cut.select(
        ENTITY, *(pl.col(f).list.slice(pl.col("_start"), pl.col("_len")) for f in TIMELINE_FIELDS),
        pl.when(pl.col("_len") > 0).then(pl.col("ts").list.get(pl.col("_start") + pl.col("_len") - 1, null_on_oob=True))
        .otherwise(cutoff_ms).cast(pl.Datetime("ms", "UTC")).alias(EVENT_TIMESTAMP))


def write_as_of(store, data, cutoff_ms: int, max_len: int, timelines: bool = True) -> int:
    """Write into the online store what a features run over the logs before `cutoff_ms` leaves there: each
    user's newest `max_len` events before it (through the job's own encoding and write) and, through Feast's
    materialisation, each item's and shop's newest statistics row at or before it (a local day's start:
    the statistics of that day). With `timelines=False` only the statistics (a day of real-time serving).
    Returns the timelines written.

    For replaying logged days against a server: a copy of the store is set back to the first day, then
    moved forward a day at a time. Feast's sqlite store takes any event time; its Redis store keeps the
    newer of two writes, so only a fresh Redis store can be set back."""
    written = 0
    if timelines:
        offline = pl.read_parquet(Dataset.at(data).timelines / "*.parquet").select(ENTITY, *TIMELINE_FIELDS)
        written = write_encoded_timelines(store, encode_timelines(timelines_before(offline, cutoff_ms, max_len)))
    cutoff = datetime.fromtimestamp(cutoff_ms / 1000, tz=timezone.utc)
    with contextlib.redirect_stdout(io.StringIO()):  # Feast prints its progress
        store.materialize(start_date=cutoff - timedelta(days=1) + timedelta(milliseconds=1),
                          end_date=cutoff + timedelta(milliseconds=1), feature_views=list(STATS_VIEWS.values()))
    return written


def int64_list_bytes(column: pl.Series) -> list[bytes]:
    """The serialised ValueProto(int64_list_val=Int64List(val=row)) of every row, encoded column-wise:
    each element is a varint of its two's-complement uint64 (10 bytes when negative), packed after the
    field's tag and byte length. A null row encodes as an empty list."""
    lists = column.cast(pl.List(pl.Int64)).rechunk().to_arrow()
    flat = lists.flatten()
    if flat.null_count:
        raise ValueError(f"{column.name}: null inside a list; a timeline holds no nulls")
    payload, sizes = _varints(flat.to_numpy().view(np.uint64))
    payload = payload.tobytes()
    list_ends = np.cumsum(lists.value_lengths().fill_null(0).to_numpy())
    ends = list_ends if sizes is None else np.concatenate([[0], np.cumsum(sizes)])[list_ends]
    out = []
    start = 0
    for end in ends.tolist():
        inner = _VAL + _varint(end - start) + payload[start:end] if end > start else b""
        out.append(_INT64_LIST_VAL + _varint(len(inner)) + inner)
        start = end
    return out


def _varints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The varints of uint64 `values`, concatenated (low 7 bits first, the top bit set on all but the last
    byte), and each one's size (None when all are 1 byte). Every value's bytes fill a row of a
    [values, longest] matrix; a mask keeps each row's first `size` bytes, in row order."""
    width = max(1, (int(values.max(initial=0)).bit_length() + 6) // 7)
    if width == 1:  # small codes (hours, actions, ...): the bytes are the values
        return values.astype(np.uint8), None
    sizes = np.ones(values.size, dtype=np.int64)
    for k in range(1, width):
        sizes += values >= np.uint64(1 << 7 * k)
    if width <= 4:  # below 2**28: halve the memory traffic
        values = values.astype(np.uint32)
    low, seven = values.dtype.type(0x7F), values.dtype.type(7)
    lanes = np.empty((values.size, width), dtype=np.uint8)
    for k in range(width):
        lanes[:, k] = (values & low).astype(np.uint8) | ((sizes > k + 1).view(np.uint8) << 7)
        values = values >> seven
    return lanes[np.arange(width) < sizes[:, None]], sizes


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
