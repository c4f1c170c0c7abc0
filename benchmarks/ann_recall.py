"""Recall@k of a bundle's ANN index against exact search at several efSearch values (HNSW) or
nprobe values (IVF-PQ), with the median time of one query's search (k = 500, as served).

    python benchmarks/ann_recall.py BUNDLE [--ef 256,512,768,1024] [--users 300] [--k 100]

Queries are the single-mode embeddings of a seeded sample of the bundle's users with history;
exact search scores every candidate pin of the index. The manifest's `recall@100_vs_exact` is the
same measure at the default efSearch on another sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402

from ebr.index.backends import SearchDefaults, build_index  # noqa: E402
from ebr.serve.retriever import Retriever  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--ef", default="256,512,768,1024", help="efSearch (hnsw) or nprobe (ivfpq) values")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    r = Retriever(a.bundle)
    warm = np.array([c for c in range(len(r.hist)) if r.is_warm(c)])
    users = np.random.default_rng(a.seed).choice(warm, min(a.users, len(warm)), replace=False)
    q = r.embed(*r.stored_inputs(users), users=users).numpy()
    _, want = build_index("exact", r.index.vectors, r.index.codes).search(q, a.k, SearchDefaults())
    rows = []
    for v in (int(x) for x in a.ef.split(",")):
        field = "ef_search" if r.index.backend == "hnsw" else "nprobe"
        d = dataclasses.replace(SearchDefaults(), **{field: v})
        _, got = r.index.search(q, a.k, d)
        recall = float(np.mean([len(set(x) & set(y)) / a.k for x, y in zip(got.tolist(), want.tolist())]))
        times = []
        for row in q[:100]:
            t = time.perf_counter()
            r.index.search(row[None], 500, d)
            times.append(time.perf_counter() - t)
        rows.append({field: v, f"recall@{a.k}_vs_exact": round(recall, 4),
                     "search_ms_k500": round(1000 * statistics.median(times), 3)})
        print(rows[-1], flush=True)
    write("ann_recall", {"bundle": Path(a.bundle).name, "backend": r.index.backend, "users": len(users),
                         "pins": len(r.index.codes), "rows": rows})


if __name__ == "__main__":
    main()
