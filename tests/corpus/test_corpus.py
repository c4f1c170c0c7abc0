"""The serving corpus: logic checked by hand, DuckDB = Spark, coverage, train/serve statistics."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ebr.corpus.build import build_serving_corpus, corpus_coverage, pin_statistics
from ebr.data.validate import SourceWriter
from ebr.workspace import Workspace, read_json

AS_OF = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def _hand_world(tmp_path) -> Workspace:
    """Pins a1/a2 are duplicates (coarse A), b alone, c alone; z is referenced but not a pin."""
    ws = Workspace.at(tmp_path / "ws")

    def ts(days_before: float) -> dt.datetime:
        return AS_OF - dt.timedelta(days=days_before)

    with SourceWriter(ws, "hand", quiet=True) as w:
        w.write("pins", pa.table({
            "pin_id": ["a1", "a2", "b", "c"], "image_sig": ["fa1", "fa2", "fb", "fc"],
            "image_sig_coarse": ["A", "A", "B", "C"], "interests": [[], [], [], []]}))
        w.seal("pins")
        w.write("users", pa.table({"user_id": ["u"], "followed_interests": [[]]}))
        w.seal("users")
        rows = [("a1", 14, "save"), ("a2", 0.5, "click"), ("a2", 28, "closeup"), ("b", 1, "save"),
                ("b", 100, "save"), ("c", 0.1, "impression"), ("c", -1, "save"), ("c", 7, "closeup")]
        w.write("engagements", pa.table({
            "user_id": ["u"] * len(rows), "pin_id": [r[0] for r in rows],
            "ts": pa.array([ts(r[1]) for r in rows], pa.timestamp("us", tz="UTC")), "action": [r[2] for r in rows]}))
        entry = w.commit()
    with SourceWriter(ws, "other", quiet=True) as w:  # an engagement on a pin no table knows
        w.write("engagements", pa.table({"user_id": ["u"], "pin_id": ["z"], "action": ["save"],
                                         "ts": pa.array([ts(2)], pa.timestamp("us", tz="UTC"))}))
        w.commit()
    assert entry["tables"]["engagements"]["accepted"] == 8
    return ws


def test_corpus_logic_by_hand(tmp_path):
    ws = _hand_world(tmp_path)
    d = build_serving_corpus(ws, as_of=AS_OF, top_n=10)
    rows = pq.read_table(d / "corpus.parquet").to_pylist()
    # scores: w * 2^(-age/14): a1 = 3 * 2^-1 = 1.5; a2 = 2 * 2^(-0.5/14) + 1 * 2^-2; b = 3 * 2^(-1/14)
    # (b's 100-day-old save is outside the 90-day window); c = 1 * 2^(-0.5) (impressions weigh 0,
    # the save after as-of is excluded)
    a1, a2 = 1.5, 2 * 2 ** (-0.5 / 14) + 0.25
    b, c = 3 * 2 ** (-1 / 14), 2 ** (-0.5)
    assert [r["pin_id"] for r in rows] == ["a2", "b", "c"]  # a2 represents A (a2 > a1)
    assert rows[0]["score"] == pytest.approx(a1 + a2) and rows[0]["group_pins"] == 2
    assert rows[0]["pin_score"] == pytest.approx(a2)
    assert rows[1]["score"] == pytest.approx(b) and rows[2]["score"] == pytest.approx(c)
    counts = read_json(d / "manifest.json")["counts"]
    assert counts["unknown_pins"] == 1 and counts["after_as_of"] == 1 and counts["before_window"] == 1
    assert counts["unweighted_actions"] == 1 and counts["engagements"] == 9
    raw = pq.read_table(build_serving_corpus(ws, as_of=AS_OF, decay=False, top_n=2) / "corpus.parquet").to_pylist()
    # raw sums: A = 3 + 2 + 1 = 6, B = 3, C = 1; top 2
    assert [(r["pin_id"], r["score"]) for r in raw] == [("a1", 6.0), ("b", 3.0)]  # tie a1 = a2 = 3 -> pin id


def test_duckdb_and_spark_give_the_same_corpus(tiny_ws):
    import pyspark  # noqa: F401 - installed by the lock: a missing Spark fails here, never skips
    a = pq.read_table(build_serving_corpus(tiny_ws, "duckdb", top_n=800) / "corpus.parquet").to_pylist()
    b = pq.read_table(build_serving_corpus(tiny_ws, "spark", top_n=800) / "corpus.parquet").to_pylist()
    assert len(a) == len(b) == 800
    assert [r["pin_id"] for r in a] == [r["pin_id"] for r in b]
    for x, y in zip(a, b):
        assert math.isclose(x["score"], y["score"], rel_tol=1e-9)
        assert x["image_sig_coarse"] == y["image_sig_coarse"] and x["group_pins"] == y["group_pins"]


def test_decayed_corpus_covers_next_week_better(tiny_ws):
    from ebr.data.tables import connect

    as_of = connect(tiny_ws).execute("SELECT max(ts) - INTERVAL 14 DAY FROM engagements").fetchone()[0]
    cov = {}
    for decay in (True, False):
        d = build_serving_corpus(tiny_ws, as_of=as_of, decay=decay, top_n=500)
        cov[decay] = corpus_coverage(tiny_ws, d.name)
    assert cov[True]["positives"] == cov[False]["positives"] > 500
    assert cov[True]["coverage"] > cov[False]["coverage"] + 0.05, cov


def test_training_statistics_match_serving_only_with_the_remap(tiny_ws):
    """Serving statistics are per coarse signature (the corpus's). Training statistics computed
    per pin disagree for every duplicated pin; with the fine -> coarse remap they agree."""
    from ebr.data.splits import load_split
    from ebr.features.examples import load_engagements
    from ebr.features.pinstats import STAT_ACTIONS, PinStats, group_codes
    from ebr.features.state import build_feature_state

    fs = build_feature_state(tiny_ws)
    split = load_split(tiny_ws, None)  # temporal, created when missing
    e = load_engagements(tiny_ws, fs, split)
    as_of = int(split.cut.timestamp() * 1e6)
    serving = pin_statistics(tiny_ws, as_of).to_pylist()
    by_sig = {r["image_sig_coarse"]: r for r in serving}
    pins = pq.read_table(tiny_ws.table_dir("pins")).select(["pin_id", "image_sig_coarse"]).to_pylist()
    codes = fs.pins.encode([p["pin_id"] for p in pins])
    expected = np.array([[by_sig.get(p["image_sig_coarse"], {}).get(f"{a}_{w}d", 0) for a in STAT_ACTIONS
                          for w in (7, 30, 90)] for p in pins], dtype=np.float64)
    t = np.full(len(codes), as_of)
    drift = {}
    for gran in ("pin", "coarse"):
        st = PinStats.build(e, group_codes(tiny_ws, fs, gran), np.ones(len(e), bool), [7, 30, 90])
        got = np.expm1(st.at(codes, t).astype(np.float64))
        drift[gran] = int((np.abs(got - expected) > 1e-3).any(axis=1).sum())
    assert drift["coarse"] == 0
    assert drift["pin"] > 50, drift  # duplicated pins disagree without the remap
