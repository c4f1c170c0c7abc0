"""Bundles are untrusted: crafted archives never run code, and partial edits are caught.

Every crafted bundle here has its checksums and version recomputed (tests/bundle_tools.reseal), as
an attacker who rewrites a bundle would, so only the content checks of index/verify.py stand
between it and code execution. Each attack is first shown to be live against a plain
`torch.export.load` (the marker file appears), then refused by the loader (no marker).
Mutation caught: dropping any rule of `check_pt2` (or loading before checking) creates the marker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from ebr.config import RunConfig
from ebr.index.bundle import build_bundle
from ebr.index.verify import BundleError, check_bundle
from ebr.serve.retriever import Retriever
from ebr.train.loop import train
from ebr.workspace import read_json, write_json
from tests.bundle_tools import evil_pickle, reseal, rewrite_tower


@pytest.fixture(scope="module")
def bundle(tiny_ws):
    train(tiny_ws, RunConfig.load(None, {"train.epochs": 1, "model.hidden": [32]}), run="safety", progress=False)
    return build_bundle(tiny_ws, "safety", "latest")


def _config(entries: dict[str, bytes], root: str, kind: str) -> tuple[str, dict]:
    name = f"{root}/data/{kind}/model_{kind}_config.json"
    return name, json.loads(entries[name])


def pickled_weight(entries, root, marker):
    name, cfg = _config(entries, root, "weights")
    fqn = next(iter(cfg["config"]))
    cfg["config"][fqn]["use_pickle"] = True
    entries[name] = json.dumps(cfg).encode()
    entries[f"{root}/data/weights/{cfg['config'][fqn]['path_name']}"] = evil_pickle(marker)


def pickled_constant(entries, root, marker):
    name, cfg = _config(entries, root, "constants")
    cfg["config"]["lifted_tensor_99"] = {"path_name": "tensor_99", "is_param": False, "use_pickle": True,
                                         "tensor_meta": None}
    entries[name] = json.dumps(cfg).encode()
    entries[f"{root}/data/constants/tensor_99"] = evil_pickle(marker)


def opaque_constant(entries, root, marker):
    name, cfg = _config(entries, root, "constants")
    cfg["config"]["obj"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    entries[name] = json.dumps(cfg).encode()
    entries[f"{root}/data/constants/opaque_obj_0"] = evil_pickle(marker)


def sample_inputs(entries, root, marker):
    entries[f"{root}/data/sample_inputs/model.pt"] = evil_pickle(marker)


def legacy_weights(entries, root, marker):
    entries[f"{root}/data/weights/model.pt"] = evil_pickle(marker)


def sympy_expression(entries, root, marker):
    """torch hands every symbolic-shape expr_str to sympy.sympify, which evaluates it."""
    name = f"{root}/models/model.json"
    program = json.loads(entries[name])
    size = program["graph_module"]["graph"]["tensor_values"]["hist"]["sizes"][0]["as_expr"]
    size["expr_str"] = f"__import__('os').system('touch {marker}') + " + size["expr_str"]
    entries[name] = json.dumps(program).encode()


ATTACKS = [pickled_weight, pickled_constant, opaque_constant, sample_inputs, legacy_weights, sympy_expression]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.__name__ for a in ATTACKS])
def test_crafted_tower_is_refused_without_running_code(bundle, tmp_path, attack):
    marker = tmp_path / "pwned"
    bad = rewrite_tower(bundle, tmp_path / "bad", lambda e, root: attack(e, root, marker))
    try:  # the attack is live: plain torch.export.load runs the payload
        torch.export.load(bad / "user_tower.pt2")
    except Exception:
        pass
    assert marker.exists(), f"{attack.__name__}: the crafted archive does not exercise the attack path"
    marker.unlink()
    assert check_bundle(bad)[1], "the integrity checks alone must not pass a crafted tower"
    with pytest.raises(BundleError, match="user_tower.pt2"):
        Retriever(bad)
    cli = subprocess.run([sys.executable, "-m", "ebr.cli", "index", "check", str(bad)], capture_output=True, text=True)
    assert cli.returncode == 1 and "problem: user_tower.pt2" in cli.stdout
    assert not marker.exists(), f"{attack.__name__}: loading ran the payload"


def test_a_built_bundle_passes_and_copies_stay_valid(bundle, tmp_path):
    """Mutation caught: a version that depends on the folder name or location."""
    assert check_bundle(bundle)[1] == []
    copy = tmp_path / "renamed-elsewhere"
    shutil.copytree(bundle, copy)
    assert Retriever(copy).version == bundle.name
    assert subprocess.run([sys.executable, "-m", "ebr.cli", "index", "check", str(copy)]).returncode == 0
    with pytest.raises(BundleError, match="not the expected"):
        Retriever(copy, expect_version="20990101T000000000000Z-0000000000000000")


def _copy(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst)
    return dst


def test_partial_edits_are_caught(bundle, tiny_ws, tmp_path):
    """Each edit recomputes the checksums but not the version. Mutations caught: a version not
    recomputed from the manifest, or a manifest not covered by it; unlisted files served."""
    # an edited manifest (checksums untouched)
    b = _copy(bundle, tmp_path / "edited")
    m = read_json(b / "manifest.json")
    m["modes"] = ["single", "multi"]
    write_json(b / "manifest.json", m)
    with pytest.raises(BundleError, match="content hash"):
        Retriever(b)
    # another run's user tower, its checksum recomputed
    train(tiny_ws, RunConfig.load(None, {"train.epochs": 1, "model.hidden": [32], "train.seed": 7}),
          run="other", progress=False)
    other = build_bundle(tiny_ws, "other", "latest")
    b = _copy(bundle, tmp_path / "mixed")
    shutil.copy(other / "user_tower.pt2", b / "user_tower.pt2")
    reseal(b, version=False)
    with pytest.raises(BundleError, match="content hash"):
        Retriever(b)
    # a tower file the manifest does not list
    b = _copy(bundle, tmp_path / "unlisted")
    m = read_json(b / "manifest.json")
    del m["checksums"]["user_tower.pt2"]
    write_json(b / "manifest.json", m)
    with pytest.raises(BundleError, match="user_tower.pt2: no checksum"):
        Retriever(b)
    # an extra file, and a checksum key that leaves the bundle: every problem is reported
    b = _copy(bundle, tmp_path / "extra")
    (b / "notes.txt").write_text("hi")
    m = read_json(b / "manifest.json")
    m["checksums"]["../../dev/zero"] = "0" * 64
    with open(b / "pin_embeddings.npy", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    write_json(b / "manifest.json", m)
    _, problems = check_bundle(b)
    text = "; ".join(problems)
    assert "unexpected file 'notes.txt'" in text and "'../../dev/zero'" in text
    assert "pin_embeddings.npy: checksum mismatch" in text and "content hash" in text, text


def _returns_within(fn, seconds: float) -> tuple[bool, BaseException | None]:
    box: list[BaseException | None] = [None]

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box[0] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive(), box[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs need a POSIX system")
def test_links_and_fifos_are_refused_without_hanging(bundle, tmp_path):
    """A FIFO manifest or a FIFO/symlinked file hung the loader. Mutation caught: following links
    or opening files before checking that they are regular."""
    b = _copy(bundle, tmp_path / "fifo")
    (b / "manifest.json").unlink()
    os.mkfifo(b / "manifest.json")
    done, err = _returns_within(lambda: Retriever(b), 10)
    assert done and isinstance(err, BundleError) and "manifest.json: not a regular file" in str(err)
    b = _copy(bundle, tmp_path / "fifo2")
    (b / "popular.npy").unlink()
    os.mkfifo(b / "popular.npy")
    done, err = _returns_within(lambda: Retriever(b), 10)
    assert done and isinstance(err, BundleError) and "popular.npy: not a regular file" in str(err)
    b = _copy(bundle, tmp_path / "link")
    (b / "feature_state.json").unlink()
    (b / "feature_state.json").symlink_to(bundle / "feature_state.json")
    with pytest.raises(BundleError, match="feature_state.json: not a regular file"):
        Retriever(b)


@pytest.mark.parametrize("edit, fragment", [
    (lambda b: (b / "manifest.json").write_text("[1, 2]"), "must be a JSON object"),
    (lambda b: (b / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda b: write_json(b / "manifest.json", {**read_json(b / "manifest.json"), "checksums": []}), "checksums"),
])
def test_malformed_manifests_are_bundle_errors(bundle, tmp_path, edit, fragment):
    b = _copy(bundle, tmp_path / "m")
    edit(b)
    with pytest.raises(BundleError, match=fragment):
        Retriever(b)


def test_resealed_garbage_is_a_bundle_error(bundle, tmp_path):
    """Files that pass the integrity checks (resealed) but do not load: BundleError, never a crash."""
    b = _copy(bundle, tmp_path / "trunc")
    data = (b / "index.faiss").read_bytes()
    (b / "index.faiss").write_bytes(data[: len(data) // 2])
    reseal(b)
    with pytest.raises(BundleError, match="not a readable FAISS index"):
        Retriever(b)
    b = _copy(bundle, tmp_path / "garbage")
    (b / "user_tower.pt2").write_bytes(b"garbage" * 100)
    reseal(b)
    with pytest.raises(BundleError, match="not a readable .pt2"):
        Retriever(b)


def _two_directories(benign: bytes, malicious_entries: dict[str, bytes]) -> bytes:
    """One archive, two central directories of the same size: the end record points torch's reader
    at the malicious one while Python's zipfile, seeing 'concatenated' data, reads the benign one."""
    import io
    import struct
    import zipfile

    def build(entries):
        b = io.BytesIO()
        with zipfile.ZipFile(b, "w", zipfile.ZIP_STORED) as z:
            for n, v in entries.items():
                z.writestr(n, v)
        d = b.getvalue()
        cnt, size, off = struct.unpack("<HII", d[-12:-2])
        return d[:off], d[off:off + size], cnt

    def shift(cd: bytes, delta: int) -> bytes:
        out, p = bytearray(cd), 0
        while p < len(out):
            nl, el, cl = struct.unpack("<HHH", out[p + 28:p + 34])
            (lo,) = struct.unpack("<I", out[p + 42:p + 46])
            out[p + 42:p + 46] = struct.pack("<I", lo + delta)
            p += 46 + nl + el + cl
        return bytes(out)

    with zipfile.ZipFile(io.BytesIO(benign)) as z:
        good = {n: z.read(n) for n in z.namelist()}
    ml, mcd, mn = build(malicious_entries)
    bl, bcd, bn = build(good)
    assert mn == bn and len(mcd) == len(bcd)
    eocd = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, mn, mn, len(mcd), len(ml) + len(bl), 0)
    return ml + bl + mcd + shift(bcd, len(ml) - len(mcd)) + eocd


