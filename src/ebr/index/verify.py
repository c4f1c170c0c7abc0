"""Bundle verification: what `ebr index check` reports and what the loader runs before it reads
anything from a bundle. A bundle is untrusted input.

Threat model:
- **Code execution** is refused by content, not by checksums: the user tower archive (.pt2) may
  hold only the entries `torch.export.save` writes for plain tensors, every weight and constant
  must be a raw tensor (no `use_pickle`, no custom or opaque objects, no legacy `.pt` pickles),
  `data/sample_inputs/*` must be empty (torch unpickles it, retrying with the unsafe loader),
  and every graph node must call an ATen operator that does no file I/O. This holds for a bundle
  rewritten as a whole.
- **Corrupt, mixed or partially edited bundles** are detected by checksums and the version: every
  file the loader opens is listed in the manifest with its sha256 and must be a regular file
  inside the bundle (no links, FIFOs or paths that leave it; nothing unlisted); the version's hash
  part is a hash of the manifest itself (which holds every file's checksum), recomputed here, so
  editing the manifest or swapping one file and recomputing its checksum breaks the version.
- **Every file is read once**, through a descriptor opened without following links and checked to
  be a regular file with one link; its checksum and every later parse use those same bytes, so a
  file swapped between the check and the load is never read. The user tower is handed to torch as
  a zip rebuilt from the entries checked here (a zip can hold two central directories that Python
  and torch read differently), and every symbolic-shape expression and guard in the program must
  fit a small grammar (torch passes them to sympy, which evaluates them; a string argument of any
  function but Symbol would be evaluated too). The FAISS index must have the structure its backend
  builds before FAISS reads its lists (an IVF-PQ file is walked byte by byte; the others are read
  without inverted-list data and their types checked), so no on-disk lists name files outside the
  bundle; archive members must be stored uncompressed (no zip bombs).
- A bundle **rewritten as a whole** (every checksum and the version recomputed) passes these
  checks; pin the version you expect (`--expect-version` on serve and reload) to catch it.
  A copied or renamed bundle stays valid: nothing depends on the folder's name or location.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ebr.errors import EbrError

MANIFEST = "manifest.json"
TOWER = "user_tower.pt2"
BUNDLE_FILES = (TOWER, "item_repr.npy", "pin_embeddings.npy", "index.faiss", "index_codes.npy",
                "pins.parquet", "user_state.npz", "popular.npy", "feature_state.json")
MAX_MANIFEST_BYTES = 16 << 20
MODEL_NAME = "model"  # torch.export.save's default model name inside a .pt2 archive
# Entries torch.export.save writes for a program whose weights and constants are plain tensors.
_PT2_ENTRIES = (r"archive_format", r"archive_version", r"byteorder", r"\.data/version", r"\.data/serialization_id",
                rf"models/{MODEL_NAME}\.json", rf"data/weights/{MODEL_NAME}_weights_config\.json",
                r"data/weights/weight_[0-9]+", rf"data/constants/{MODEL_NAME}_constants_config\.json",
                r"data/constants/tensor_[0-9]+", rf"data/sample_inputs/{MODEL_NAME}\.pt")
_PT2_RE = re.compile("(?:" + "|".join(_PT2_ENTRIES) + ")")
_PAYLOAD_RE = {"weights": re.compile(r"weight_[0-9]+"), "constants": re.compile(r"tensor_[0-9]+")}
# symbolic shapes: torch hands expr_str to sympy.sympify (an eval); only this small grammar passes
_SYMBOL = re.compile(r"[a-z]{1,3}[0-9]{1,9}")
_SYM_CALLS = {"Symbol", "Integer", "Max", "Min", "Mul", "Add", "Pow", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or",
              "Not", "FloorDiv", "Mod", "PythonMod", "CleanDiv", "CeilDiv", "IntTrueDiv", "ModularIndexing"}
_SYM_KWARGS = {"positive", "integer", "nonnegative", "real"}
_GUARD_TERM = r"(?:L\['[A-Za-z_][A-Za-z0-9_]{0,63}'\]\.size\(\)\[[0-9]{1,2}\]|-?[0-9]{1,12})"
_GUARD = re.compile(rf"{_GUARD_TERM}(?: (?:==|!=|<=|>=|<|>) {_GUARD_TERM})+")
MAX_FILE_BYTES = 1 << 36  # 64 GiB: any single bundle file above this is refused before reading
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


def _read_regular(path: Path, limit: int = MAX_FILE_BYTES) -> tuple[bytes | None, str | None]:
    """(bytes, None) for a regular file with one link, read through one descriptor opened without
    following links and without blocking (a FIFO never hangs); else (None, the problem)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, "missing"
    except OSError:
        return None, "not a regular file"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if st.st_nlink != 1:
            return None, "a hard link (a bundle file must be its own file)"
        if st.st_size > limit:
            return None, f"larger than {limit:,} bytes"
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(), None
    finally:
        os.close(fd)


