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


def test_ml1m_layout(tmp_path):
    from ebr.data.importers import import_movielens

    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "movies.dat").write_text("1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure\n")
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (d / "ratings.dat").write_text("1::1::5::978300760\n1::2::3::978302109\n2::1::2::978301968\n2::9::4::978300275\n")
    ws = Workspace.at(tmp_path / "ws")
    e = import_movielens(ws, d)
    assert e["layout"] == "ml-1m"
    assert (e["tables"]["engagements"]["accepted"], e["tables"]["engagements"]["quarantined"]) == (3, 1)
    con = connect(ws)
    assert sorted(con.execute("SELECT interest_id FROM interests").fetchall()) == [
        ("Adventure",), ("Animation",), ("Children's",), ("Comedy",)]
    assert con.execute("SELECT cat_age_bucket, cat_gender FROM users WHERE user_id = '2'").fetchone() == ("56+", "M")
    assert con.execute("SELECT num_release_year FROM pins WHERE pin_id = '2'").fetchone()[0] == 1995.0
    assert dict(con.execute("SELECT pin_id || '/' || user_id, action FROM engagements").fetchall()) == {
        "1/1": "save", "2/1": "closeup", "1/2": "hide"}


def test_leave_last_out_split(tmp_path):
    from ebr.config import FeaturesConfig
    from ebr.data.importers import import_interactions
    from ebr.data.splits import make_leave_last_out
    from ebr.features.examples import load_engagements
    from ebr.features.state import build_feature_state

    csv = tmp_path / "x.csv"
    csv.write_text("user_id,item_id,ts\n" + "".join(f"a,p{i},{1700000000 + i}\n" for i in range(5))
                   + "b,p1,1700000100\nb,p2,1700000200\n")
    ws = Workspace.at(tmp_path / "ws")
    import_interactions(ws, csv)
    split = make_leave_last_out(ws)
    assert split.manifest["counts"] == {"test": 2, "validation": 2}
    fs = build_feature_state(ws)
    e = load_engagements(ws, fs, split)
    parts = {(fs.users.decode([u])[0], fs.pins.decode([p])[0]): int(x) for u, p, x in zip(e.user, e.pin, e.part)}
    assert parts[("a", "p4")] == 2 and parts[("a", "p3")] == 1 and parts[("a", "p0")] == 0
    assert parts[("b", "p2")] == 2 and parts[("b", "p1")] == 1
    assert FeaturesConfig().positive_actions  # click (the default action) counts as positive
