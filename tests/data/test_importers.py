"""Real-dataset importers reconcile: every input row is accepted or quarantined."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from ebr.cli import main
from ebr.data.importers import RATING_TO_ACTION, import_adjacency, import_interactions
from ebr.data.tables import connect
from ebr.workspace import Workspace, read_json
from tests.conftest import ML100K


def test_ml100k_accounts_for_everything(ml100k_ws):
    m = read_json(ml100k_ws.root / "tables" / "manifest.json")["sources"]["movielens"]["tables"]
    assert m["engagements"]["in"] == 100_000 and m["engagements"]["accepted"] == 100_000
    assert m["users"]["accepted"] == 943 and m["pins"]["accepted"] == 1_682
    assert m["interests"]["accepted"] == 19
    con = connect(ml100k_ws)
    assert con.execute(
        "SELECT count(*), count(DISTINCT user_id), count(DISTINCT pin_id) FROM engagements"
    ).fetchone() == (100_000, 943, 1_682)
    # the documented rating -> action mapping, checked against the raw file's rating histogram
    raw: dict[str, int] = {}
    for ln in (ML100K / "u.data").read_text().splitlines():
        r = int(ln.split("\t")[2])
        raw[RATING_TO_ACTION[r]] = raw.get(RATING_TO_ACTION[r], 0) + 1
    assert dict(con.execute("SELECT action, count(*) FROM engagements GROUP BY 1").fetchall()) == raw
    # pins without images: image signatures are the pin id; genres are interests
    assert (
        con.execute("SELECT count(*) FROM pins WHERE image_sig <> pin_id OR image_sig_coarse <> pin_id").fetchone()[0]
        == 0
    )
    assert con.execute("SELECT interests FROM pins WHERE pin_id = '1'").fetchone()[0] == [
        "Animation",
        "Children's",
        "Comedy",
    ]
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
    assert main(["data", "sql", "--workspace", str(tiny_ws.root), "SELECT count(*) AS n FROM interests", "--json"]) == 0
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
        ("Adventure",),
        ("Animation",),
        ("Children's",),
        ("Comedy",),
    ]
    assert con.execute("SELECT cat_age_bucket, cat_gender FROM users WHERE user_id = '2'").fetchone() == ("56+", "M")
    assert con.execute("SELECT num_release_year FROM pins WHERE pin_id = '2'").fetchone()[0] == 1995.0
    assert dict(con.execute("SELECT pin_id || '/' || user_id, action FROM engagements").fetchall()) == {
        "1/1": "save",
        "2/1": "closeup",
        "1/2": "hide",
    }


def test_leave_last_out_split(tmp_path):
    from ebr.config import FeaturesConfig
    from ebr.data.importers import import_interactions
    from ebr.data.splits import make_leave_last_out
    from ebr.features.examples import load_engagements
    from ebr.features.state import build_feature_state

    csv = tmp_path / "x.csv"
    csv.write_text(
        "user_id,item_id,ts\n"
        + "".join(f"a,p{i},{1700000000 + i}\n" for i in range(5))
        + "b,p1,1700000100\nb,p2,1700000200\n"
    )
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


def test_rejected_rows_create_no_pins_or_users_and_malformed_lines_are_quarantined(tmp_path):
    """Mutations caught: pins/users built from every row (ids seen only in rejected rows become
    pins), a CSV parser that aborts on a ragged or non-UTF-8 line or shifts its fields, no future
    horizon."""
    import pyarrow.parquet as pq

    from ebr.data.tables import connect

    lines = [b"user_id,item_id,ts,action"]
    lines += [f"u{i % 40},p{i % 90},2026-01-{1 + i % 28:02d}T12:00:00Z,click".encode() for i in range(990)]
    lines += [f"ghost{i},phantom{i},2026-01-05T00:00:00Z,teleport".encode() for i in range(6)]  # bad action
    lines += [
        b"u1,p1,2026-01-05T00:00:00Z,click,EXTRA",
        b"u2,p2",
        b"u3,p\xff\xfe,2026-01-05T00:00:00Z,click",
        b"future,pfuture,2099-01-01T00:00:00Z,save",
    ]
    (tmp_path / "x.csv").write_bytes(b"\n".join(lines) + b"\n")
    ws = Workspace.at(tmp_path / "ws")
    entry = import_interactions(ws, tmp_path / "x.csv")
    c = entry["tables"]["engagements"]
    assert (c["in"], c["accepted"], c["quarantined"]) == (1000, 990, 10)
    con = connect(ws)
    pins = {r[0] for r in con.execute("SELECT pin_id FROM pins").fetchall()}
    users = {r[0] for r in con.execute("SELECT user_id FROM users").fetchall()}
    assert pins == {f"p{i}" for i in range(90)} and users == {f"u{i}" for i in range(40)}
    q = pq.read_table(ws.quarantine_dir("interactions") / "engagements.parquet").to_pylist()
    by_raw = {r["raw"]: r["reason"] for r in q}
    assert by_raw["u1,p1,2026-01-05T00:00:00Z,click,EXTRA"] == "malformed line: expected 4 fields, got 5"
    assert by_raw["u2,p2"] == "malformed line: expected 4 fields, got 2"
    assert by_raw["u3,p\\xff\\xfe,2026-01-05T00:00:00Z,click"] == "malformed line: not valid UTF-8"
    assert by_raw["future,pfuture,2099-01-01T00:00:00Z,save"].startswith("timestamp in the future")


@pytest.mark.parametrize("content", [b"", b"\n\n", b"user_id,item_id,ts\n"])
def test_empty_or_header_only_file_is_an_error_and_writes_nothing(tmp_path, content, capsys):
    from ebr.cli import main

    (tmp_path / "x.csv").write_bytes(content)
    ws = tmp_path / "ws"
    assert main(["data", "import", "interactions", str(tmp_path / "x.csv"), "--workspace", str(ws)]) == 2
    err = capsys.readouterr().err
    assert "x.csv" in err and ("empty file" in err or "only a header" in err) and "Traceback" not in err
    assert not (ws / "tables").exists()