def test_zip_parser_differential_is_refused(bundle, tmp_path):
    """Mutation caught: checking the archive with Python's zipfile but letting torch read the file
    (torch follows the end record to the other directory and unpickles)."""
    import zipfile

    marker = tmp_path / "pwned"
    with zipfile.ZipFile(bundle / "user_tower.pt2") as z:
        entries = {n: z.read(n) for n in z.namelist()}
    root = next(iter(entries)).split("/", 1)[0]
    pickled_weight(entries, root, marker)
    bad = _copy(bundle, tmp_path / "zipdiff")
    (bad / "user_tower.pt2").write_bytes(_two_directories((bundle / "user_tower.pt2").read_bytes(), entries))
    reseal(bad)
    try:
        torch.export.load(bad / "user_tower.pt2")
    except Exception:
        pass
    assert marker.exists(), "the crafted archive does not exercise the differential"
    marker.unlink()
    with pytest.raises(BundleError, match="central directory"):
        Retriever(bad)
    assert not marker.exists()


def test_a_file_swapped_after_the_check_is_never_read(bundle, tmp_path, monkeypatch):
    """Time of check vs time of use: the loader parses the bytes it checked. Mutation caught:
    verifying the files, then loading them from disk again (a swap in between runs the payload)."""
    import ebr.serve.retriever as retriever_mod

    marker = tmp_path / "pwned"
    evil = rewrite_tower(bundle, tmp_path / "evil", lambda e, root: pickled_weight(e, root, marker))
    b = _copy(bundle, tmp_path / "swapped")
    real = retriever_mod.verified_bundle

    def check_then_swap(path, expect_version=None):
        checked = real(path, expect_version)
        shutil.copy(evil / "user_tower.pt2", Path(path) / "user_tower.pt2")  # the attacker wins the race
        return checked

    monkeypatch.setattr(retriever_mod, "verified_bundle", check_then_swap)
    r = Retriever(b)
    assert r.version == bundle.name and not marker.exists()


