"""Importers for real datasets: MovieLens (100K and 1M layouts), generic interactions, and
adjacency-list splits. Each goes through SourceWriter, so every row is validated and counted.

MovieLens rating -> action (a rating is an explicit judgement, so low ratings are negatives):
    5 -> save, 4 -> click, 3 -> closeup, 1 and 2 -> hide.
Genres become interests, demographics categorical user features, movies pins (no images: the
image signatures are the pin id).
"""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ebr.data.schema import FIRST_ENGAGEMENT, NO_TIME, TS
from ebr.data.splits import GIVEN_VAL_FRACTION
from ebr.data.validate import DEFAULT_MAX_FUTURE_DAYS, RAW, DataError, SourceWriter, parse_timestamps
from ebr.workspace import Workspace, write_json

RATING_TO_ACTION = {1: "hide", 2: "hide", 3: "closeup", 4: "click", 5: "save"}
ML_AGE_BUCKETS = ((0, 18, "<18"), (18, 25, "18-24"), (25, 35, "25-34"), (35, 45, "35-44"), (45, 50, "45-49"),
                  (50, 56, "50-55"), (56, 200, "56+"))


def _lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text(encoding="latin-1").splitlines() if ln.strip()]


def _split_fields(lines: list[str], sep: str, n: int) -> tuple[list[list[str | None]], np.ndarray]:
    """Split lines into n fields; lines with another field count get a 'malformed line' reason."""
    rows, reasons = [], np.full(len(lines), None, dtype=object)
    for i, ln in enumerate(lines):
        parts = ln.split(sep)
        if len(parts) < n:
            reasons[i] = f"malformed line: expected {n} fields separated by {sep!r}, got {len(parts)}"
            parts = parts + [None] * (n - len(parts))
        rows.append(parts)
    return rows, reasons


def _age_bucket(age: str | None) -> str | None:
    try:
        a = int(age)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    for lo, hi, name in ML_AGE_BUCKETS:
        if lo <= a < hi:
            return name
    return None


def _ratings_table(lines: list[str], sep: str) -> tuple[pa.Table, np.ndarray]:
    rows, reasons = _split_fields(lines, sep, 4)
    users = [r[0].strip() if r[0] else None for r in rows]
    items = [r[1].strip() if r[1] else None for r in rows]
    ratings = pd.to_numeric(pd.Series([r[2] for r in rows], dtype=object), errors="coerce")
    actions = [RATING_TO_ACTION.get(int(x)) if x == x and float(x).is_integer() else None for x in ratings]
    bad_rating = np.array([a is None for a in actions]) & pd.isna(reasons)
    reasons[bad_rating] = [f"unknown rating {r[2]!r} (expected 1-5)" for r, b in zip(rows, bad_rating) if b]
    ts, bad_ts = parse_timestamps([r[3] for r in rows])
    bad_ts |= np.array([r[3] is None or not str(r[3]).strip() for r in rows])
    reasons[bad_ts & pd.isna(reasons)] = [
        f"malformed timestamp {r[3]!r}" for r, b in zip(rows, bad_ts & pd.isna(reasons)) if b
    ]
    tbl = pa.table(
        {
            "user_id": users,
            "pin_id": items,
            "ts": ts,
            "action": [a if a else "?" for a in actions],
            "weight": np.ones(len(rows), dtype=np.float32),
            "surface": ["other"] * len(rows),
            RAW: lines,
        }
    )
    return tbl, reasons


