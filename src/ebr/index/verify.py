"""Bundle verification: what `ebr index check` reports and what the loader runs before it reads
anything from a bundle. A bundle is untrusted input.

Threat model:
- **Code execution** is refused by content, not by checksums: the user tower archive (.pt2) may
  hold only the entries `torch.export.save` writes for plain tensors, every weight and constant
  must be a raw tensor (no `use_pickle`, no custom or opaque objects, no legacy `.pt` pickles),
  `data/sample_inputs/*` must be empty (torch unpickles it, with a `weights_only=False` retry),
  and every graph node must call an ATen operator that does no file I/O. This holds for a bundle rewritten as a whole.
- **Corrupt, mixed or partially edited bundles** are detected by checksums and the version: every
  file the loader opens is listed in the manifest with its sha256 and must be a regular file
  inside the bundle (no links, FIFOs or paths that leave it; nothing unlisted); the version's hash
  part is a hash of the manifest itself (which holds every file's checksum), recomputed here, so
  editing the manifest or swapping one file and recomputing its checksum breaks the version.
- A bundle **rewritten as a whole** (every checksum and the version recomputed) passes these
  checks; pin the version you expect (`--expect-version` on serve and reload) to catch it.
  A copied or renamed bundle stays valid: nothing depends on the folder's name or location.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import zipfile
from pathlib import Path
from typing import Any

from ebr.errors import EbrError
from ebr.workspace import file_sha256

MANIFEST = "manifest.json"
TOWER = "user_tower.pt2"
BUNDLE_FILES = (TOWER, "item_repr.npy", "pin_embeddings.npy", "index.faiss", "index_codes.npy",
                "pins.parquet", "user_state.npz", "popular.npy", "feature_state.json")
MAX_MANIFEST_BYTES = 16 << 20
MODEL_NAME = "model"  # torch.export.save's default model name inside a .pt2 archive
# Entries torch.export.save writes for a program whose weights and constants are plain tensors.
_PT2_ENTRIES = (r"archive_format", r"archive_version", r"byteorder", r"\.data/version", r"\.data/serialization_id",
                rf"models/{MODEL_NAME}\.json", rf"data/weights/{MODEL_NAME}_weights_config\.json",
                r"data/weights/weight_\d+", rf"data/constants/{MODEL_NAME}_constants_config\.json",
                r"data/constants/tensor_\d+", rf"data/sample_inputs/{MODEL_NAME}\.pt")
_PT2_RE = re.compile("(?:" + "|".join(_PT2_ENTRIES) + ")")
_PAYLOAD_RE = {"weights": re.compile(r"weight_\d+"), "constants": re.compile(r"tensor_\d+")}
_SAFE_TARGET = re.compile(r"(torch\.ops\.aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+|_operator\.[a-z_]+)")
_IO_OP = re.compile(r"file|save|load|print|pickle", re.IGNORECASE)  # ATen ops that touch files (e.g. from_file)


class BundleError(EbrError, RuntimeError):
    """A bundle that must not be served; the message lists every problem found."""


def content_hash(manifest: dict[str, Any]) -> str:
    """The version's hash part: sha256 of the manifest without its own version (16 hex digits)."""
    body = {k: v for k, v in manifest.items() if k != "version"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()[
        :16
    ]


def _regular(path: Path) -> str | None:
    """None if path is a regular file (not a link, FIFO, device or folder), else the problem."""
    try:
        st = os.lstat(path)
    except OSError:
        return "missing"
    return None if stat.S_ISREG(st.st_mode) else "not a regular file"


def _read_manifest(root: Path, problems: list[str]) -> dict[str, Any] | None:
    bad = _regular(root / MANIFEST)
    if bad:
        problems.append(f"{MANIFEST}: {bad}")
        return None
    if (root / MANIFEST).stat().st_size > MAX_MANIFEST_BYTES:
        problems.append(f"{MANIFEST}: larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        return None
    try:
        m = json.loads((root / MANIFEST).read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        problems.append(f"{MANIFEST}: not valid JSON ({type(e).__name__})")
        return None
    if not isinstance(m, dict):
        problems.append(f"{MANIFEST}: must be a JSON object, got {type(m).__name__}")
        return None
    shape = {
        "version": str,
        "checksums": dict,
        "user_tower": dict,
        "index": dict,
        "history_len": int,
        "modes": list,
        "config": dict,
    }
    for key, typ in shape.items():
        if not isinstance(m.get(key), typ):
            problems.append(f"{MANIFEST}: field {key!r} missing or not a {typ.__name__}")
    if problems:
        return None
    for sect, f in (("user_tower", TOWER), ("index", "index.faiss")):
        if m[sect].get("file") != f:
            problems.append(f"{MANIFEST}: {sect}.file must be {f!r}")
        if not isinstance(m[sect].get("model_version"), str):
            problems.append(f"{MANIFEST}: {sect}.model_version missing")
    if not 1 <= m["history_len"] <= 10_000:
        problems.append(f"{MANIFEST}: history_len {m['history_len']} out of range")
    from ebr.index.backends import BACKENDS

    if m["index"].get("backend") not in BACKENDS:
        problems.append(f"{MANIFEST}: index.backend must be one of {', '.join(BACKENDS)}")
    return m


def check_pt2(path: Path) -> list[str]:
    """Problems that would let loading this torch.export archive run code (empty list: safe)."""
    name = path.name
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        return [f"{name}: not a readable .pt2 archive ({type(e).__name__})"]
    problems: list[str] = []
    with z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            problems.append(f"{name}: duplicate archive entries")
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1:
            return problems + [f"{name}: archive entries must share one top-level folder, found {len(roots)}"]
        root = roots.pop()
        sizes = {i.filename[len(root) + 1 :]: i.file_size for i in infos}
        for rel, size in sizes.items():
            if not _PT2_RE.fullmatch(rel):
                problems.append(
                    f"{name}: unexpected archive entry {rel!r} (pickles, custom objects, extra files "
                    "and compiled code are refused)"
                )
            elif rel.startswith("data/sample_inputs/") and size:
                problems.append(f"{name}: non-empty {rel} (sample inputs are unpickled on load; export with none)")
        for kind, cfg_name in (
            ("weights", f"data/weights/{MODEL_NAME}_weights_config.json"),
            ("constants", f"data/constants/{MODEL_NAME}_constants_config.json"),
        ):
            if cfg_name not in sizes:
                problems.append(f"{name}: missing {cfg_name}")
                continue
            try:
                cfg = json.loads(z.read(f"{root}/{cfg_name}"))["config"]
                items = list(cfg.items())
            except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
                problems.append(f"{name}: {cfg_name} is not a payload config")
                continue
            for fqn, meta in items:
                if not isinstance(meta, dict):
                    problems.append(f"{name}: {kind} entry {str(fqn)[:80]!r} is malformed")
                    continue
                if meta.get("use_pickle") is not False:
                    problems.append(f"{name}: {kind} entry {str(fqn)[:80]!r} is pickled (use_pickle)")
                if not (isinstance(meta.get("path_name"), str) and _PAYLOAD_RE[kind].fullmatch(meta["path_name"])):
                    problems.append(
                        f"{name}: {kind} entry {str(fqn)[:80]!r} is not a plain tensor "
                        f"(path {str(meta.get('path_name'))[:80]!r})"
                    )
                elif not isinstance(meta.get("tensor_meta"), dict):
                    problems.append(f"{name}: {kind} entry {str(fqn)[:80]!r} has no tensor metadata")
        model_json = f"models/{MODEL_NAME}.json"
        if model_json not in sizes:
            problems.append(f"{name}: missing {model_json}")
        else:
            try:
                program = json.loads(z.read(f"{root}/{model_json}"))
                nodes = program["graph_module"]["graph"]["nodes"]
                targets = {n["target"] for n in nodes}
                if program["graph_module"]["graph"].get("custom_obj_values"):
                    problems.append(f"{name}: the graph holds custom objects")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                problems.append(f"{name}: {model_json} is not an exported program")
            else:
                bad = sorted(
                    str(t)[:80]
                    for t in targets
                    if not (isinstance(t, str) and _SAFE_TARGET.fullmatch(t)) or _IO_OP.search(str(t))
                )
                if bad:
                    problems.append(f"{name}: graph calls non-ATen targets: {', '.join(bad[:5])}")
    return problems


def check_bundle(path: str | os.PathLike, expect_version: str | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """Every problem of a bundle folder (not only the first): (manifest or None, problems)."""
    root = Path(path)
    if not root.is_dir():
        return None, [f"{root.name or root}: not a bundle folder"]
    problems: list[str] = []
    m = _read_manifest(root, problems)
    present = set(os.listdir(root))
    for extra in sorted(present - set(BUNDLE_FILES) - {MANIFEST}):
        problems.append(f"unexpected file {extra!r} in the bundle")
    if m is None:
        if (root / TOWER).exists() and not _regular(root / TOWER):
            problems += check_pt2(root / TOWER)
        return None, problems
    sums = m["checksums"]
    for key in sorted(set(sums) - set(BUNDLE_FILES)):
        problems.append(f"{MANIFEST}: checksum for {str(key)[:80]!r}, which is not a bundle file")
    for f in BUNDLE_FILES:
        bad = _regular(root / f)
        if bad:
            problems.append(f"{f}: {bad}")
        elif not isinstance(sums.get(f), str):
            problems.append(f"{f}: no checksum in the manifest")
        elif file_sha256(root / f) != sums[f]:
            problems.append(f"{f}: checksum mismatch (corrupt, or modified after the bundle was built)")
    tv, iv = m["user_tower"].get("model_version"), m["index"].get("model_version")
    if tv != iv:
        problems.append(
            f"user tower model version {str(tv)[:40]} != index model version {str(iv)[:40]}: "
            "rebuild the bundle from one checkpoint"
        )
    if not m["version"].endswith("-" + content_hash(m)):
        problems.append(
            f"version {m['version'][:60]!r} does not match the manifest's content hash "
            f"{content_hash(m)} (the manifest was edited)"
        )
    if expect_version is not None and m["version"] != expect_version:
        problems.append(f"version {m['version'][:60]!r} is not the expected {expect_version!r}")
    if not _regular(root / TOWER):
        problems += check_pt2(root / TOWER)
    return m, problems


def verified_manifest(path: str | os.PathLike, expect_version: str | None = None) -> dict[str, Any]:
    """The manifest of a bundle that passed every check; BundleError listing all problems otherwise."""
    m, problems = check_bundle(path, expect_version)
    if problems:
        raise BundleError(
            f"bundle {Path(path).name!r} refused ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}): " + "; ".join(problems)
        )
    assert m is not None
    return m