def _read_manifest(root: Path, problems: list[str]) -> dict[str, Any] | None:
    data, bad = _read_regular(root / MANIFEST, MAX_MANIFEST_BYTES)
    if bad:
        problems.append(f"{MANIFEST}: {bad}")
        return None
    try:
        m = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
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


def _symbolic_ok(expr: Any) -> bool:
    """True if a symbolic-shape expression uses only symbols, integers, arithmetic, comparisons and
    the whitelisted sympy functions (nothing sympify's eval could turn into a call of its own)."""
    if not isinstance(expr, str) or len(expr) > 2000:
        return False
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return False
    symbol_names = {id(n.args[0]) for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                    and n.func.id == "Symbol" and n.args}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SYM_CALLS):
                return False
            if any(k.arg not in _SYM_KWARGS or not isinstance(k.value, ast.Constant) for k in node.keywords):
                return False
            if node.func.id == "Symbol" and not (len(node.args) == 1 and isinstance(node.args[0], ast.Constant)
                                                 and isinstance(node.args[0].value, str)
                                                 and _SYMBOL.fullmatch(node.args[0].value)):
                return False
        elif isinstance(node, ast.Name):
            if not (node.id in _SYM_CALLS or _SYMBOL.fullmatch(node.id) or node.id in ("True", "False")):
                return False
        elif isinstance(node, ast.Constant):  # a string anywhere else would be sympified (evaluated) too
            if not (isinstance(node.value, (int, float, bool)) or (isinstance(node.value, str)
                                                                   and id(node) in symbol_names)):
                return False
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.keyword,
                                   ast.Load, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)):
            return False
    return True


def _program_problems(program: Any, name: str) -> list[str]:
    """What in an exported program's JSON would run code or call anything but ATen on load."""
    problems: list[str] = []
    try:
        graph = program["graph_module"]["graph"]
        targets = {n["target"] for n in graph["nodes"]}
    except (KeyError, TypeError):
        return [f"{name}: models/{MODEL_NAME}.json is not an exported program"]
    if graph.get("custom_obj_values"):
        problems.append(f"{name}: the graph holds custom objects")
    bad = sorted(str(t)[:80] for t in targets
                 if not (isinstance(t, str) and _SAFE_TARGET.fullmatch(t)) or _IO_OP.search(str(t)))
    if bad:
        problems.append(f"{name}: graph calls non-ATen targets: {', '.join(bad[:5])}")
    exprs: list[Any] = []
    stack = [program]
    while stack:  # every expr_str anywhere in the program (sizes, strides, offsets, sym values)
        x = stack.pop()
        if isinstance(x, dict):
            if "expr_str" in x:
                exprs.append(x["expr_str"])
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    bad_exprs = [str(e)[:80] for e in exprs if not _symbolic_ok(e)]
    if bad_exprs:
        problems.append(f"{name}: symbolic-shape expressions outside the allowed grammar: {bad_exprs[0]!r}")
    rc = program.get("range_constraints", {})
    if not isinstance(rc, dict) or not all(isinstance(k, str) and _SYMBOL.fullmatch(k) for k in rc):
        problems.append(f"{name}: range constraints must name plain symbols")
    guards = program.get("guards_code", [])
    if not isinstance(guards, list) or not all(isinstance(g, str) and _GUARD.fullmatch(g) for g in guards):
        problems.append(f"{name}: guards must be size comparisons of the inputs")
    return problems


