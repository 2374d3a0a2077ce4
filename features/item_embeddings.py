"""Creative embeddings by item: the `item_creative` feature view's values, as every reader looks them up.

The embedding job writes one row per item with a creative (item_id, embedding, event_timestamp) to the
view's source file; training and evaluation load that file into an `ItemEmbeddings`, the server fills one
per request from the online store (the same view, materialised), and both hand the model rows of it
(`fin.inputs.ItemImages`). Row 0 is the embedding of an item without one: zeros, flagged unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.dataset import EVENT_TIMESTAMP, Dataset

CREATIVE_VIEW = "item_creative"  # the Feast feature view (entity: item)
EMBEDDING = "embedding"  # its one feature: float32 [E]


def embeddings_source(data: Dataset) -> Path:
    """The view's source file inside a features run's dataset."""
    return data.feast_sources / f"{CREATIVE_VIEW}.parquet"


def embeddings_width(data: Dataset) -> int:
    """The width of the creative embeddings the embedding job wrote into a features run (0: none)."""
    source = embeddings_source(data)
    return ItemEmbeddings.read(source).dim if source.exists() else 0


@dataclass(frozen=True)
class ItemEmbeddings:
    """Embeddings of items: `ids` sorted [K], `vectors` [K + 1, E] with row 0 all zeros (no embedding)."""

    ids: np.ndarray
    vectors: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @classmethod
    def of(cls, ids: np.ndarray, vectors: np.ndarray) -> ItemEmbeddings:
        """From ids in any order and their vectors [K, E] (the last of a repeated id wins)."""
        ids = np.asarray(ids, np.int64)
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise ValueError(f"{len(ids)} ids need vectors [{len(ids)}, E], got {list(vectors.shape)}")
        last = len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]  # each id's last row
        order = last[np.argsort(ids[last], kind="stable")]
        return cls(ids[order], np.concatenate([np.zeros((1, vectors.shape[1]), np.float32), vectors[order]]))

    @classmethod
    def read(cls, path: str | Path) -> ItemEmbeddings:
        table = pq.read_table(path, columns=["item_id", EMBEDDING])
        column = table[EMBEDDING].combine_chunks()
        width = len(column[0]) if len(column) else 0
        vectors = column.flatten().to_numpy().reshape(-1, width) if len(column) else np.zeros((0, 0), np.float32)
        return cls.of(table["item_id"].to_numpy(), vectors)

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Each id's row of `vectors` [n] (0 where it has no embedding)."""
        item_ids = np.asarray(item_ids, np.int64)
        at = np.searchsorted(self.ids, item_ids).clip(max=max(len(self.ids) - 1, 0))
        found = (self.ids[at] == item_ids) if len(self.ids) else np.zeros(item_ids.shape, bool)
        return np.where(found, at + 1, 0)


def write_embeddings(path: str | Path, item_ids: np.ndarray, vectors: np.ndarray, timestamp_ms: int) -> None:
    """The view's source file: one row per item, all stamped `timestamp_ms` (the creatives' snapshot time)."""
    vectors = np.asarray(vectors, np.float32)
    table = pa.table({
        "item_id": pa.array(np.asarray(item_ids, np.int64)),
        # (no creatives: no rows, and no width to cut them by)
        EMBEDDING: pa.FixedSizeListArray.from_arrays(vectors.ravel(), vectors.shape[1]).cast(pa.list_(pa.float32()))
        if len(vectors) else pa.array([], pa.list_(pa.float32())),
        EVENT_TIMESTAMP: pa.array(np.full(len(item_ids), timestamp_ms, np.int64)).cast(pa.timestamp("ms", "UTC")),
    })
    tmp = Path(str(path) + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
