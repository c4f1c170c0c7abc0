"""Every bad-row class is quarantined with its reason; imports reconcile; strict and re-import."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ebr.data.importers import import_interactions, import_movielens
from ebr.data.tables import connect
from ebr.data.validate import DataError, SourceWriter, parse_timestamps
from ebr.workspace import Workspace, read_json


def _quarantine(ws: Workspace, source: str, table: str) -> dict[str, str]:
    q = pq.read_table(ws.quarantine_dir(source) / f"{table}.parquet").to_pylist()
    return {r["raw"] or r.get("pin_id") or r.get("user_id"): r["reason"] for r in q}


def test_interactions_bad_rows_quarantined_with_reason(tmp_path):
    csv = tmp_path / "clicks.csv"
    csv.write_text(
        "user_id,item_id,ts,weight,action\n"
        "u1,i1,1700000000,1,click\n"
        "u1,i2,2024-03-01T10:00:00Z,2,save\n"
        ",i3,1700000000,1,click\n"  # null id
        "u2,i1,yesterday,1,click\n"  # malformed timestamp
        "u2,i2,1700000100,1,like\n"  # unknown action
        "u3,i2,1700000200,-3,click\n"  # invalid weight
        "u3,i3,1700000300,abc,click\n"  # weight not a number
    )
    ws = Workspace.at(tmp_path / "ws")
    entry = import_interactions(ws, csv)
    c = entry["tables"]["engagements"]
    assert (c["in"], c["accepted"], c["quarantined"]) == (7, 2, 5)
    reasons = sorted(pq.read_table(ws.quarantine_dir("interactions") / "engagements.parquet")["reason"].to_pylist())
    assert reasons == sorted([
        "null user_id", "malformed timestamp 'yesterday'", "unknown action 'like'",
        "invalid weight (must be a finite number >= 0)", "invalid weight 'abc'",
    ])
    # the good rows are queryable, with both timestamp formats parsed to UTC
    rows = connect(ws).execute("SELECT pin_id, epoch(ts)::BIGINT, weight FROM engagements ORDER BY pin_id").fetchall()
    assert rows == [("i1", 1700000000, 1.0), ("i2", 1709287200, 2.0)]


def test_embedding_width_dangling_and_duplicate(tmp_path):
    ws = Workspace.at(tmp_path)
    with SourceWriter(ws, "src", quiet=True) as w:
        w.write("interests", pa.table({"interest_id": ["a", "b"], "name": ["A", "B"]}))
        w.seal("interests")
        w.write("pins", pa.table({
            "pin_id": ["p1", "p2", "p3", "p4", "p1"],
            "image_sig": ["s1", "s2", "s3", "s4", "s5"],
            "image_sig_coarse": ["s1", "s2", "s3", "s4", "s5"],
            "interests": [["a"], ["b"], ["zzz"], ["a"], ["a"]],
            "embedding": [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [1.0, 2.0, 3.0], [0.0, 0.0]],
        }))
        w.seal("pins")
        w.write("users", pa.table({"user_id": ["u1"], "followed_interests": [["a"]]}))
        w.seal("users")
        w.write("engagements", pa.table({
            "user_id": ["u1", "u1", "ghost"], "pin_id": ["p1", "p404", "p2"],
            "ts": pa.array([1, 2, 3], pa.timestamp("s", tz="UTC")), "action": ["click"] * 3,
        }))
        entry = w.commit()
    pins = {
        r["pin_id"] + str(r["interests"]): r["reason"]
        for r in pq.read_table(ws.quarantine_dir("src") / "pins.parquet").to_pylist()
    }
    assert pins == {
        "p3['zzz']": "dangling interest (not in interests)",
        "p4['a']": "wrong embedding width (expected 2)",
        "p1['a']": "duplicate pin_id",
    }
    eng = sorted(pq.read_table(ws.quarantine_dir("src") / "engagements.parquet")["reason"].to_pylist())
    assert eng == ["dangling pin_id (not in pins)", "dangling user_id (not in users)"]
    for t, c in entry["tables"].items():
        assert c["in"] == c["accepted"] + c["quarantined"], t
    assert read_json(ws.root / "tables" / "manifest.json")["sources"]["src"]["tables"]["pins"]["quarantined"] == 3


def test_movielens_bad_lines(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "u.genre").write_text("unknown|0\nAction|1\n\n")
    (d / "u.item").write_text("1|Film A (1995)|01-Jan-1995||url|0|1\n2|Film B (1996)|01-Jan-1996||url|1|0\n")
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    (d / "u.data").write_text(
        "1\t1\t5\t881250949\n2\t2\t1\t881250950\n1\t99\t4\t881250951\n2\t1\t7\t881250952\n1\t2\t3\tnot-a-time\n1\t2\n"
    )
    ws = Workspace.at(tmp_path / "ws")
    entry = import_movielens(ws, d)
    q = _quarantine(ws, "movielens", "engagements")
    assert q == {
        "1\t99\t4\t881250951": "dangling pin_id (not in pins)",
        "2\t1\t7\t881250952": "unknown rating '7' (expected 1-5)",
        "1\t2\t3\tnot-a-time": "malformed timestamp 'not-a-time'",
        "1\t2": "malformed line: expected 4 fields separated by '\\t', got 2",
    }
    assert entry["tables"]["engagements"] == {
        "in": 6,
        "accepted": 2,
        "quarantined": 4,
        "parts": 1,
        "reasons": entry["tables"]["engagements"]["reasons"],
    }
    actions = dict(connect(ws).execute("SELECT pin_id, action FROM engagements").fetchall())
    assert actions == {"1": "save", "2": "hide"}


def test_strict_fails_and_keeps_previous_data(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("user_id,item_id\nu1,i1\nu2,i2\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id\nu1,i1\n,i2\n")
    ws = Workspace.at(tmp_path / "ws")
    import_interactions(ws, good, source="s", strict=True)
    with pytest.raises(DataError, match="strict: 1 bad rows"):
        import_interactions(ws, bad, source="s", strict=True)
    assert connect(ws).execute("SELECT count(*) FROM engagements").fetchone()[0] == 2


def test_reimport_replaces_source_rows(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("user_id,item_id,ts\nu1,i1,1700000000\nu2,i1,1700000001\n")
    ws = Workspace.at(tmp_path / "ws")
    import_interactions(ws, f)
    import_interactions(ws, f)
    con = connect(ws)
    assert con.execute("SELECT count(*) FROM engagements").fetchone()[0] == 2
    assert con.execute("SELECT count(*) FROM pins").fetchone()[0] == 1
    import_interactions(ws, f, source="other")  # a second source adds its own rows
    assert connect(ws).execute("SELECT count(*) FROM engagements").fetchone()[0] == 4


def test_parse_timestamps_formats():
    ts, bad = parse_timestamps(
        ["0", "1700000000", "2024-03-01T10:00:00+02:00", "2024-03-01", "", None, "13/45/2024", "99999999999999"]
    )
    got = [t.isoformat() if t else None for t in ts.to_pylist()]
    assert got[:4] == [
        "1970-01-01T00:00:00+00:00",
        "2023-11-14T22:13:20+00:00",
        "2024-03-01T08:00:00+00:00",
        "2024-03-01T00:00:00+00:00",
    ]
    assert bad.tolist() == [False, False, False, False, False, False, True, True]