def check_pt2(data: bytes, name: str = TOWER) -> tuple[list[str], bytes | None]:
    """(problems, archive) for a torch.export archive: the problems that would let loading it run
    code (none: safe), and the archive rebuilt from exactly the entries checked here, which is
    what the loader hands to torch (so torch cannot read other entries than Python did)."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        infos = z.infolist()
    except Exception as e:  # any parse failure of hostile bytes is a problem, never a crash
        return [f"{name}: not a readable .pt2 archive ({type(e).__name__})"], None
    problems: list[str] = []
    with z:
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            problems.append(f"{name}: duplicate archive entries")
        if any(i.compress_type != zipfile.ZIP_STORED or i.flag_bits & 0x1 for i in infos):
            problems.append(f"{name}: compressed or encrypted entries (torch.export.save stores entries as they are)")
        if not _single_directory(data, z):
            problems.append(f"{name}: the zip's central directory is not exactly at its end, or there are several "
                            "(parsers would disagree on the entries)")
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1:
            return problems + [f"{name}: archive entries must share one top-level folder, found {len(roots)}"], None
        root = roots.pop()
        sizes = {i.filename[len(root) + 1:]: i.file_size for i in infos}
        for rel, size in sizes.items():
            if not _PT2_RE.fullmatch(rel):
                problems.append(f"{name}: unexpected archive entry {rel[:80]!r} (pickles, custom objects, extra "
                                "files and compiled code are refused)")
            elif rel.startswith("data/sample_inputs/") and size:
                problems.append(f"{name}: non-empty {rel} (sample inputs are unpickled on load; export with none)")
        if problems:
            return problems, None
        try:
            entries = {n: z.read(n) for n in names}
        except Exception as e:
            return [f"{name}: unreadable archive entries ({type(e).__name__})"], None
    for kind, cfg_name in (("weights", f"data/weights/{MODEL_NAME}_weights_config.json"),
                           ("constants", f"data/constants/{MODEL_NAME}_constants_config.json")):
        if cfg_name not in sizes:
            problems.append(f"{name}: missing {cfg_name}")
            continue
        try:
            items = list(json.loads(entries[f"{root}/{cfg_name}"])["config"].items())
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError):
            problems.append(f"{name}: {cfg_name} is not a payload config")
            continue
        for fqn, meta in items:
            label = f"{name}: {kind} entry {str(fqn)[:80]!r}"
            if not isinstance(meta, dict):
                problems.append(f"{label} is malformed")
                continue
            if meta.get("use_pickle") is not False:
                problems.append(f"{label} is pickled (use_pickle)")
            if not (isinstance(meta.get("path_name"), str) and _PAYLOAD_RE[kind].fullmatch(meta["path_name"])):
                problems.append(f"{label} is not a plain tensor (path {str(meta.get('path_name'))[:80]!r})")
            elif not isinstance(meta.get("tensor_meta"), dict):
                problems.append(f"{label} has no tensor metadata")
    model_json = f"models/{MODEL_NAME}.json"
    if model_json not in sizes:
        problems.append(f"{name}: missing {model_json}")
    else:
        try:
            problems += _program_problems(json.loads(entries[f"{root}/{model_json}"]), name)
        except (ValueError, UnicodeDecodeError, RecursionError):
            problems.append(f"{name}: {model_json} is not valid JSON")
    if problems:
        return problems, None
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        for n in names:
            out.writestr(n, entries[n])
    return [], buf.getvalue()


def _single_directory(data: bytes, z: zipfile.ZipFile) -> bool:
    """True if the end record is the file's last 22 bytes (no comment), the one central directory
    ends right before it (or before the zip64 end record and locator torch writes), and Python found
    it where the end records say (no data prepended or hidden between directories)."""
    n = len(data)
    if n < 22 or data[-22:-18] != b"PK\x05\x06":
        return False
    size_cd, offset_cd, comment = struct.unpack("<IIH", data[-10:])
    end = n - 22
    if n >= 98 and data[n - 42: n - 38] == b"PK\x06\x07" and data[n - 98: n - 94] == b"PK\x06\x06":
        size_cd, offset_cd = struct.unpack("<QQ", data[n - 98 + 40: n - 98 + 56])  # zip64 end record
        end = n - 98
    return comment == 0 and offset_cd + size_cd == end and z.start_dir == offset_cd


def _ivfpq_layout_ok(data: bytes) -> bool:
    """Walk the bytes of IndexRefineFlat(IndexIVFPQ(IndexFlatIP), IndexFlat) as `build_index`
    writes it: every nested index of the expected type and metric, in-memory inverted lists
    ('ilar', never on-disk lists that name a file), the file ending exactly where it should."""
    p = 0

    def fourcc(*want: bytes) -> None:
        nonlocal p
        if data[p: p + 4] not in want:
            raise ValueError(data[p: p + 4])
        p += 4

    def header() -> None:  # d, ntotal, 2 dummies, is_trained, metric (inner product: no metric_arg)
        nonlocal p
        if struct.unpack_from("<i", data, p + 29)[0] != faiss_metric_ip:
            raise ValueError("metric")
        p += 33

    def size_t() -> int:
        nonlocal p
        (v,) = struct.unpack_from("<Q", data, p)
        p += 8
        return v

    def blob(width: int = 1) -> None:
        nonlocal p
        n = size_t()  # (not `p += size_t() * width`: that reads p before size_t moves it)
        p += n * width

    faiss_metric_ip = 0
    fourcc(b"IxRF")
    header()
    fourcc(b"IwPQ")
    header()
    nlist = size_t()
    size_t()  # nprobe
    fourcc(b"IxFI")  # the coarse quantizer
    header()
    blob(4)  # its vectors (the count is of 4-byte units)
    if data[p] != 0:  # direct map: none
        raise ValueError("direct map")
    p += 1
    blob(8)
    p += 1  # by_residual
    code_size = size_t()
    size_t(), size_t(), size_t()  # PQ: d, M, nbits
    blob(4)  # PQ centroids
    fourcc(b"ilar")
    if size_t() != nlist or size_t() != code_size:
        raise ValueError("lists")
    fourcc(b"full")
    n = size_t()
    sizes = struct.unpack_from(f"<{n}Q", data, p)
    p += 8 * n
    p += sum(sizes) * (code_size + 8)  # codes and ids of every list
    fourcc(b"IxFI", b"IxF2")  # the refinement vectors
    header()
    blob(4)
    p += 4  # k_factor
    return p == len(data)


def check_index(data: bytes, backend: str, n: int, dim: int) -> list[str]:
    """Problems of a FAISS index file: its structure must be what `build_index` gives `backend`, found
    before anything could open a file (on-disk inverted lists name one): an IVF-PQ file is walked
    byte by byte, the others are read without inverted-list data and their types checked."""
    import faiss

    label = f"index.faiss: not the structure a {backend} bundle has"
    if backend == "ivfpq":
        try:
            if not _ivfpq_layout_ok(data):
                return [label]
        except (ValueError, IndexError, struct.error):
            return [label]
    try:  # keep the owning object alive: a downcast view of a freed index reads garbage
        owner = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8),
                                        0 if backend == "ivfpq" else faiss.IO_FLAG_SKIP_IVF_DATA)
        idx = faiss.downcast_index(owner)
    except Exception as e:
        return [f"index.faiss: not a readable FAISS index ({type(e).__name__})"]
    flat = (faiss.IndexFlatIP, faiss.IndexFlat)
    if backend == "exact":
        ok = isinstance(idx, faiss.IndexFlatIP)
    elif backend == "hnsw":
        ok = isinstance(idx, faiss.IndexHNSWFlat) and isinstance(faiss.downcast_index(idx.storage), flat)
    else:
        base = faiss.downcast_index(idx.base_index) if isinstance(idx, faiss.IndexRefineFlat) else None
        ok = (isinstance(base, faiss.IndexIVFPQ) and isinstance(faiss.downcast_index(base.quantizer), flat)
              and isinstance(faiss.downcast_InvertedLists(base.invlists), faiss.ArrayInvertedLists))
    if not ok:
        return [f"{label} (got {type(idx).__name__})"]
    if idx.ntotal != n or idx.d != dim:
        return [f"index.faiss: {idx.ntotal} vectors of width {idx.d}, expected {n} of width {dim}"]
    return []


def check_npz(data: bytes, name: str) -> list[str]:
    """An .npz must store its members uncompressed (a compressed member can expand without bound)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            if any(i.compress_type != zipfile.ZIP_STORED for i in z.infolist()):
                return [f"{name}: compressed members (np.savez stores them as they are)"]
    except Exception as e:
        return [f"{name}: not a readable .npz ({type(e).__name__})"]
    return []


