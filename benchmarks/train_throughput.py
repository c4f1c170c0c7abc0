"""Training throughput at the default model sizes: examples/s, where a step's time goes, and
model FLOP/s as a share of the matmul FLOP/s measured in the same process (utilisation).

    python benchmarks/train_throughput.py [--preset small] [--steps 60] [--threads 2] [--set KEY=VALUE ...]
        [--pins N] [--dense-id-grad] [--profile]

Steps are the training loop's own: batches assembled one ahead in a worker thread (`prefetched`,
as `ebr train` does; --no-prefetch assembles each in line) and `train_step` on real batches of the
synthetic world, default config (`--set` overrides a key, e.g. --set train.fused_adam=false). The
split (assembly: waiting for the batch; forward, backward, optimizer), the assembly's own time and
step times are medians over --steps steps after warm-up. FLOPs of one step come from
torch.utils.flop_counter. --pins generates the world with that many pins (e.g. 1000000, the
serving benchmark's); --dense-id-grad trains the pin-ID table with the dense backward instead of
the sparse gradient (TrainState.dense_id_grad), for comparison; --profile prints the operators
that took the most time over 10 steps (torch.profiler).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import overrides, write  # noqa: E402

from ebr.config import RunConfig  # noqa: E402
from ebr.data.synth import generate  # noqa: E402
from ebr.stages import Stages  # noqa: E402
from ebr.train.loop import TrainState, assemble, epoch_order, prefetched, prepare, train_step  # noqa: E402
from ebr.train.loss import inclusion_log_prob  # noqa: E402
from ebr.workspace import Workspace  # noqa: E402

PARTS = ("assembly", "forward", "backward", "optimizer")


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
    ap.add_argument("--workspace", default=None, help="reuse a generated world (default: a fresh temp folder)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--name", default="train_throughput", help="results file name")
    ap.add_argument("--no-prefetch", action="store_true", help="assemble each batch in line (the earlier loop)")
    ap.add_argument("--pins", type=int, default=None, help="pins of a generated world (default: the preset's)")
    ap.add_argument("--dense-id-grad", action="store_true", help="the pin-ID table's dense backward (for comparison)")
    ap.add_argument("--profile", action="store_true", help="print the top operators of 10 steps (torch.profiler)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ws = Workspace.at(a.workspace or tempfile.mkdtemp(prefix="ebr-tp-"))
    if not ws.has_table("engagements"):
        generate(ws, a.preset, seed=0, progress=False, **({"n_pins": a.pins} if a.pins else {}))
    cfg = RunConfig.load(None, overrides(a.set))
    d = prepare(ws, cfg)
    s = TrainState.fresh(cfg, d.sizes)
    s.model.train()
    s.model.items.sparse_id_grad = not a.dense_id_grad
    B = cfg.train.batch_size
    log_q = inclusion_log_prob(np.bincount(d.examples.pin, minlength=d.sizes["n_pins"]), B)
    perm = epoch_order(d.examples, B, cfg.train.seed, 0, cfg.train.time_local_batches)

    n_steps = 6 + a.steps + (10 if a.profile else 0)
    args = [(perm[i * B: (i + 1) * B], i + 1, s.ranks) for i in range(n_steps)]
    batches = iter(prefetched(partial(assemble, d, cfg), args) if not a.no_prefetch else [None] * n_steps)

    def step(i: int) -> dict[str, float]:
        clock = Stages()
        batch = next(batches)  # the wait for a prefetched batch counts as assembly
        s.step += 1
        train_step(s, d, cfg, args[i][0], log_q, clock, batch)
        return clock.spent

    for i in range(5):
        step(i)
    with FlopCounterMode(display=False) as fc:
        step(5)
    flops = fc.get_total_flops()
    split = [step(6 + i) for i in range(a.steps)]
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for i in range(10):
                step(6 + a.steps + i)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25,
                                                                 max_name_column_width=30), flush=True)
    assembly_alone = []
    for idx, k, r in itertools.islice(args, 20):
        t = time.perf_counter()
        assemble(d, cfg, idx, k, r)
        assembly_alone.append(time.perf_counter() - t)
    med = {k: statistics.median(x[k] for x in split) for k in PARTS}
    step_s = statistics.median(sum(x.values()) for x in split)
    model_s = statistics.median(x["forward"] + x["backward"] + x["optimizer"] for x in split)
    mm = matmul_flops()
    res = {
        "preset": a.preset, "threads": a.threads, "batch_size": B, "history_len": cfg.features.history_len,
        "set": a.set, "pins": d.sizes["n_pins"], "dense_id_grad": a.dense_id_grad,
        "parameters": sum(p.numel() for p in s.model.parameters()),
        "prefetch": not a.no_prefetch, "median_step_s": round(step_s, 4),
        "split_ms": {k: round(1000 * v, 2) for k, v in med.items()},
        "assembly_alone_ms": round(1000 * statistics.median(assembly_alone), 2),
        "examples_per_s": round(B / step_s, 1),
        "model_flops_per_step": flops, "model_flop_s": round(flops / model_s / 1e9, 2),
        "matmul_flop_s": round(mm / 1e9, 2),
        "utilisation": round(flops / step_s / mm, 4),
        "unit": "flop_s in GFLOP/s; utilisation = model FLOPs per whole step / matmul FLOP/s",
    }
    print(res, flush=True)
    write(a.name, res)


if __name__ == "__main__":
    main()
