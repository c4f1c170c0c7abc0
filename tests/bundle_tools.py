"""What an attacker does to a bundle: edit files, then recompute every checksum and the version, so
that only the loader's content checks can refuse it."""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

from ebr.index.verify import BUNDLE_FILES, content_hash
from ebr.workspace import file_sha256, read_json, write_json


class Evil:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_pickle(marker: Path) -> bytes:
    import pickle

    return pickle.dumps(Evil(marker))


def reseal(bundle: Path, version: bool = True) -> None:
    """Recompute every checksum (and, by default, the version) as a whole-bundle rewrite would."""
    m = read_json(bundle / "manifest.json")
    m["checksums"] = {f: file_sha256(bundle / f) for f in BUNDLE_FILES if (bundle / f).is_file()}
    if version:
        m["version"] = m["version"].rsplit("-", 1)[0] + "-" + content_hash(m)
    write_json(bundle / "manifest.json", m)


def rewrite_tower(src: Path, dst: Path, edit: Callable[[dict[str, bytes], str], None],
                  compression: int = zipfile.ZIP_STORED) -> Path:
    """Copy a bundle and rewrite its user_tower.pt2 entries with edit(entries, root), then reseal."""
    shutil.copytree(src, dst)
    with zipfile.ZipFile(dst / "user_tower.pt2") as z:
        entries = {n: z.read(n) for n in z.namelist()}
    root = next(iter(entries)).split("/", 1)[0]
    edit(entries, root)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for n, b in entries.items():
            z.writestr(n, b)
    (dst / "user_tower.pt2").write_bytes(buf.getvalue())
    reseal(dst)
    return dst