def test_faiss_on_disk_lists_naming_an_outside_file_are_refused(bundle, tmp_path):
    """An IVF index whose inverted lists live in a file outside the bundle (FAISS opens it read-write
    on load). Mutation caught: reading the index before checking its structure."""
    import faiss

    outside = tmp_path / "outside" / "lists.ivfdata"
    outside.parent.mkdir()
    b = _copy(bundle, tmp_path / "ondisk")
    x = np.load(b / "pin_embeddings.npy")[np.load(b / "index_codes.npy")].astype("float32")
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], 1, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(outside))
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    ivf.add(x)
    faiss.write_index(ivf, str(b / "index.faiss"))
    del ivf
    reseal(b)
    outside.unlink()  # had FAISS tried to open it, the error would say so
    for backend in ("exact", "hnsw", "ivfpq"):
        m = read_json(b / "manifest.json")
        m["index"]["backend"] = backend
        write_json(b / "manifest.json", m)
        reseal(b)
        with pytest.raises(BundleError, match="not the structure"):
            Retriever(b)
    assert not outside.exists()


def test_bombs_deep_json_hard_links_and_bad_codes_are_bundle_errors(bundle, tmp_path):
    """Compressed archive members (a small file expanding to GBs), JSON nested past the recursion
    limit, a hard link to a file outside the bundle, user feature codes out of range: each is a
    BundleError before anything is served. Mutations caught: accepting deflated entries, letting
    RecursionError escape, following hard links, no range check of stored codes."""
    import zipfile

    b = rewrite_tower(bundle, tmp_path / "deflated", lambda e, root: None, compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(BundleError, match="compressed"):
        Retriever(b)
    b = _copy(bundle, tmp_path / "npz")
    s = dict(np.load(b / "user_state.npz"))
    np.savez_compressed(b / "user_state.npz", **s)
    reseal(b)
    with pytest.raises(BundleError, match="user_state.npz: compressed"):
        Retriever(b)
    b = _copy(bundle, tmp_path / "deep")
    (b / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="not valid JSON"):
        Retriever(b)
    b = _copy(bundle, tmp_path / "hardlink")
    outside = tmp_path / "outside-popular.npy"
    shutil.copy(b / "popular.npy", outside)
    (b / "popular.npy").unlink()
    os.link(outside, b / "popular.npy")
    with pytest.raises(BundleError, match="hard link"):
        Retriever(b)
    b = _copy(bundle, tmp_path / "codes")
    s = dict(np.load(b / "user_state.npz"))
    s["cat"][:, 0] = 10**6
    np.savez(b / "user_state.npz", **s)
    reseal(b)
    with pytest.raises(BundleError, match="disagree"):
        Retriever(b)


@pytest.mark.parametrize("expr, ok", [
    ("Symbol('s35', positive=True, integer=True)", True), ("2*s35 + 1", True), ("Max(s35, 2)", True),
    ("FloorDiv(s35, 2)", True), ("Max('__import__(\"os\").system(\"true\")', 1)", False),
    ("__import__('os').system('true')", False), ("s35.func", False), ("Symbol('__class__')", False),
    ("(lambda: 1)()", False), ("[s35 for s35 in range(9)]", False),
])
def test_symbolic_expression_grammar(expr, ok):
    """sympy evaluates every expression string and every string argument of its functions.
    Mutation caught: allowing string constants outside Symbol(...) (Max('...') is evaluated)."""
    from ebr.index.verify import _symbolic_ok

    assert _symbolic_ok(expr) is ok
