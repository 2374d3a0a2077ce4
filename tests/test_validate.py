"""The validator against every kind of bad row: each is quarantined with its reason, nothing is lost."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from features import contract
from features.creatives import CREATIVE_SIZE, decode_pngs, encode_png
from features.validate import ValidationConfig, validate_logs, validate_table, write_report
from tests.conftest import run_fin


@pytest.fixture()
def logs(small_logs, tmp_path) -> Path:
    out = tmp_path / "logs"
    shutil.copytree(small_logs, out)
    return out


def _behaviours(root: Path) -> pl.DataFrame:
    return pl.read_parquet(root / "behaviours" / "**" / "*.parquet", hive_partitioning=False)


def _add_bad_file(root: Path, table: str, df: pl.DataFrame, fmt: str = "parquet") -> None:
    path = root / table / "date=2099-01-01" / f"bad.{fmt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(path) if fmt == "parquet" else df.write_csv(path)


def _reasons(report, table: str) -> list[str]:
    return report.tables[table].quarantine["reason"].to_list()


def test_simulated_logs_are_clean(small_logs):
    report = validate_logs(small_logs)
    assert report.passed
    for name, t in report.tables.items():
        assert t.quarantine.height == 0, (name, t.reasons)
        assert t.clean.schema == pl.from_arrow(contract.TABLES[name].schema.empty_table()).schema


def test_every_kind_of_bad_behaviour_row_is_quarantined_with_its_reason(logs):
    good = _behaviours(logs)
    base = good.head(1)
    manifest = json.loads((logs / "manifest.json").read_text())
    max_id = good["event_id"].max()
    cases = {
        "null:user_id": base.with_columns(pl.lit(None, pl.Int64).alias("user_id")),
        "out_of_range:price": base.with_columns(pl.lit(-1.0, pl.Float32).alias("price")),
        "out_of_range:hours": base.with_columns(pl.lit(25, pl.Int8).alias("hours")),
        "out_of_range:time_type": base.with_columns(pl.lit(7, pl.Int8).alias("time_type")),
        "ts_outside_window": base.with_columns(pl.lit(manifest["window_end_ms"] + 1, pl.Int64).alias("ts")),
        "unknown_fk:user_id": base.with_columns(pl.lit(10**9, pl.Int64).alias("user_id")),
        "unknown_fk:shop_id": base.with_columns(pl.lit(10**9, pl.Int64).alias("shop_id")),
        "unknown_fk:item_id": base.with_columns(pl.lit(10**9, pl.Int64).alias("item_id")),
        "bad_geohash:geohash_6": base.with_columns(pl.lit("wtw3a!").alias("geohash_6")),
        "duplicate_id:event_id": base.with_columns(pl.col("price") + 1),  # the original's id, other values
    }
    frames = []
    for i, (reason, df) in enumerate(cases.items()):
        if reason != "duplicate_id:event_id":
            df = df.with_columns(pl.lit(max_id + 1 + i, pl.Int64).alias("event_id"))
        frames.append(df.with_columns(pl.lit(reason).alias("_expected")))
    bad = pl.concat(frames)
    _add_bad_file(logs, "behaviours", bad.drop("_expected"))

    report = validate_logs(logs, ValidationConfig(max_bad_fraction=1.0))
    t = report.tables["behaviours"]
    assert t.rows == good.height + bad.height
    assert t.clean.height + t.quarantine.height == t.rows  # nothing vanishes
    assert t.clean.height == good.height
    assert sorted(_reasons(report, "behaviours")) == sorted(cases)
    assert t.reasons == {r: 1 for r in cases}
    # the quarantined duplicate is the later row, with its values kept
    dup = t.quarantine.filter(pl.col("reason") == "duplicate_id:event_id")
    assert dup.drop("reason").equals(base.with_columns(pl.col("price") + 1))


def test_a_retried_row_is_dropped_and_a_failing_row_does_not_claim_its_id(logs):
    """An exact copy of a kept row (a delivery retried, an ingested event logged twice) is dropped, counted and
    not quarantined: the run's bad share is not raised by retries. A row that fails a check does not claim its
    id: the corrected re-send after it is kept (before, it was quarantined as a duplicate of the bad row)."""
    good = _behaviours(logs)
    new_id = good["event_id"].max() + 1
    original = good.head(1).with_columns(pl.lit(new_id, pl.Int64).alias("event_id"))
    broken = good.head(1).with_columns(pl.lit(new_id + 1, pl.Int64).alias("event_id"), pl.lit(-1.0, pl.Float32).alias("price"))
    corrected = good.head(1).with_columns(pl.lit(new_id + 1, pl.Int64).alias("event_id"))
    _add_bad_file(logs, "behaviours", pl.concat([original, original, original, broken, corrected]))

    t = validate_logs(logs, ValidationConfig(max_bad_fraction=1.0)).tables["behaviours"]
    assert t.copies == 2 and t.summary()["copies_dropped"] == 2 and "dropped 2 exact copies" in " ".join(t.notes)
    assert t.reasons == {"out_of_range:price": 1}
    assert t.clean.height + t.quarantine.height + t.copies == t.rows
    assert t.clean.filter(pl.col("event_id") == new_id).height == 1
    kept = t.clean.filter(pl.col("event_id") == new_id + 1)
    assert kept.height == 1 and kept["price"].to_list() == corrected["price"].to_list()


def test_bad_types_from_text_files(logs):
    """A CSV part with unparseable values: each goes to quarantine as bad_type, the rest are read."""
    good = _behaviours(logs).head(3).with_columns(pl.col("event_id") + 10**12)
    text = good.select(pl.all().cast(pl.String)).with_columns(
        pl.Series("ts", [str(good["ts"][0]), "yesterday", str(good["ts"][2])]),
        pl.Series("price", ["12.5", "12.5", "cheap"]),
    )
    _add_bad_file(logs, "behaviours", text, fmt="csv")
    report = validate_logs(logs, ValidationConfig(max_bad_fraction=1.0))
    assert sorted(_reasons(report, "behaviours")) == ["bad_type:price", "bad_type:ts"]
    assert report.tables["behaviours"].clean["event_id"].is_in(good["event_id"].implode()).sum() == 1


def test_impression_ranges_and_multiple_reasons(logs):
    imp = pl.read_parquet(logs / "impressions" / "**" / "*.parquet", hive_partitioning=False)
    base = imp.head(1)
    nxt = imp["impression_id"].max() + 1
    bad = pl.concat([
        base.with_columns(impression_id=pl.lit(nxt, pl.Int64), bid=pl.lit(-0.5, pl.Float32)),
        base.with_columns(impression_id=pl.lit(nxt + 1, pl.Int64), propensity=pl.lit(0.0, pl.Float32)),
        base.with_columns(impression_id=pl.lit(nxt + 2, pl.Int64), propensity=pl.lit(1.5, pl.Float32)),
        base.with_columns(impression_id=pl.lit(nxt + 3, pl.Int64), label=pl.lit(2, pl.Int8)),
        base.with_columns(impression_id=pl.lit(nxt + 4, pl.Int64), price=pl.lit(float("nan"), pl.Float32)),
        base.with_columns(impression_id=pl.lit(nxt + 5, pl.Int64), bid=pl.lit(-1.0, pl.Float32), user_id=pl.lit(None, pl.Int64)),
    ])
    _add_bad_file(logs, "impressions", bad)
    report = validate_logs(logs, ValidationConfig(max_bad_fraction=1.0))
    assert _reasons(report, "impressions") == [
        "out_of_range:bid", "out_of_range:propensity", "out_of_range:propensity", "out_of_range:label",
        "out_of_range:price", "null:user_id;out_of_range:bid"]
    assert report.tables["impressions"].reasons["out_of_range:bid"] == 2


def test_a_float_past_its_column_and_a_null_list_element_are_quarantined(logs):
    """A price too large for float32 (it cast to infinity and passed) and a candidate whose slot propensities
    hold a null (`list.any` skipped it; NaN was caught) are out of range."""
    imp = pl.read_parquet(logs / "impressions" / "**" / "*.parquet", hive_partitioning=False)
    nxt = imp["impression_id"].max() + 1
    _add_bad_file(logs, "impressions", imp.head(1).with_columns(impression_id=pl.lit(nxt, pl.Int64),
                                                               price=pl.lit(1e39, pl.Float64)))
    candidates = pl.read_parquet(logs / "ad_candidates" / "**" / "*.parquet", hive_partitioning=False)
    row = candidates.head(1)
    slots = len(row["slot_propensities"][0])
    nulled = pl.Series("slot_propensities", [[0.5] * (slots - 1) + [None]], row.schema["slot_propensities"])
    _add_bad_file(logs, "ad_candidates", row.with_columns(nulled, candidate_id=candidates["candidate_id"].max() + 1))
    report = validate_logs(logs, ValidationConfig(max_bad_fraction=1.0))
    assert _reasons(report, "impressions") == ["out_of_range:price"]
    assert _reasons(report, "ad_candidates") == ["out_of_range:slot_propensities"]


def test_missing_required_column_and_bad_world_rows(logs):
    items = pl.read_parquet(logs / "items.parquet")
    bad_items = pl.concat([items, items.head(1).with_columns(item_id=pl.lit(10**9, pl.Int64), shop_id=pl.lit(10**9, pl.Int64))])
    bad_items.write_parquet(logs / "items.parquet")
    users = pl.read_parquet(logs / "users.parquet").drop("user_id")
    users.write_parquet(logs / "users.parquet")
    report = validate_logs(logs, ValidationConfig(max_bad_fraction=1.0))
    assert _reasons(report, "items") == ["unknown_fk:shop_id"]
    assert set(report.tables["users"].reasons) == {"missing_column:user_id"}
    # with no valid user, every behaviour's user is unknown: quarantined, not dropped
    assert report.tables["behaviours"].reasons == {"unknown_fk:user_id": report.tables["behaviours"].rows}


def test_cli_writes_quarantine_and_summary_and_fails_over_threshold(logs, tmp_path):
    base = _behaviours(logs).head(5).with_columns(pl.col("event_id") + 10**12, pl.lit(-3.0, pl.Float32).alias("price"))
    _add_bad_file(logs, "behaviours", base)
    out = tmp_path / "report"
    tiny = run_fin("validate", "--logs", str(logs), "--out", str(out), "--max-bad-fraction", "0.0")
    assert tiny.returncode == 3
    assert tiny.stderr.strip().count("\n") == 0 and "behaviours" in tiny.stderr
    summary = json.loads((out / "validation.json").read_text())
    assert summary["tables"]["behaviours"]["reasons"] == {"out_of_range:price": 5}
    assert summary["passed"] is False
    q = pl.read_parquet(out / "quarantine" / "behaviours.parquet")
    assert q.height == 5 and set(q["reason"]) == {"out_of_range:price"}
    ok = run_fin("validate", "--logs", str(logs), "--out", str(out), "--max-bad-fraction", "0.5")
    assert ok.returncode == 0, ok.stderr
    assert "out_of_range:price=5" in ok.stdout


def test_bad_creatives_are_quarantined_with_their_reason(logs, tmp_path):
    """A truncated PNG, a PNG of another size than declared, a greyscale PNG and an unknown item: each
    quarantined with its reason; every other creative passes."""
    path = logs / f"{contract.CREATIVES.name}.parquet"
    good = pl.read_parquet(path)
    blobs = good["image_png"].to_list()
    grey = io.BytesIO()
    Image.fromarray(np.zeros((CREATIVE_SIZE, CREATIVE_SIZE), np.uint8)).save(grey, "PNG")
    expected = {
        good["item_id"][0]: ("truncated", blobs[0][: len(blobs[0]) // 2], "bad_png:image_png"),
        good["item_id"][1]: ("32x32", encode_png(np.zeros((1, 32, 32, 3), np.uint8))[0], "png_size:image_png"),
        good["item_id"][2]: ("greyscale", grey.getvalue(), "bad_png:image_png"),
    }
    rows = good.with_columns(image_png=pl.Series([expected[i][1] if i in expected else b for i, b in
                                                   zip(good["item_id"], blobs)], dtype=pl.Binary))
    rows = pl.concat([rows, good.head(1).with_columns(item_id=pl.lit(10**9, pl.Int64))])
    rows.write_parquet(path)

    report = validate_logs(logs, ValidationConfig(max_bad_fraction=1.0))
    t = report.tables[contract.CREATIVES.name]
    reasons = dict(zip(t.quarantine["item_id"], t.quarantine["reason"]))
    assert reasons == {**{i: reason for i, (_, _, reason) in expected.items()}, 10**9: "unknown_fk:item_id"}
    assert t.clean.height == good.height - 3
    assert decode_pngs(t.clean["image_png"].to_list()).shape == (t.clean.height, CREATIVE_SIZE, CREATIVE_SIZE, 3)
    # the report counts them, and the quarantine keeps the rows as they were
    summary = json.loads(write_report(report, tmp_path / "report").read_text())
    assert summary["tables"]["creatives"]["reasons"] == {"bad_png:image_png": 2, "png_size:image_png": 1,
                                                         "unknown_fk:item_id": 1}
    q = pl.read_parquet(tmp_path / "report" / "quarantine" / "creatives.parquet")
    assert q.drop("reason").filter(pl.col("item_id") != 10**9).equals(rows.filter(pl.col("item_id").is_in(list(expected))))


def test_logs_without_creatives_are_valid(logs, tmp_path):
    (tmp_path / "report" / "quarantine").mkdir(parents=True)
    (tmp_path / "report" / "quarantine" / "creatives.parquet").write_bytes(b"an earlier run's")
    (logs / f"{contract.CREATIVES.name}.parquet").unlink()
    report = validate_logs(logs)
    assert report.passed and contract.CREATIVES.name not in report.tables
    # a table absent this time leaves no quarantine of an earlier run behind (it stayed, to be taken for this one's)
    write_report(report, tmp_path / "report")
    assert not (tmp_path / "report" / "quarantine" / "creatives.parquet").exists()


def test_a_list_column_given_as_text_is_quarantined_not_a_crash():
    """A CSV log has no list type: its list column (an ad candidate's slot propensities) is text, which the
    validator reports as bad_type for every row that has one (before, the whole run failed on the cast)."""
    rows = pl.DataFrame({"candidate_id": [1, 2], "request_id": [1, 1], "user_id": [1, 1], "ts": [10, 10],
                         "slot_propensities": ["[0.5, 0.2]", None]})
    t = validate_table(rows, contract.AD_CANDIDATES, window=(0, 100), known_keys={})
    reasons = t.quarantine.sort("candidate_id")["reason"].to_list()
    assert "bad_type:slot_propensities" in reasons[0].split(";")
    assert all("bad_type:slot_propensities" not in r.split(";") for r in reasons[1:])


def test_files_of_one_table_with_other_column_types_change_no_value(tmp_path):
    """One file writes an id column with a null as float64 (as pandas does), another as int64 with an id above
    2^53: read together, every id keeps its value (before, the column became float64 and the large id was
    rounded, then accepted); a price written as int64 in one file and float64 in another keeps its cents."""
    from features import logio

    t0 = 1_700_000_000_000
    local = {k: int(v[0]) for k, v in contract.local_time_fields(np.array([t0]), 8.0).items()}
    row = dict(user_id=1, ts=t0, action=0, shop_id=10, category_1_id=1, **local)
    folder = tmp_path / "behaviours" / "date=2023-11-14"
    folder.mkdir(parents=True)
    pl.DataFrame([dict(row, event_id=1, brand_id=2**60 + 1, price=12)]).write_parquet(folder / "a.parquet")
    pl.DataFrame([dict(row, event_id=2, brand_id=None, price=12.5)]).with_columns(
        pl.col("brand_id").cast(pl.Float64)).write_parquet(folder / "b.parquet")
    t = validate_table(logio.read_raw(tmp_path, "behaviours"), contract.BEHAVIOURS, window=(0, 2**62), known_keys={})
    clean = t.clean.sort("event_id")
    assert t.quarantine.height == 0
    assert clean["brand_id"].to_list() == [2**60 + 1, None] and clean["price"].to_list() == [12.0, 12.5]


def test_a_png_declaring_a_huge_image_is_refused_from_its_header():
    """A few hundred bytes may declare an image of billions of pixels: the size is read from the header and the
    PNG refused before any row is decoded (before, it was decoded in full, or Pillow's bomb error escaped)."""
    import struct
    import zlib

    from features.creatives import check_pngs

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def declaring(side: int) -> bytes:
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))

    for side in (10_000, 100_000):
        with pytest.raises(ValueError, match="creative 0: .*(more than 64 pixels a side|decompression bomb)"):
            decode_pngs([declaring(side)], 64)
        assert check_pngs([declaring(side)], np.array([side]), np.array([side]))[0] == "bad_png"
