"""Real-dataset importers reconcile: every input row is accepted or quarantined."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from ebr.cli import main
from ebr.data.importers import RATING_TO_ACTION, import_adjacency
from ebr.data.tables import connect
from ebr.workspace import Workspace, read_json
from tests.conftest import ML100K


def test_ml100k_accounts_for_everything(ml100k_ws):
    m = read_json(ml100k_ws.root / "tables" / "manifest.json")["sources"]["movielens"]["tables"]
    assert m["engagements"]["in"] == 100_000 and m["engagements"]["accepted"] == 100_000
    assert m["users"]["accepted"] == 943 and m["pins"]["accepted"] == 1_682
    assert m["interests"]["accepted"] == 19
    con = connect(ml100k_ws)
    assert con.execute("SELECT count(*), count(DISTINCT user_id), count(DISTINCT pin_id) FROM engagements").fetchone() == (
        100_000, 943, 1_682)
    # the documented rating -> action mapping, checked against the raw file's rating histogram
    raw: dict[str, int] = {}
    for ln in (ML100K / "u.data").read_text().splitlines():
        r = int(ln.split("\t")[2])
        raw[RATING_TO_ACTION[r]] = raw.get(RATING_TO_ACTION[r], 0) + 1
    assert dict(con.execute("SELECT action, count(*) FROM engagements GROUP BY 1").fetchall()) == raw
    # pins without images: image signatures are the pin id; genres are interests
    assert con.execute("SELECT count(*) FROM pins WHERE image_sig <> pin_id OR image_sig_coarse <> pin_id").fetchone()[0] == 0
    assert con.execute("SELECT interests FROM pins WHERE pin_id = '1'").fetchone()[0] == ["Animation", "Children's", "Comedy"]
    assert con.execute("SELECT cat_age_bucket, cat_gender FROM users WHERE user_id = '1'").fetchone() == ("18-24", "M")


def test_adjacency_accounts_for_every_pair(tmp_path):
    train = tmp_path / "train.txt"
    test = tmp_path / "test.txt"
    train.write_text("0 10 11 12\n1 11\n2 12 13\n3\n")
    test.write_text("0 13\n1 10 12\n")
    ws = Workspace.at(tmp_path / "ws")
    entry = import_adjacency(ws, train, test)
    e = entry["tables"]["engagements"]
    assert (e["in"], e["accepted"], e["quarantined"]) == (6 + 1 + 3, 9, 1)  # user 3 has no items
    split = read_json(ws.split_dir("given") / "manifest.json")
    assert split["counts"] == {"train": 6, "test": 3} and split["kind"] == "given"
    assign = pq.read_table(ws.split_dir("given") / "assignment.parquet").to_pylist()
    assert {(r["user_id"], r["pin_id"], r["part"]) for r in assign} >= {("1", "10", "test"), ("0", "10", "train")}
    con = connect(ws)
    assert con.execute("SELECT count(*) FROM engagements WHERE ts IS NULL").fetchone()[0] == 9
    assert con.execute("SELECT count(*) FROM pins").fetchone()[0] == 4


def test_cli_sql_json(tiny_ws, capsys):
    assert main(["data", "sql", "--workspace", str(tiny_ws.root),
                 "SELECT count(*) AS n FROM interests", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 16}]


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    assert main(["data", "import", "movielens", str(tmp_path), "-w", str(tmp_path / "ws")]) == 2
    assert "not a MovieLens folder" in capsys.readouterr().err
