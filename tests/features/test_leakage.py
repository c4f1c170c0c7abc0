"""Split leakage guard through the real entry points (`prepare`, `train`, the evaluation bundle).

Engagements planted in the validation window, in the test window and after the data's end, each on
a pin nobody else touched, must not reach what model selection sees: training examples, histories,
pin statistics, validation features and candidates; the evaluation bundle may see validation,
never test. Mutation caught: training on parts (TRAIN, VALIDATION, TEST) in `prepare` (tiny
recall@100 then jumps from 0.19 to 0.51 and every other test still passes); histories or pin
statistics built from all parts; validation candidates that include pins born later; creation times
(pin age) taken from every engagement instead of the visible ones; a refit that reads the test part.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ebr.config import NO_CHOICE, RunConfig
from ebr.data.schema import ENGAGEMENTS
from ebr.data.splits import make_temporal
from ebr.data.synth import generate
from ebr.features.age import NO_TIME
from ebr.features.examples import T_MAX
from ebr.features.pinstats import DAY_US
from ebr.index.bundle import build_bundle
from ebr.serve.retriever import Retriever
from ebr.train.loop import prepare, train
from ebr.workspace import Workspace


def _plant(tmp_path) -> tuple[Workspace, dict[str, str], str]:
    ws = Workspace.at(tmp_path / "ws")
    generate(ws, "tiny", seed=1, progress=False)
    sp = make_temporal(ws)  # the split is fixed before planting (planting moves the data's end)
    con_pins = set(pq.read_table(ws.table_dir("pins"), columns=["pin_id"])["pin_id"].to_pylist())
    engaged = set(pq.read_table(ws.table_dir("engagements"), columns=["pin_id"])["pin_id"].to_pylist())
    fresh = sorted(con_pins - engaged)[:3]
    # the planted pins have no creation time (as in a source without one): they exist from their first
    # engagement, which must then come from visible data only (candidates and the age feature alike)
    for f in ws.source_dir("pins", "synth").glob("*.parquet"):
        t = pq.read_table(f)
        keep = pa.array([p not in fresh for p in t["pin_id"].to_pylist()])
        created = pc.if_else(keep, t["created_at"], pa.scalar(None, t["created_at"].type))
        pq.write_table(t.set_column(t.schema.get_field_index("created_at"), "created_at", created), f)
    user = pq.read_table(ws.table_dir("engagements"), columns=["user_id"])["user_id"][0].as_py()
    times = {"validation": sp.val_cut + (sp.cut - sp.val_cut) / 2, "test": sp.cut + dt.timedelta(days=1),
             "after_end": sp.cut + dt.timedelta(days=400)}
    planted = dict(zip(times, fresh))
    rows = {"user_id": [], "pin_id": [], "ts": [], "action": [], "weight": [], "surface": [], "condition_interest": []}
    for where, pin in planted.items():
        for action in ("impression", "click", "save"):
            rows["user_id"].append(user)
            rows["pin_id"].append(pin)
            rows["ts"].append(times[where])
            rows["action"].append(action)
            rows["weight"].append(1.0)
            rows["surface"].append("homefeed")
            rows["condition_interest"].append(None)
    d = ws.source_dir("engagements", "planted")
    d.mkdir(parents=True)
    pq.write_table(pa.table(rows, schema=ENGAGEMENTS), d / "part-0.parquet")
    return ws, planted, user


def test_planted_engagements_never_reach_model_selection(tmp_path):
    ws, planted, user = _plant(tmp_path)
    cfg = RunConfig.load(None, {"features.pin_stats": True, "train.epochs": 1, "model.hidden": [16],
                                "data.split": "temporal", **NO_CHOICE})
    d = prepare(ws, cfg)
    codes = {k: int(d.fs.pins.encode([p])[0]) for k, p in planted.items()}
    assert all(c >= 2 for c in codes.values())
    for where, c in codes.items():
        assert c not in set(d.examples.pin.tolist()), f"{where} engagement became a training example"
        assert c not in set(d.hist.pin.tolist()), f"{where} engagement reached the histories"
        stats = d.stats.at(np.array([c]), np.array([T_MAX]))
        assert not stats.any(), f"{where} engagement reached the pin statistics"
        assert not d.candidates[c], f"{where} pin is a validation candidate before it existed"
        assert d.time.created[c] == NO_TIME, f"{where} engagement reached the pin-age feature"
        assert not d.time.counts.at(np.array([c]), np.array([d.as_of + DAY_US])).any(), f"{where} reached the counts"
        for lo in range(0, len(d.val.users), 512):
            h, _ = d.hist.at(d.val.users[lo: lo + 512], d.val.t[lo: lo + 512], cfg.features.history_len)
            assert c not in set(h.ravel().tolist()), f"{where} engagement reached the validation features"
    val_targets = set(np.concatenate(d.val.targets).tolist()) if d.val.targets else set()
    assert codes["test"] not in val_targets and codes["after_end"] not in val_targets
    # the refit phase trains on training + validation: it may see the validation pin, never the others
    rd = prepare(ws, cfg, refit=True)
    assert rd.val is None and codes["validation"] in set(rd.examples.pin.tolist())
    assert rd.time.created[codes["validation"]] != NO_TIME and rd.candidates[codes["validation"]]
    assert rd.time.counts.at(np.array([codes["validation"]]), np.array([rd.as_of + DAY_US])).max() == 2
    for where in ("test", "after_end"):
        c = codes[where]
        assert c not in set(rd.examples.pin.tolist()) and c not in set(rd.hist.pin.tolist()), f"{where} in the refit"
        assert rd.time.created[c] == NO_TIME and not rd.candidates[c]
        assert not rd.stats.at(np.array([c]), np.array([T_MAX])).any()
    # the real training entry point on the same data, then the evaluation bundle (as of the cut)
    train(ws, cfg, run="leak", progress=False)
    r = Retriever(build_bundle(ws, "leak", "temporal"))
    u = int(r.user_codes([user])[0])
    for where in ("test", "after_end"):
        c = int(r.pin_codes([planted[where]])[0])
        assert c not in set(r.hist[u].tolist()) and c not in set(r.engaged_pins(u).tolist())
        assert not bool(r.candidate[c]), f"{where} pin is an evaluation candidate before it existed"
    assert bool(r.candidate[int(r.pin_codes([planted["validation"]])[0])]), "a refit may see validation"
    assert torch.isfinite(r.pin_emb).all()
