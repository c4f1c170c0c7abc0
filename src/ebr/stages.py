"""Where a request's time goes: a per-request stage clock, exported by the service as the
Prometheus histogram ebr_stage_seconds{stage} and printed by benchmarks/serve.py.

Stages of POST /v1/retrieve, in order (each mark adds the time since the previous mark):
  parse       body read, JSON parsing and pydantic validation (until the handler runs)
  dispatch    the hop to the worker thread (the Retriever runs off the event loop)
  user_state  stored state lookup, request history / features / followed interests, exclusions
  user_tower  the exported user tower (every embedding of the request)
  filters     exclusion and interest-filter bookkeeping around the index (pools, selectors, the
              post-filter of the index's answer)
  ann_search  the index search itself (FAISS; dense scoring on exact bundles)
  results     pin ids, scores and sources of the merged list (Python objects)
  encode      the response: JSON encoding (orjson), framework overhead after the handler
"""

from __future__ import annotations

import time

STAGES = ("parse", "dispatch", "user_state", "user_tower", "filters", "ann_search", "results", "encode")


class Stages:
    """mark(name) adds the time since the previous mark (or the start) to `name`."""

    __slots__ = ("t", "spent")

    def __init__(self, start: float | None = None):
        self.t = time.perf_counter() if start is None else start
        self.spent: dict[str, float] = {}

    def mark(self, name: str, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self.spent[name] = self.spent.get(name, 0.0) + now - self.t
        self.t = now


def samples(metrics_text: str, name: str, label: str) -> dict[str, float]:
    """{label value: sample value} of the series `name` in a /metrics scrape (Prometheus text),
    e.g. samples(text, "ebr_stage_seconds_sum", "stage")."""
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels[label]: s.value for fam in text_string_to_metric_families(metrics_text) for s in fam.samples
            if s.name == name and label in s.labels}


def mark(stages: Stages | None, name: str) -> None:
    """Mark when a clock is given (library calls pass none)."""
    if stages is not None:
        stages.mark(name)