@dataclass
class CheckedBundle:
    """A bundle's manifest and the bytes of its files, read once and checked: the loader parses
    these bytes, never the files again. `tower` is the user tower archive rebuilt from its checked
    entries."""

    manifest: dict[str, Any]
    files: dict[str, bytes]
    tower: bytes


def _check(root: Path, expect_version: str | None) -> tuple[dict[str, Any] | None, dict[str, bytes], bytes | None,
                                                              list[str]]:
    if not root.is_dir():
        return None, {}, None, [f"{root.name or root}: not a bundle folder"]
    problems: list[str] = []
    m = _read_manifest(root, problems)
    for extra in sorted(set(os.listdir(root)) - set(BUNDLE_FILES) - {MANIFEST}):
        problems.append(f"unexpected file {extra[:80]!r} in the bundle")
    files: dict[str, bytes] = {}
    for f in BUNDLE_FILES:
        data, bad = _read_regular(root / f)
        if bad:
            problems.append(f"{f}: {bad}")
        else:
            files[f] = data
    sums = m["checksums"] if m is not None else {}
    for key in sorted(set(sums) - set(BUNDLE_FILES)):
        problems.append(f"{MANIFEST}: checksum for {str(key)[:80]!r}, which is not a bundle file")
    if m is not None:
        for f, data in files.items():
            if not isinstance(sums.get(f), str):
                problems.append(f"{f}: no checksum in the manifest")
            elif hashlib.sha256(data).hexdigest() != sums[f]:
                problems.append(f"{f}: checksum mismatch (corrupt, or modified after the bundle was built)")
        tv, iv = m["user_tower"].get("model_version"), m["index"].get("model_version")
        if tv != iv:
            problems.append(f"user tower model version {str(tv)[:40]} != index model version {str(iv)[:40]}: "
                            "rebuild the bundle from one checkpoint")
        if not m["version"].endswith("-" + content_hash(m)):
            problems.append(f"version {m['version'][:60]!r} does not match the manifest's content hash "
                            f"{content_hash(m)} (the manifest was edited)")
        if expect_version is not None and m["version"] != expect_version:
            problems.append(f"version {m['version'][:60]!r} is not the expected {expect_version!r}")
    tower = None
    if TOWER in files:  # content checks run whatever the checksums say
        pt2_problems, tower = check_pt2(files[TOWER])
        problems += pt2_problems
    if "user_state.npz" in files:
        problems += check_npz(files["user_state.npz"], "user_state.npz")
    if m is not None and "index.faiss" in files and "index_codes.npy" in files:
        try:
            n = int(np.load(io.BytesIO(files["index_codes.npy"])).shape[0])
            problems += check_index(files["index.faiss"], m["index"]["backend"], n, m["embedding_dim"])
        except Exception as e:
            problems.append(f"index_codes.npy: not a readable array ({type(e).__name__})")
    return m, files, tower, problems


def check_bundle(path: str | os.PathLike, expect_version: str | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """Every problem of a bundle folder (not only the first): (manifest or None, problems)."""
    m, _, _, problems = _check(Path(path), expect_version)
    return m, problems


def verified_bundle(path: str | os.PathLike, expect_version: str | None = None) -> CheckedBundle:
    """The checked bytes of a bundle that passed every check; BundleError listing all problems otherwise."""
    m, files, tower, problems = _check(Path(path), expect_version)
    if problems:
        raise BundleError(f"bundle {Path(path).name!r} refused ({len(problems)} problem"
                          f"{'s' if len(problems) > 1 else ''}): " + "; ".join(problems))
    assert m is not None and tower is not None
    return CheckedBundle(m, files, tower)
