"""Training throughput at the default model sizes: examples/s, and model FLOP/s as a share of
the matmul FLOP/s measured in the same process (utilisation).

    python benchmarks/train_throughput.py [--preset small] [--steps 60] [--threads 2]

FLOPs of one training step (forward + backward) come from torch.utils.flop_counter; step times
are medians over --steps steps after warm-up, on real batches of the synthetic world.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402

from ebr.config import RunConfig  # noqa: E402
from ebr.data.synth import generate  # noqa: E402
from ebr.features.batches import user_batch  # noqa: E402
from ebr.model.towers import TwoTower  # noqa: E402
from ebr.train.loop import prepare  # noqa: E402
from ebr.train.loss import FrequencyEstimator, sampled_softmax_logq  # noqa: E402
from ebr.workspace import Workspace  # noqa: E402


def matmul_flops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workspace", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ws = Workspace.at(a.workspace or tempfile.mkdtemp(prefix="ebr-tp-"))
    if not ws.has_table("engagements"):
        generate(ws, a.preset, seed=0, progress=False)
    cfg = RunConfig()
    d = prepare(ws, cfg)
    model = TwoTower(d.sizes, cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    est = FrequencyEstimator(cfg.train.estimator_buckets, cfg.train.estimator_hashes, cfg.train.estimator_alpha)
    ex, B, L = d.examples, cfg.train.batch_size, cfg.features.history_len
    rng = np.random.default_rng(0)

    def step(i: int, count: FlopCounterMode | None = None) -> tuple[float, float]:
        idx = rng.choice(len(ex.user), B, replace=False)
        t0 = time.perf_counter()
        ub = user_batch(ex.user[idx], ex.t[idx], d.hist, d.users, L)
        pos = torch.from_numpy(ex.pin[idx])
        est.update(pos, i + 1)
        t1 = time.perf_counter()
        with count if count is not None else torch.enable_grad():
            q, v = model.embed_users_and_pins(ub.hist, ub.rest(), pos, d.pins.take, d.pin_stats(pos.numpy(), ex.t[idx]))
            b = d.time_buckets(pos.numpy(), ex.t[idx])
            extra = None if b is None else model.time_logits(q, b) / cfg.model.temperature
            loss = sampled_softmax_logq(q[:, : model.dim], v, pos, est.log_prob(pos), cfg.model.temperature,
                                        torch.from_numpy(ex.weight[idx]), extra=extra)
            opt.zero_grad()
            loss.backward()
        opt.step()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    for i in range(5):
        step(i)
    fc = FlopCounterMode(display=False)
    step(5, fc)
    flops = fc.get_total_flops()
    data_t, model_t = zip(*(step(10 + i) for i in range(a.steps)))
    step_s = statistics.median(np.add(data_t, model_t))
    mm = matmul_flops()
    res = {
        "preset": a.preset, "threads": a.threads, "batch_size": B, "history_len": L,
        "parameters": sum(p.numel() for p in model.parameters()),
        "median_step_s": round(step_s, 4), "median_batch_assembly_s": round(statistics.median(data_t), 4),
        "examples_per_s": round(B / step_s, 1),
        "model_flops_per_step": flops, "model_flop_s": round(flops / statistics.median(model_t) / 1e9, 2),
        "matmul_flop_s": round(mm / 1e9, 2),
        "utilisation": round(flops / statistics.median(model_t) / mm, 4),
        "unit": "flop_s in GFLOP/s",
    }
    write("train_throughput", res)


if __name__ == "__main__":
    main()
