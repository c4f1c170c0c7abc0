"""The snapshot registry: WORKSPACE/pretrain/NAME/ holds one pretrained ID snapshot.

  user_ids.parquet, pin_ids.parquet   the id of each table row (column `id`)
  user_table.npy, pin_table.npy       (rows, dim) float32 (np.load with allow_pickle=False)
  manifest.json                       window, dims, counts, loss curve, throughput, content hash

A snapshot is written into a temporary folder and renamed into place: a crashed `ebr pretrain-ids`
leaves no half snapshot and an earlier snapshot of the same name whole. Tables are keyed by ids,
not codes, so a model maps them onto its own vocabulary (an id the snapshot has not seen, and the
padding / out-of-vocabulary rows, get zeros).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ebr.errors import EbrError
from ebr.features.state import FIRST_ID, Vocab
from ebr.log import log
from ebr.pretrain.windows import IdWindow
from ebr.workspace import Workspace, check_name, read_json, write_json

FILES = ("user_ids.parquet", "pin_ids.parquet", "user_table.npy", "pin_table.npy")


def root(ws: Workspace) -> Path:
    return ws.root / "pretrain"


def content_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for name in FILES:
        h.update(name.encode())
        with open(folder / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def save(ws: Workspace, name: str, user_ids: list[str], pin_ids: list[str], user_table: np.ndarray,
         pin_table: np.ndarray, manifest: dict) -> dict:
    """Write a snapshot atomically; returns its manifest (with the content hash)."""
    check_name(name, "snapshot")
    final = root(ws) / name
    tmp = root(ws) / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        pq.write_table(pa.table({"id": pa.array(user_ids, pa.string())}), tmp / "user_ids.parquet")
        pq.write_table(pa.table({"id": pa.array(pin_ids, pa.string())}), tmp / "pin_ids.parquet")
        np.save(tmp / "user_table.npy", np.ascontiguousarray(user_table, dtype=np.float32))
        np.save(tmp / "pin_table.npy", np.ascontiguousarray(pin_table, dtype=np.float32))
        manifest = {**manifest, "name": name, "content_hash": content_hash(tmp)}
        write_json(tmp / "manifest.json", manifest)
        old = root(ws) / f".old-{name}-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def list_snapshots(ws: Workspace) -> list[dict]:
    """Manifests of the complete snapshots, oldest window end first."""
    out = []
    if root(ws).is_dir():
        for d in sorted(root(ws).iterdir()):
            if d.name.startswith(".") or not (d / "manifest.json").is_file():
                continue
            out.append(read_json(d / "manifest.json"))
    return sorted(out, key=lambda m: (m["window"].get("end", 0), m.get("created_at", ""), m["name"]))


def choose(ws: Workspace, train_window: IdWindow, name: str | None = None, allow_overlap: bool = False) -> dict:
    """The snapshot a retrieval model trained on `train_window` uses: `name` when given, else the
    latest whose window does not overlap the training window (TECHNIQUES.md 4). An overlapping
    one is refused unless allow_overlap (ablations), which logs a warning."""
    snaps = list_snapshots(ws)
    if name is not None:
        check_name(name, "snapshot")
        found = [m for m in snaps if m["name"] == name]
        if not found:
            raise EbrError(f"no ID snapshot {name!r} in {root(ws)}; have: "
                           f"{', '.join(m['name'] for m in snaps) or 'none'} (`ebr pretrain-ids list`)")
        m = found[0]
        if IdWindow.from_dict(m["window"]).overlaps(train_window):
            if not allow_overlap:
                raise EbrError(f"ID snapshot {name!r} ({IdWindow.from_dict(m['window']).describe()}) overlaps the "
                               f"retrieval training window ({train_window.describe()}): its IDs saw the labels. "
                               "Pretrain on the older window (`ebr pretrain-ids`) or pass --allow-overlap (ablations)")
            log.warning("ID snapshot %s overlaps the training window (--allow-overlap): its IDs saw the labels", name)
        return m
    fine = [m for m in snaps if not IdWindow.from_dict(m["window"]).overlaps(train_window)]
    if fine:
        return fine[-1]
    if allow_overlap and snaps:
        log.warning("no ID snapshot ends before the training window; using %s, which overlaps it (--allow-overlap)",
                    snaps[-1]["name"])
        return snaps[-1]
    raise EbrError(f"no ID snapshot whose window ends before the retrieval training window ({train_window.describe()})"
                   f"{' among ' + ', '.join(m['name'] for m in snaps) if snaps else ''}: run `ebr pretrain-ids` first "
                   "(it pretrains on the older window by default)")


def load_tables(ws: Workspace, manifest: dict, users: Vocab, pins: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """The snapshot's tables mapped onto a vocabulary: (len(users), dim), (len(pins), dim); rows of
    ids the snapshot lacks, and the padding / OOV rows, are zeros. The content hash is checked."""
    d = root(ws) / check_name(manifest["name"], "snapshot")
    missing = [f for f in FILES if not (d / f).is_file()]
    if missing:
        raise EbrError(f"ID snapshot {manifest['name']!r} is incomplete (missing {', '.join(missing)}); "
                       "pretrain it again")
    if content_hash(d) != manifest["content_hash"]:
        raise EbrError(f"ID snapshot {manifest['name']!r} does not match its manifest's content hash; "
                       "pretrain it again")
    out = []
    for kind, vocab in (("user", users), ("pin", pins)):
        try:
            table = np.load(d / f"{kind}_table.npy", allow_pickle=False)
        except ValueError as e:
            raise EbrError(f"ID snapshot {manifest['name']!r}: {kind}_table.npy is not a plain array ({e})") from None
        ids = pq.read_table(d / f"{kind}_ids.parquet")["id"]
        if table.ndim != 2 or table.shape[0] != len(ids) or table.dtype != np.float32:
            raise EbrError(f"ID snapshot {manifest['name']!r}: {kind}_table.npy has shape {table.shape}, "
                           f"{table.dtype}; expected ({len(ids)}, dim) float32")
        codes = vocab.encode(ids)
        mapped = np.zeros((len(vocab), table.shape[1]), dtype=np.float32)
        ok = codes >= FIRST_ID
        mapped[codes[ok]] = table[ok]
        out.append(mapped)
    return out[0], out[1]
