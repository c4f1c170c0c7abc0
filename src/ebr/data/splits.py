"""Evaluation splits (EVALUATION.md "Protocols"), written to ``splits/NAME/manifest.json``.

- temporal: train before the cut T (default: the last `test_fraction` of the time range is
  held out); validation = [val_cut, T), the last `val_fraction` of the training period, for early
  stopping. By default the window is the last 2% [ours]: in a feed the freshest days matter most
  (checked on a synthetic world with another seed than the reported one, benchmarks/defaults.py:
  test recall@100 0.0760 with 2%, 0.0577 with 10%), widened (in steps of 1% of the period, up to
  25%) until it holds `min_val_users` (100) warm users with a validation target, counted as
  evaluation counts (EVALUATION.md): a 2% window of sparse data (ML-100K: 26 users) makes the
  choice of epoch and alternative noise. An explicit `val_fraction` is used as given;
- given: train/test sets as imported from adjacency files (``assignment.parquet``, with each
  pair's position in the files: the pseudo-time); validation = 10% of each user's training pins:
  each user's last rows in file order where the lines are in engagement order, as such a file's
  test is, else a seeded random draw (data.given_validation, features/examples.py line_order);
- leave_last_out: each user's last positive engagement is the target (``targets.parquet``),
  the one before it the validation target.

`features.examples.load_engagements` turns any split into parts per engagement: 0 train, 1 validation,
2 test.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import pyarrow.parquet as pq

from ebr.data.schema import POSITIVE_ACTIONS
from ebr.data.tables import connect
from ebr.data.validate import DataError
from ebr.log import log
from ebr.workspace import Workspace, now_utc, read_json, write_json

POS_SQL = "(" + ", ".join(f"'{a}'" for a in POSITIVE_ACTIONS) + ")"
GIVEN_VAL_FRACTION = 0.1  # given split: validation = this share of each user's training pins
VAL_FRACTION = 0.02  # temporal: the validation window's default (and least) share of the training period
MAX_VAL_FRACTION = 0.25  # ... and the most it is widened to, to hold MIN_VAL_USERS
MIN_VAL_USERS = 100


class Part(IntEnum):
    """The part of a split an engagement falls in."""

    TRAIN = 0
    VALIDATION = 1
    TEST = 2


@dataclass(frozen=True)
class Split:
    name: str
    kind: str
    manifest: dict[str, Any]
    path: str

    @property
    def cut(self) -> dt.datetime | None:
        c = self.manifest.get("cut")
        return dt.datetime.fromisoformat(c) if c else None

    @property
    def val_cut(self) -> dt.datetime | None:
        c = self.manifest.get("val_cut")
        return dt.datetime.fromisoformat(c) if c else None


def _range(ws: Workspace) -> tuple[dt.datetime, dt.datetime]:
    con = connect(ws)
    lo, hi, n_null = con.execute(
        "SELECT min(ts), max(ts), count(*) FILTER (WHERE ts IS NULL) FROM engagements"
    ).fetchone()
    if lo is None:
        raise DataError(
            "no timestamped engagements: a temporal split needs ts (use the given split of an adjacency import)"
        )
    return lo, hi


def _val_users(con, val_cut: dt.datetime, cut: dt.datetime) -> int:
    """Warm users with a validation target in [val_cut, cut), as evaluation counts them
    (features/examples.py eval_spec, with the default positive actions): a positive engagement
    there with a pin they did not engage with (any action but an impression) before val_cut, and
    at least one such engagement before it."""
    return con.execute(
        f"""WITH tr AS (SELECT DISTINCT user_id, pin_id FROM engagements WHERE ts < ? AND action <> 'impression'),
        v AS (SELECT DISTINCT user_id, pin_id FROM engagements
              WHERE ts >= ? AND ts < ? AND action IN {POS_SQL})
        SELECT count(DISTINCT v.user_id) FROM v
        WHERE v.user_id IN (SELECT user_id FROM tr)
          AND NOT EXISTS (SELECT 1 FROM tr WHERE tr.user_id = v.user_id AND tr.pin_id = v.pin_id)""",
        [val_cut, val_cut, cut],
    ).fetchone()[0]


def _widened_val_fraction(con, lo: dt.datetime, cut: dt.datetime, min_users: int) -> tuple[float, int]:
    """The least share of [lo, cut) from VAL_FRACTION up, in steps of 1%, whose window at the end
    holds min_users warm users with a target; MAX_VAL_FRACTION (with a warning) if none does.
    Returns (share, users)."""
    steps = round((MAX_VAL_FRACTION - VAL_FRACTION) * 100)
    for i in range(steps + 1):
        f = round(VAL_FRACTION + i / 100, 4)
        n = _val_users(con, cut - (cut - lo) * f, cut)
        if n >= min_users:
            return f, n
    log.warning("the validation window holds %d warm users with a target at its widest (%.0f%% of the training "
                "period; asked for %d): early stopping reads a noisy metric", n, 100 * f, min_users)
    return f, n


def make_temporal(
    ws: Workspace,
    name: str = "temporal",
    cut: dt.datetime | None = None,
    test_fraction: float = 0.2,
    val_fraction: float | None = None,
    min_val_users: int = MIN_VAL_USERS,
) -> Split:
    """Train before `cut` (default: last test_fraction of the time range held out). Validation:
    the last `val_fraction` of the training period; None: VAL_FRACTION, widened to hold
    `min_val_users` warm users with a target (the module's docstring)."""
    lo, hi = _range(ws)
    if cut is None:
        if not 0 < test_fraction < 1:
            raise DataError("--test-fraction must be in (0, 1)")
        cut = lo + (hi - lo) * (1 - test_fraction)
    if cut.tzinfo is None:
        cut = cut.replace(tzinfo=dt.UTC)
    if not lo < cut <= hi:
        raise DataError(f"cut {cut.isoformat()} is outside the data's time range [{lo}, {hi}]")
    con = connect(ws)
    if val_fraction is None:
        val_fraction, val_users = _widened_val_fraction(con, lo, cut, min_val_users)
    else:
        if not 0 < val_fraction < 1:
            raise DataError("--val-fraction must be in (0, 1)")
        val_users = _val_users(con, cut - (cut - lo) * val_fraction, cut)
    val_cut = cut - (cut - lo) * val_fraction
    c = con.execute(
        "SELECT count(*) FILTER (WHERE ts < ?), count(*) FILTER (WHERE ts >= ? AND ts < ?), "
        "count(*) FILTER (WHERE ts >= ?) FROM engagements",
        [val_cut, val_cut, cut, cut],
    ).fetchone()
    m = {
        "kind": "temporal",
        "name": name,
        "cut": cut.isoformat(),
        "val_cut": val_cut.isoformat(),
        "test_fraction": test_fraction,
        "val_fraction": val_fraction,
        "val_users": val_users,
        "data_range": [str(lo), str(hi)],
        "counts": {"train": c[0], "validation": c[1], "test": c[2]},
        "created_at": now_utc().isoformat(),
    }
    write_json(ws.split_dir(name) / "manifest.json", m)
    return load_split(ws, name)


def make_leave_last_out(ws: Workspace, name: str = "leave_last_out") -> Split:
    """Each user's last positive engagement is the test target, the one before it validation."""
    con = connect(ws)
    tbl = con.sql(
        f"""SELECT user_id, pin_id, ts, rk FROM (
              SELECT user_id, pin_id, ts,
                     row_number() OVER (PARTITION BY user_id ORDER BY ts DESC NULLS LAST, pin_id) AS rk
              FROM engagements WHERE action IN {POS_SQL}) WHERE rk <= 2"""
    ).to_arrow_table()
    d = ws.split_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(tbl, d / "targets.parquet")
    rk = tbl["rk"].to_pylist()
    m = {
        "kind": "leave_last_out",
        "name": name,
        "counts": {"test": rk.count(1), "validation": rk.count(2)},
        "created_at": now_utc().isoformat(),
    }
    write_json(d / "manifest.json", m)
    return load_split(ws, name)


def load_split(ws: Workspace, name: str | None = None) -> Split:
    """The named split; default: the given split when the import had one, else temporal."""
    available = ws.splits()
    if name is None:
        given = [s for s in available if read_json(ws.split_dir(s) / "manifest.json")["kind"] == "given"]
        name = given[0] if given else "temporal"
        if name not in available:
            return make_temporal(ws)
    if name not in available:
        raise DataError(
            f"no split {name!r} in {ws.root}/splits; have: {', '.join(available) or 'none'}. "
            "Create one with `ebr data split temporal|leave-last-out`."
        )
    d = ws.split_dir(name)
    m = read_json(d / "manifest.json")
    return Split(name=name, kind=m["kind"], manifest=m, path=str(d))
