"""Re-importing a source is all or nothing: a crash at any commit step leaves, for every reader, the
old source entirely or the new one entirely, with a manifest that matches the tables."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from ebr.data.importers import import_interactions
from ebr.data.tables import connect
from ebr.workspace import InjectedFailure, Workspace, read_json

STEPS = ["staged", "journal", "swap:engagements", "swap:pins", "swap:users", "swap:quarantine", "manifest"]


def _csv(path, n: int, bad: int) -> None:
    rows = ["user_id,item_id,ts,action"]
    rows += [f"u{i % 7},p{i % 31},2026-01-{1 + i % 28:02d}T12:00:00Z,click" for i in range(n)]
    rows += [f"u1,p1,2026-01-02T00:00:00Z,teleport{i}" for i in range(bad)]  # unknown action: quarantined
    path.write_text("\n".join(rows) + "\n")


def _state(ws: Workspace) -> tuple[int, int, int, int]:
    """(engagement rows, manifest's accepted engagements, quarantined rows on disk, manifest's)."""
    rows = connect(ws).execute("SELECT count(*) FROM engagements").fetchone()[0]  # connect() recovers first
    m = read_json(ws.root / "tables" / "manifest.json")["sources"]["interactions"]["tables"]["engagements"]
    q = ws.quarantine_dir("interactions") / "engagements.parquet"
    return rows, m["accepted"], pq.read_metadata(q).num_rows if q.exists() else 0, m["quarantined"]


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_any_commit_step_leaves_old_or_new(tmp_path, monkeypatch, step):
    """Mutations caught: clearing the old source before the new one is in place (0 rows), writing
    the manifest before the tables (a manifest over the wrong rows), no roll-forward on read."""
    ws = Workspace.at(tmp_path / "ws")
    _csv(tmp_path / "old.csv", 100, 0)
    _csv(tmp_path / "new.csv", 150, 5)
    import_interactions(ws, tmp_path / "old.csv")
    assert _state(ws) == (100, 100, 0, 0)
    monkeypatch.setenv("EBR_FAIL_AT_COMMIT", step)
    with pytest.raises(InjectedFailure):
        import_interactions(ws, tmp_path / "new.csv")
    monkeypatch.delenv("EBR_FAIL_AT_COMMIT")
    expected_old, expected_new = (100, 100, 0, 0), (150, 150, 5, 5)
    assert _state(ws) == (expected_old if step == "staged" else expected_new)
    assert not (ws.root / ".staging" / "interactions").exists()
    # and a later import works normally on top
    import_interactions(ws, tmp_path / "old.csv")
    assert _state(ws) == expected_old
