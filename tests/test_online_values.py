"""The column-wise encoding of timeline lists for the online store equals protobuf's own serialisation."""

import polars as pl
import pytest
from feast.protos.feast.types.Value_pb2 import Int64List
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from hypothesis import given, settings
from hypothesis import strategies as st

from features.online import encode_timelines, int64_list_bytes
from features.sequences import TIMELINE_FIELDS

int64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-2, 300), st.integers(2**27, 2**29))
rows = st.lists(st.one_of(st.none(), st.lists(int64, max_size=12)), min_size=1, max_size=20)


def _protobuf(row: list[int] | None) -> bytes:
    return ValueProto(int64_list_val=Int64List(val=row or [])).SerializeToString()


@settings(max_examples=300, deadline=None)
@given(rows, st.data())
def test_bytes_equal_protobuf_serialisation(values, data):
    column = pl.Series("f", values, dtype=pl.List(pl.Int64))
    assert int64_list_bytes(column) == [_protobuf(r) for r in values]
    # a slice of a column (a filtered partition) starts inside the list buffer
    offset = data.draw(st.integers(0, len(values) - 1))
    part = column.slice(offset)
    assert int64_list_bytes(part) == [_protobuf(r) for r in values[offset:]]
    encoded = encode_timelines(pl.DataFrame({"user_id": range(len(values))}).with_columns(
        event_timestamp=pl.lit(0).cast(pl.Datetime("ms", "UTC")), **{f: column for f in TIMELINE_FIELDS}).slice(offset))
    decoded = [list(ValueProto.FromString(b).int64_list_val.val) for b in encoded[TIMELINE_FIELDS[-1]]]
    assert decoded == [r or [] for r in values[offset:]]


def test_narrow_integer_lists_are_widened():
    column = pl.Series("hours", [[0, 23], [7]], dtype=pl.List(pl.Int8))
    assert int64_list_bytes(column) == [_protobuf([0, 23]), _protobuf([7])]


def test_null_inside_a_list_is_refused():
    with pytest.raises(ValueError, match="null inside a list"):
        int64_list_bytes(pl.Series("ts", [[1, None]], dtype=pl.List(pl.Int64)))
