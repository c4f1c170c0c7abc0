"""Where artifacts live (DESIGN.md "Artifacts") and how manifests are written."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebr.data.schema import TABLES


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def file_sha256(path: Path, limit: int | None = None) -> str:
    """Content hash of a file (the first `limit` bytes when given, for very large inputs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while True:
            chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("numpy", "pyarrow", "duckdb", "torch", "faiss"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # an optional library missing is recorded, not fatal
            continue
    return out


def version_stamp() -> str:
    """The sortable UTC timestamp that starts a VERSION, e.g. 20261126T034400123456Z."""
    return now_utc().strftime("%Y%m%dT%H%M%S%fZ")


def new_version(content: str) -> str:
    """Sortable UTC timestamp plus a short content hash, e.g. 20261126T034400123456Z-1a2b3c4d."""
    return f"{version_stamp()}-{hashlib.sha256(content.encode()).hexdigest()[:8]}"


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so readers never see half a manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike) -> "Workspace":
        return cls(Path(path).resolve())

    # ---- tables -------------------------------------------------------------------------
    def table_dir(self, table: str) -> Path:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; tables are {', '.join(TABLES)}")
        return self.root / "tables" / table

    def source_dir(self, table: str, source: str) -> Path:
        return self.table_dir(table) / source

    def table_glob(self, table: str) -> str:
        return str(self.table_dir(table) / "*" / "*.parquet")

    def has_table(self, table: str) -> bool:
        return any(self.table_dir(table).glob("*/*.parquet"))

    def sources(self) -> list[str]:
        names: set[str] = set()
        for t in TABLES:
            d = self.table_dir(t)
            if d.exists():
                names.update(p.name for p in d.iterdir() if p.is_dir())
        return sorted(names)

    def clear_source(self, source: str) -> None:
        """Remove every table's rows and the quarantine of one source (re-import replaces)."""
        for t in TABLES:
            shutil.rmtree(self.source_dir(t, source), ignore_errors=True)
        shutil.rmtree(self.quarantine_dir(source), ignore_errors=True)

    def quarantine_dir(self, source: str) -> Path:
        return self.root / "quarantine" / source

    @property
    def truth_dir(self) -> Path:
        return self.root / "truth"

    # ---- later stages --------------------------------------------------------------------
    def split_dir(self, name: str) -> Path:
        return self.root / "splits" / name

    def splits(self) -> list[str]:
        d = self.root / "splits"
        return sorted(p.name for p in d.iterdir() if (p / "manifest.json").exists()) if d.exists() else []

    def run_dir(self, run: str) -> Path:
        return self.root / "runs" / run

    def bundles_dir(self) -> Path:
        return self.root / "bundles"

    def corpus_dir(self) -> Path:
        return self.root / "corpus"

    def report_dir(self, name: str) -> Path:
        return self.root / "reports" / name

    def latest(self, kind: str) -> Path | None:
        """Highest VERSION folder under corpus/ or bundles/ (versions sort by time)."""
        d = self.root / kind
        if not d.exists():
            return None
        versions = sorted(p for p in d.iterdir() if (p / "manifest.json").exists())
        return versions[-1] if versions else None