def import_movielens(ws: Workspace, path: Path, source: str = "movielens", strict: bool = False) -> dict:
    """Import an ML-100K (u.data, u.item, u.user) or ML-1M (ratings.dat, movies.dat, users.dat) folder."""
    path = Path(path)
    if (path / "u.data").exists():
        layout, sep = "ml-100k", "\t"
        files = [path / "u.data", path / "u.item", path / "u.user", path / "u.genre"]
    elif (path / "ratings.dat").exists():
        layout, sep = "ml-1m", "::"
        files = [path / "ratings.dat", path / "movies.dat", path / "users.dat"]
    else:
        raise DataError(
            f"{path}: not a MovieLens folder. Expected u.data/u.item/u.user (ML-100K) "
            "or ratings.dat/movies.dat/users.dat (ML-1M)."
        )
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise DataError(f"MovieLens {layout} folder {path} lacks {', '.join(missing)}")

    if layout == "ml-100k":
        genres = [ln.split("|")[0] for ln in _lines(path / "u.genre")]
        item_rows, item_reasons = _split_fields(_lines(path / "u.item"), "|", 5 + len(genres))
        pin_ids = [r[0] for r in item_rows]
        pin_genres = [[g for g, flag in zip(genres, r[5:]) if flag == "1"] for r in item_rows]
        dates = pd.to_datetime(pd.Series([r[2] for r in item_rows]), format="%d-%b-%Y", errors="coerce")
        years = dates.dt.year.astype("float32").to_numpy()
        created = [None if pd.isna(d) else d.tz_localize("UTC").to_pydatetime() for d in dates]
        user_rows, user_reasons = _split_fields(_lines(path / "u.user"), "|", 5)
        users = {
            "user_id": [r[0] for r in user_rows],
            "cat_age_bucket": [_age_bucket(r[1]) for r in user_rows],
            "cat_gender": [r[2] for r in user_rows],
            "cat_occupation": [r[3] for r in user_rows],
            "cat_zip3": [(r[4] or "")[:3] or None for r in user_rows],
        }
    else:
        item_rows, item_reasons = _split_fields(_lines(path / "movies.dat"), "::", 3)
        pin_ids = [r[0] for r in item_rows]
        pin_genres = [[g for g in (r[2] or "").split("|") if g] for r in item_rows]
        years = np.array(
            [float(r[1].strip()[-5:-1]) if r[1] and r[1].strip()[-5:-1].isdigit() else np.nan for r in item_rows],
            dtype=np.float32,
        )
        created = [None] * len(pin_ids)  # ML-1M has the release year only: the first engagement is used
        genres = sorted({g for gs in pin_genres for g in gs})
        user_rows, user_reasons = _split_fields(_lines(path / "users.dat"), "::", 5)
        users = {
            "user_id": [r[0] for r in user_rows],
            "cat_age_bucket": [_age_bucket(r[2]) for r in user_rows],
            "cat_gender": [r[1] for r in user_rows],
            "cat_occupation": [r[3] for r in user_rows],
            "cat_zip3": [(r[4] or "")[:3] or None for r in user_rows],
        }
    with SourceWriter(
        ws, source, inputs=files, params={"layout": layout, "rating_to_action": RATING_TO_ACTION}, strict=strict
    ) as w:
        w.write("interests", pa.table({"interest_id": genres, "name": genres}))
        w.seal("interests")
        w.write(
            "pins",
            pa.table(
                {
                    "pin_id": pin_ids,
                    "image_sig": pin_ids,
                    "image_sig_coarse": pin_ids,
                    "interests": pa.array(pin_genres, type=pa.list_(pa.string())),
                    "num_release_year": years,
                    "created_at": pa.array(created, type=TS),
                }
            ),
            item_reasons,
        )
        w.seal("pins")
        users["followed_interests"] = [[] for _ in user_rows]
        w.write("users", pa.table(users), user_reasons)
        w.seal("users")
        tbl, reasons = _ratings_table(_lines(files[0]), sep)
        w.write("engagements", tbl, reasons)
        w.extra = {"layout": layout, "created_at": "release date" if layout == "ml-100k" else FIRST_ENGAGEMENT}
        return w.commit()


def _strs(col: pd.Series) -> list[str | None]:
    return [None if pd.isna(v) else str(v) for v in col]


