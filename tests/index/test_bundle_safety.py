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


ATTACKS = [pickled_weight, pickled_constant, opaque_constant, sample_inputs, legacy_weights]


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
    with pytest.raises(BundleError, match="does not load"):
        Retriever(b)
    b = _copy(bundle, tmp_path / "garbage")
    (b / "user_tower.pt2").write_bytes(b"garbage" * 100)
    reseal(b)
    with pytest.raises(BundleError, match="not a readable .pt2"):
        Retriever(b)
