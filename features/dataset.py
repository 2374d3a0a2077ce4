"""The offline dataset: the folder `fin features` writes and every offline reader opens.

One owner for its layout (docs/design.md, "Offline dataset"): the folders, the splits, the id of each
kind of row, the Feast feature views built over it and the schema of the point-in-time statistics. The
features pipeline writes through these names; the training loader, evaluation, revenue replay, the Feast
definitions and the online readers read through them.

    OUT/                                   the output folder of `fin features`
        data/                              the dataset of one run (`Dataset`; replaced as a whole by the next)
            timelines/part-P.parquet                   one row per user, list columns (the full history)
            examples/{train,validation,test}/part-P.parquet   one row per impression, with `history_len`
            candidates/{validation,test}/part-P.parquet       every logged ad candidate of the split's requests
            feast_sources/user_timeline/part-P.parquet        each user's last events (what serving reads)
            feast_sources/{item,shop}_stats.parquet    point-in-time daily statistics
            feast_sources/item_creative.parquet        creative embeddings (`fin embed-creatives`)
            creatives.parquet                          the logs' validated creatives (when they have any)
            quarantine/<table>/part-P.parquet          bad log rows with a reason
            stats.json, run.json                       counts, and the run's timings
        feast/                             the Feast repository (kept across runs)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

DATA, FEAST = "data", "feast"  # inside the output folder of `fin features`
SPLITS = ("train", "validation", "test")
EVALUATION_SPLITS = ("validation", "test")  # the splits whose ad candidates are kept (for revenue replay)

# The kinds of rows a split holds, and the id that names a row of each (to join predictions back)
EXAMPLES, CANDIDATES = "examples", "candidates"
ROW_IDS = {EXAMPLES: "impression_id", CANDIDATES: "candidate_id"}

# Feast: the feature views over feast_sources/, and the timestamp column of every source
TIMELINE_VIEW = "user_timeline"
STATS_VIEWS = {"item_id": "item_stats", "shop_id": "shop_stats"}  # entity key -> its statistics view
EVENT_TIMESTAMP = "event_timestamp"

# The point-in-time statistics of an item or shop on a day: these measures over each window of days before it
STAT_WINDOWS = (7, 30)
STAT_MEASURES = ("impressions", "clicks", "ctr")
STAT_COLUMNS = tuple(f"{m}_{w}d" for w in STAT_WINDOWS for m in STAT_MEASURES)
STAT_FLOATS = frozenset(c for c in STAT_COLUMNS if c.startswith("ctr"))  # the rest are counts

PART = "part-{:05d}.parquet"  # partition P's file in every partitioned folder


@dataclass(frozen=True)
class Dataset:
    """The `data/` folder of one features run."""

    root: Path

    @classmethod
    def at(cls, path: str | Path) -> Dataset:
        """The dataset at `path`: the output folder of `fin features` or its `data/` folder (either may be
        passed as --data)."""
        path = Path(path)
        inner = path / DATA
        return cls(inner if not (path / EXAMPLES).is_dir() and (inner / EXAMPLES).is_dir() else path)

    def rows(self, kind: str, split: str) -> Path:
        """The folder of one split of examples or candidates."""
        if kind not in ROW_IDS:
            raise ValueError(f"{kind!r} is not one of {', '.join(ROW_IDS)}")
        if split not in SPLITS:
            raise ValueError(f"{split!r} is not one of {', '.join(SPLITS)}")
        return self.root / kind / split

    def parts(self, kind: str, split: str) -> list[Path]:
        """The partition files of one split, in partition order."""
        return sorted(self.rows(kind, split).glob("*.parquet"))

    def scan(self, kind: str, split: str) -> pl.LazyFrame:
        """One split's rows, all partitions; an error naming the folder when it has none."""
        parts = self.parts(kind, split)
        if not parts:
            raise FileNotFoundError(f"no {split} {kind} under {self.root / kind} (run fin features first)")
        return pl.scan_parquet(parts)

    @property
    def timelines(self) -> Path:
        return self.root / "timelines"

    def timeline_part(self, part: Path) -> Path:
        """The timelines of the users of a partition file of examples or candidates (the same name)."""
        return self.timelines / part.name

    @property
    def feast_sources(self) -> Path:
        return self.root / "feast_sources"

    def stats_source(self, key: str) -> Path:
        """The statistics file of an entity key (item_id, shop_id)."""
        return self.feast_sources / f"{STATS_VIEWS[key]}.parquet"

    def online_timelines(self) -> Path:
        return self.feast_sources / TIMELINE_VIEW

    @property
    def creatives(self) -> Path:
        """The validated creatives of the run's logs (absent when the logs have none)."""
        return self.root / "creatives.parquet"

    def quarantine(self, table: str) -> Path:
        return self.root / "quarantine" / table

    @property
    def stats_file(self) -> Path:
        return self.root / "stats.json"

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"