def _read_frame(path: Path) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """A CSV or Parquet file -> (string columns, reason per row, raw line per row). CSV lines that
    are not valid UTF-8 or have another field count than the header are 'malformed line' rows (kept,
    to be quarantined with their raw text); an empty or header-only file is an error."""
    if not path.exists():
        raise DataError(f"{path.name}: file not found")
    if path.suffix == ".parquet" or path.is_dir():
        df = pq.read_table(path).to_pandas()
        raw = [",".join("" if pd.isna(v) else str(v) for v in row) for row in df.itertuples(index=False)]
        if not len(df):
            raise DataError(f"{path.name}: no rows")
        return df, np.full(len(df), None, dtype=object), raw
    lines = [ln for ln in path.read_bytes().decode("utf-8", "surrogateescape").splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{path.name}: empty file; expected a header (user_id,item_id[,ts][,weight][,action]) and rows")
    header = next(csv.reader([lines[0]]))
    if len(lines) == 1:
        raise DataError(f"{path.name}: only a header line, no rows")
    body = lines[1:]
    reasons = np.full(len(body), None, dtype=object)
    raw, cols = [], [[] for _ in header]
    for i, (ln, fields) in enumerate(zip(body, csv.reader(body))):
        try:
            ln.encode("utf-8")
            ok_text = True
        except UnicodeEncodeError:
            ok_text = False
        raw.append(ln.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")[:500])
        if not ok_text:
            reasons[i] = "malformed line: not valid UTF-8"
        elif len(fields) != len(header):
            reasons[i] = f"malformed line: expected {len(header)} fields, got {len(fields)}"
        if reasons[i] is not None:
            fields = [None] * len(header)
        for c, v in zip(cols, fields):
            c.append(v if v != "" else None)
    return pd.DataFrame({h: pd.Series(c, dtype=object) for h, c in zip(header, cols)}), reasons, raw


def _ids_only_tables(w: SourceWriter, users: pd.Series, items: pd.Series) -> None:
    """An ids-only dataset: pins and users are the distinct ids seen (no features, no images)."""
    w.write("interests", pa.table({"interest_id": pa.array([], pa.string()), "name": pa.array([], pa.string())}))
    pins = pd.unique(items.dropna().astype(str))
    w.write(
        "pins",
        pa.table(
            {
                "pin_id": pins,
                "image_sig": pins,
                "image_sig_coarse": pins,
                "interests": pa.array([[]] * len(pins), type=pa.list_(pa.string())),
            }
        ),
    )
    w.seal("pins")
    uids = pd.unique(users.dropna().astype(str))
    w.write(
        "users",
        pa.table({"user_id": uids, "followed_interests": pa.array([[]] * len(uids), type=pa.list_(pa.string()))}),
    )
    w.seal("users")


def import_interactions(
    ws: Workspace,
    path: Path,
    source: str = "interactions",
    strict: bool = False,
    max_future_days: float | None = DEFAULT_MAX_FUTURE_DAYS,
) -> dict:
    """CSV/Parquet with columns user_id, item_id and optional ts (unix seconds or ISO-8601),
    weight and action (default click)."""
    path = Path(path)
    df, reasons, raw = _read_frame(path)
    missing = {"user_id", "item_id"} - set(df.columns)
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(sorted(missing))}; expected user_id, item_id "
            f"and optionally ts, weight, action (found: {', '.join(map(str, df.columns))})"
        )
    n = len(df)
    if "ts" in df.columns:
        ts, bad_ts = parse_timestamps(df["ts"].tolist())
        bad_ts &= pd.isna(reasons)
        reasons[bad_ts] = [f"malformed timestamp {v!r}" for v in df["ts"][bad_ts]]
    else:
        ts = pa.nulls(n, pa.timestamp("us", tz="UTC"))
    weight = pd.to_numeric(df["weight"], errors="coerce") if "weight" in df.columns else pd.Series(np.ones(n))
    if "weight" in df.columns:
        badw = weight.isna().to_numpy() & df["weight"].notna().to_numpy() & pd.isna(reasons)
        reasons[badw] = [f"invalid weight {v!r}" for v in df["weight"][badw]]
    eng = pa.table(
        {
            "user_id": _strs(df["user_id"]),
            "pin_id": _strs(df["item_id"]),
            "ts": ts,
            "action": _strs(df["action"]) if "action" in df.columns else ["click"] * n,
            "weight": weight.fillna(1.0).astype("float32").to_numpy(),
            "surface": ["other"] * n,
            RAW: raw,
        }
    )
    with SourceWriter(ws, source, inputs=[path], strict=strict, max_future_days=max_future_days) as w:
        ok = pd.isna(w.row_reasons("engagements", eng, reasons))  # pins and users from accepted rows only
        _ids_only_tables(w, df["user_id"][ok], df["item_id"][ok])
        w.write("engagements", eng, reasons)
        w.extra = {"created_at": FIRST_ENGAGEMENT}
        return w.commit()


