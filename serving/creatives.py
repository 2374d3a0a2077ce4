"""The creative embeddings a request's items need, for models that read creatives (`ModelConfig.image_dim`).

Embeddings come from the Feast online store's `item_creative` view (what `fin embed-creatives` materialised;
training read the same values from the view's source), behind a bounded row cache. A candidate whose item
has none there yet (a new ad) is embedded in-process from the request's `creative_png` by the repository's
creative encoder (the model `fin embed-creatives` ran), at most `max_embedded` per request; the result is
cached like a stored row, so the next request for that ad reads it. A candidate with neither is scored
without an image (as training saw items without a creative) and the response says so.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from features.creatives import decode_pngs
from features.item_embeddings import CREATIVE_VIEW, EMBEDDING, ItemEmbeddings
from fin.vision import images_tensor
from serving.config import CreativeConfig
from serving.online import RowCache


@dataclass
class RequestCreatives:
    """A request's embeddings, and which candidates had theirs computed here or had none."""

    embeddings: ItemEmbeddings
    embedded: np.ndarray  # int32 candidate positions
    missing: np.ndarray  # int32 candidate positions


class BadCreative(ValueError):
    """A request's creative that is not a PNG of the encoder's size: the client's error."""


class CreativeEmbeddings:
    def __init__(self, store, config: CreativeConfig = CreativeConfig()):
        self.store, self.config = store, config
        # a cache per width (models of two encoders' widths may be served at once), made at its first read
        self._caches: dict[int, RowCache] = {}
        self._lock = threading.Lock()

    def _cache(self, width: int) -> RowCache:
        with self._lock:
            if width not in self._caches:
                self._caches[width] = RowCache(self.config.cache_size, width, self.config.staleness_s)
            return self._caches[width]

    def cached(self, items: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        return self._cache(width).get(items)

    def read(self, items: np.ndarray, width: int, store: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Rows [n, width] of distinct `items` and whether each was found: the cache, then (unless not `store`)
        the store (on the caller's thread: a store read blocks)."""
        rows, found = self.cached(items, width)
        if found.all() or not store:
            return rows, found
        absent = items[~found]
        response = self.store.get_online_features(features=[f"{CREATIVE_VIEW}:{EMBEDDING}"],
                                                  entity_rows=[{"item_id": int(i)} for i in absent]).to_dict()
        values = response[EMBEDDING]
        got = np.array([v is not None and len(v) == width for v in values], bool)
        if got.any():
            read = np.array([v for v, ok in zip(values, got) if ok], np.float32)
            self._cache(width).put(absent[got], read)
            rows[np.flatnonzero(~found)[got]] = read
            found[np.flatnonzero(~found)[got]] = True
        return rows, found

    def embed(self, encoder, pngs: list[bytes], names: list[str]) -> np.ndarray:
        """Embeddings [n, E] of PNG creatives by the creative encoder (a `serving.vision.VisionModel`);
        raises BadCreative naming (by `names`) a creative that is not a PNG of the encoder's size."""
        try:
            pixels = decode_pngs(pngs, encoder.inputs[0].shape[-1], names)
        except ValueError as e:
            raise BadCreative(str(e)) from None
        return encoder.infer({encoder.inputs[0].name: images_tensor(pixels)})[EMBEDDING].numpy()

    def for_request(self, candidate_items: np.ndarray, pngs: list[bytes], history_items: np.ndarray, width: int,
                    encoder, store: bool = True) -> RequestCreatives:
        """The request's embeddings: stored (cached; with `store` False, cached only) rows of every item,
        creatives embedded for candidates without one (up to `max_embedded`; none when `encoder` is None)."""
        items = np.unique(np.concatenate([candidate_items, history_items]))
        rows, found = self.read(items, width, store)
        vectors = rows[found]
        lacking = np.flatnonzero(~np.isin(candidate_items, items[found]))
        with_creative = [int(c) for c in lacking if pngs[c]][: self.config.max_embedded if encoder else 0]
        embedded = np.zeros(0, np.int32)
        if with_creative:  # a bad creative is refused naming its candidate
            fresh = self.embed(encoder, [pngs[c] for c in with_creative],
                               [f"candidates[{c}].creative_png" for c in with_creative])
            new_items = candidate_items[with_creative]
            _, first = np.unique(new_items, return_index=True)
            self._cache(width).put(new_items[first], fresh[first])
            vectors = np.concatenate([vectors, fresh[first]])
            known_items = np.concatenate([items[found], new_items[first]])
            embedded = np.asarray(with_creative, np.int32)
        else:
            known_items = items[found]
        missing = np.setdiff1d(lacking, embedded).astype(np.int32)
        return RequestCreatives(ItemEmbeddings.of(known_items, vectors), embedded, missing)
