"""`ebr demo`: every built stage on the synthetic world, ending in a results table."""

from __future__ import annotations

import sys
import time

from ebr.workspace import Workspace


def cmd_demo(a) -> int:
    from ebr.data.splits import make_temporal
    from ebr.data.synth import generate
    from ebr.data.tables import stats

    ws = Workspace.at(a.workspace)
    t0 = time.time()
    print(f"[1/2] synthetic world ({a.preset}) -> {ws.root}/tables", file=sys.stderr)
    generate(ws, a.preset, seed=0)
    print("[2/2] temporal split (last 20% of the time range held out)", file=sys.stderr)
    split = make_temporal(ws)
    s = stats(ws)
    rows = [
        ("engagements", f"{s['engagements']:,}"),
        ("pins (coarse signatures)", f"{s['pins']:,} ({s['coarse_signatures']:,})"),
        ("users (active)", f"{s['users']:,} ({s['active_users']:,})"),
        ("interests", f"{s['interests']:,}"),
        ("time range", f"{s['first_ts'][:10]} .. {s['last_ts'][:10]}"),
        ("actions", ", ".join(f"{k} {v / s['engagements']:.1%}" for k, v in s["actions"].items())),
        ("surfaces", ", ".join(f"{k} {v / s['engagements']:.1%}" for k, v in s["surfaces"].items())),
        ("with source interest", f"{s['with_condition_interest'] / s['engagements']:.1%}"),
        ("split temporal", ", ".join(f"{k} {v:,}" for k, v in split.manifest["counts"].items())),
    ]
    w = max(len(k) for k, _ in rows)
    print("\nebr demo: synthetic homefeed world")
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    print(f"\ndone in {time.time() - t0:.1f}s. Query it: ebr data sql --workspace {a.workspace} "
          "\"SELECT surface, count(*) FROM engagements GROUP BY 1\"")
    return 0
