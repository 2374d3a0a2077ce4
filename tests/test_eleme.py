"""The Ele.me dataset converter, on a fixture in that layout with good and malformed rows."""

import polars as pl
import pytest

from features.eleme import ElemeConfig, convert_eleme, parse_rows
from features.validate import validate_logs
from tests.conftest import ROOT, run_fin

FIXTURE = ROOT / "tests" / "fixtures" / "eleme_sample.csv"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("eleme") / "logs"
    manifest = convert_eleme(FIXTURE, out)
    return out, manifest


def test_malformed_rows_go_to_quarantine_with_reasons(converted):
    out, manifest = converted
    q = pl.read_parquet(out / "quarantine" / "eleme_rows.parquet")
    assert dict(zip(q["user_id"].fill_null("").to_list(), q["reason"].to_list())) == {
        "103": "bad_label", "104": "bad_times", "105": "list_length_mismatch",
        "106": "bad_list_value:item_id_list", "107": "bad_time_fields", "108": "bad_geohash12", "": "bad_id:user_id"}
    assert manifest["source_rows"] == 12 and manifest["quarantined_rows"] == 7
    assert manifest["rows"]["impressions"] == 5  # every good row is kept


def test_rows_become_impressions_and_histories_become_deduplicated_behaviours(converted):
    out, _ = converted
    imp = pl.read_parquet(out / "impressions" / "*.parquet")
    beh = pl.read_parquet(out / "behaviours" / "*.parquet")
    assert imp["request_id"].n_unique() == 3  # two rows share user, time and place
    assert imp.filter(pl.col("user_id") == 102)["time_type"].to_list() == [2, 2]
    # user 101's three rows repeat two history events; one more event is new
    assert beh.filter(pl.col("user_id") == 101).height == 3
    assert beh.filter(pl.col("user_id") == 102).height == 1
    assert beh["event_id"].n_unique() == beh.height
    # every request's history is strictly before it
    first_req = imp.group_by("user_id").agg(pl.col("ts").max())
    assert beh.join(first_req, on="user_id").filter(pl.col("ts") >= pl.col("ts_right")).height == 0
    assert (imp["distance_m"] > 0).all()


def test_converted_logs_pass_validation(converted):
    out, _ = converted
    report = validate_logs(out)
    assert report.passed and all(t.quarantine.height == 0 for t in report.tables.values())


def test_timediff_unit_changes_event_times(tmp_path):
    s = convert_eleme(FIXTURE, tmp_path / "s", ElemeConfig(timediff_unit="s"))
    m = convert_eleme(FIXTURE, tmp_path / "m", ElemeConfig(timediff_unit="min"))
    assert m["window_start_ms"] < s["window_start_ms"]


def test_cli_on_a_file_of_the_wrong_layout(tmp_path):
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    r = run_fin("convert-eleme", "--csv", str(bad), "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and r.stderr.startswith("fin convert-eleme: error: not the Ele.me CTR layout")
    assert "Traceback" not in r.stderr


@pytest.mark.integration  # runs the features job
def test_converted_logs_feed_the_features_job(converted, tmp_path):
    """Real data goes through the same pipeline: events without the user's place use the shop's cell."""
    from jobs.features_job import FeaturesConfig, run_features

    logs, _ = converted
    out = tmp_path / "features"
    run_features(logs, out, FeaturesConfig(partitions=2, validation_days=1, test_days=1, num_cpus=2))
    assert not (out / "data" / "creatives.parquet").exists()  # the dataset has no images, and needs none
    timelines = pl.read_parquet(out / "data" / "timelines" / "*.parquet")
    user = timelines.filter(pl.col("user_id") == 101).row(0, named=True)
    assert len(user["ts"]) == 3 and min(user["place_geohash6"]) > 0
    examples = pl.concat([pl.read_parquet(out / "data" / "examples" / s / "*.parquet")
                          for s in ("train", "validation", "test")])
    first_request = examples.filter(pl.col("user_id") == 101).sort("ts")
    assert first_request["history_len"].to_list() == [2, 2, 3]  # two candidates of one request, then a later one


def test_a_non_finite_number_in_a_list_is_quarantined(tmp_path):
    """`nan` or `inf` in a row's time differences or prices is a bad value with its reason (before, it passed the
    checks and the whole conversion failed casting it)."""
    raw = pl.read_csv(FIXTURE, infer_schema=False)
    good = raw.filter(pl.col("user_id") == "101").head(1)
    bad = pl.concat([good.with_columns(pl.col("timediff_list").str.replace(r"^[^;]+", value)) for value in ("nan", "inf")])
    rows, quarantine = parse_rows(pl.concat([good, bad]), ElemeConfig())
    assert rows.height == 1 and quarantine["reason"].to_list() == ["bad_list_value:timediff_list"] * 2
    source = tmp_path / "eleme.csv"
    pl.concat([raw, bad]).write_csv(source)
    assert convert_eleme(source, tmp_path / "logs")["quarantined_rows"] == 7 + 2


def test_numbers_that_do_not_read_or_do_not_fit_go_to_quarantine():
    """A number that does not read as one (before, silently a missing value) and one the contract's column does
    not allow (before, a value past its small integer type failed the whole conversion) each quarantine their
    row with a reason; the other rows convert."""
    raw = pl.read_csv(FIXTURE, infer_schema=False)
    base = raw.filter(pl.col("user_id") == "101").head(1)
    cases = {"bad_number:brand_id": ("brand_id", "abc"), "bad_number:avg_price": ("avg_price", "cheap"),
             "out_of_range:gender": ("gender", "300"), "out_of_range:is_super_vip": ("is_super_vip", "128"),
             "bad_list_value:hours_list": ("hours_list", "200;11"), "bad_list_value:weekdays_list": ("weekdays_list", "0;1000")}
    bad = pl.concat([base.with_columns(pl.lit(value).alias(column), pl.lit(str(900 + i)).alias("user_id"))
                     for i, (column, value) in enumerate(cases.values())])
    rows, quarantine = parse_rows(pl.concat([raw, bad]), ElemeConfig())
    reasons = dict(zip(quarantine["user_id"].to_list(), quarantine["reason"].to_list()))
    assert {reasons[str(900 + i)] for i in range(len(cases))} == set(cases)
    assert rows.height == 5  # the fixture's good rows
