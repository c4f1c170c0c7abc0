"""Where artifacts live (DESIGN.md "Artifacts") and how manifests are written."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebr.data.schema import TABLES
from ebr.errors import EbrError

COMMIT_JOURNAL = "COMMIT"  # in a stage folder: the import is complete and rolls forward


class InjectedFailure(RuntimeError):
    """Raised by a failure hook (EBR_FAIL_AT_COMMIT=STEP): tests of crash safety."""


def commit_hook(step: str) -> None:
    """Crash here if EBR_FAIL_AT_COMMIT names this step (staged, journal, swap:TABLE, manifest)."""
    if os.environ.get("EBR_FAIL_AT_COMMIT") == step:
        raise InjectedFailure(f"injected failure at commit step {step!r}")


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on folder/.lock for the duration (released when the process dies);
    a second holder gets an EbrError instead of mixing its files with the first's."""
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".lock", "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            raise EbrError(f"{what} is in use by another process ({holder or 'unknown pid'}); wait for it to "
                           "finish or use another name") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield
    finally:
        f.close()


def load_checkpoint_state(path: Path) -> dict:
    """A run checkpoint (plain tensors and values: torch.load weights_only, so nothing is unpickled);
    a missing, truncated or corrupt file is an EbrError that says so."""
    import torch

    if not Path(path).is_file():
        raise EbrError(f"no checkpoint {Path(path).name} in run {Path(path).parent.parent.name!r}; train it first")
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise EbrError(f"checkpoint {Path(path).name} of run {Path(path).parent.parent.name!r} is truncated or "
                       f"corrupt ({type(e).__name__}); train the run again") from None


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str, kind: str) -> str:
    """A run, split or report name: one folder inside the workspace (no separators, no '..')."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise EbrError(f"invalid {kind} name {str(name)[:60]!r}: use letters, digits, '.', '-' or '_' "
                       "(a name is one folder inside the workspace)")
    return name


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike) -> Workspace:
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

    # ---- imports: staged, then swapped in by a journaled roll-forward --------------------------
    def stage_dir(self, source: str) -> Path:
        return self.root / ".staging" / source

    def recover_imports(self) -> None:
        """Finish any import that crashed after its commit journal was written (roll forward), so
        readers always see a source entirely old or entirely new, with a manifest that matches."""
        d = self.root / ".staging"
        if d.exists():
            for stage in sorted(d.iterdir()):
                if (stage / COMMIT_JOURNAL).exists():
                    self.roll_forward(stage.name)

    def roll_forward(self, source: str) -> None:
        """Swap a committed stage in: each staged folder replaces the live one by rename (the old
        one is parked in the stage), then the staged manifest replaces the live one. Every step is
        idempotent, so a crash at any point is finished by running this again."""
        stage = self.stage_dir(source)
        old = stage / "old"
        old.mkdir(exist_ok=True)
        moves = [(stage / "tables" / t, self.source_dir(t, source), old / t) for t in TABLES]
        moves.append((stage / "quarantine", self.quarantine_dir(source), old / "quarantine"))
        for new, live, parked in moves:
            if not new.exists():  # already swapped in
                continue
            if live.exists():
                shutil.rmtree(parked, ignore_errors=True)
                os.rename(live, parked)
            live.parent.mkdir(parents=True, exist_ok=True)
            os.rename(new, live)
            commit_hook(f"swap:{live.parent.name}")
        if (stage / "manifest.json").exists():
            os.replace(stage / "manifest.json", self.root / "tables" / "manifest.json")
            commit_hook("manifest")
        (stage / COMMIT_JOURNAL).unlink()
        shutil.rmtree(stage, ignore_errors=True)

    def quarantine_dir(self, source: str) -> Path:
        return self.root / "quarantine" / source

    @property
    def truth_dir(self) -> Path:
        return self.root / "truth"

    # ---- later stages --------------------------------------------------------------------
    def split_dir(self, name: str) -> Path:
        return self.root / "splits" / check_name(name, "split")

    def splits(self) -> list[str]:
        d = self.root / "splits"
        return sorted(p.name for p in d.iterdir() if (p / "manifest.json").exists()) if d.exists() else []

    def run_dir(self, run: str) -> Path:
        return self.root / "runs" / check_name(run, "run")

    def bundles_dir(self) -> Path:
        return self.root / "bundles"

    def resolve_bundle(self, arg: str) -> Path:
        """A bundle folder from a path, a VERSION under bundles/, or 'latest'."""
        if arg == "latest":
            found = self.latest("bundles")
            if found is None:
                raise EbrError(f"no bundle in {self.root.name}/bundles; build one with `ebr index build`")
            return found
        if Path(arg).is_dir():
            return Path(arg)
        if _NAME.fullmatch(arg) and (self.bundles_dir() / arg).is_dir():
            return self.bundles_dir() / arg
        raise EbrError(f"{Path(arg).name or arg}: not a bundle folder (give a path, a VERSION under "
                       f"{self.root.name}/bundles, or 'latest')")

    def corpus_dir(self) -> Path:
        return self.root / "corpus"

    def report_dir(self, name: str) -> Path:
        return self.root / "reports" / check_name(name, "report")

    def latest(self, kind: str) -> Path | None:
        """Highest VERSION folder under corpus/ or bundles/ (versions sort by time)."""
        d = self.root / kind
        if not d.exists():
            return None
        versions = sorted(p for p in d.iterdir() if not p.name.startswith(".") and (p / "manifest.json").exists())
        return versions[-1] if versions else None