def _adjacency_pairs(path: Path) -> tuple[list[str], list[str], list[str], np.ndarray]:
    users, items, raw, reasons = [], [], [], []
    for ln in _lines(path):
        parts = ln.split()
        if len(parts) < 2:
            users.append(parts[0] if parts else None)
            items.append(None)
            raw.append(ln)
            reasons.append("malformed line: a user with no items")
            continue
        for it in parts[1:]:
            users.append(parts[0])
            items.append(it)
            raw.append(ln[:200])
            reasons.append(None)
    return users, items, raw, np.array(reasons, dtype=object)


def import_adjacency(
    ws: Workspace, train: Path, test: Path, source: str = "adjacency", split: str = "given", strict: bool = False
) -> dict:
    """Files whose lines are 'user item item ...' (no timestamps); records the given split."""
    tr, te = _adjacency_pairs(Path(train)), _adjacency_pairs(Path(test))
    users = tr[0] + te[0]
    items = tr[1] + te[1]
    part = ["train"] * len(tr[0]) + ["test"] * len(te[0])
    reasons = np.concatenate([tr[3], te[3]])
    n = len(users)
    eng = pa.table(
        {
            "user_id": users,
            "pin_id": items,
            "ts": pa.nulls(n, pa.timestamp("us", tz="UTC")),
            "action": ["click"] * n,
            "weight": np.ones(n, np.float32),
            "surface": ["other"] * n,
            RAW: tr[2] + te[2],
        }
    )
    with SourceWriter(ws, source, inputs=[Path(train), Path(test)], strict=strict, params={"split": split}) as w:
        good = pd.isna(w.row_reasons("engagements", eng, reasons))  # pins and users from accepted rows only
        _ids_only_tables(w, pd.Series(users, dtype=object)[good], pd.Series(items, dtype=object)[good])
        w.write("engagements", eng, reasons)
        w.extra = {"created_at": NO_TIME}
        entry = w.commit()
    ok = np.array([r is None for r in reasons]) & np.array(
        [u is not None and i is not None for u, i in zip(users, items)]
    )
    # pos = the pair's place in the files (train lines, then test lines): the pseudo-time of data
    # without timestamps, stored because no query engine keeps insertion order for us
    assign = pa.table({"user_id": users, "pin_id": items, "part": part, "pos": np.arange(n, dtype=np.int64)}).filter(
        pa.array(ok)
    )
    d = ws.split_dir(split)
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(assign, d / "assignment.parquet")
    counts = {p: int(sum(1 for x, o in zip(part, ok) if o and x == p)) for p in ("train", "test")}
    write_json(
        d / "manifest.json",
        {
            "kind": "given",
            "name": split,
            "source": source,
            "counts": counts,
            "validation": (f"{GIVEN_VAL_FRACTION:.0%} of each user's training pins: each user's last rows "
                           "where the lines are in engagement order, else a random draw seeded by train.seed "
                           "(data.given_validation)"),
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "inputs": [str(train), str(test)],
        },
    )
    entry["split"] = {"name": split, **counts}
    return entry
