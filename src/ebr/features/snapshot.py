"""One entry point from tables to model inputs: the features snapshot that training, the bundle
build and evaluation all read (one pipeline, as TFRS keeps one dataset pipeline for fit and
evaluate), so a point-in-time rule lives in one place.

A snapshot is the engagements with their split parts, what is *visible* (the parts a stage may
read: training reads TRAIN; a bundle of a split, TRAIN and VALIDATION; a serving bundle, all),
and everything derived only from the visible part: histories, pin statistics, the pins that exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ebr.config import FeaturesConfig
from ebr.data.splits import Part, Split
from ebr.features.age import NO_TIME, TimeFields, created_times, table_created
from ebr.features.batches import PinInputs
from ebr.features.examples import Engagements, Histories, existing_pins, load_engagements
from ebr.features.pinstats import DailyCounts, PinStats, group_codes
from ebr.features.state import FIRST_ID, FeatureState, UserArrays, pin_arrays, user_arrays
from ebr.workspace import Workspace

ALL_PARTS = (Part.TRAIN, Part.VALIDATION, Part.TEST)


@dataclass
class Snapshot:
    fs: FeatureState
    split: Split
    e: Engagements
    visible: np.ndarray  # (len(e),) bool: the engagements this stage may read
    pins: PinInputs
    pin_interests: list
    users: UserArrays
    hist: Histories  # from visible engagements only
    stats: PinStats | None  # from visible engagements only (features.pin_stats)
    candidates: np.ndarray  # (n_pins,) bool: pins that exist as of the visible data (engaged, or created before)
    time: TimeFields | None  # the time term's fields from the visible data (None: no time term)
    as_of: int  # the time of the last visible engagement (microseconds, or pseudo-time)

    def pin_stats_all(self) -> np.ndarray | None:
        """(n_pins, S) statistics of every pin as of the end of the visible data."""
        from ebr.features.examples import T_MAX

        n = len(self.fs.pins)
        return None if self.stats is None else self.stats.at(np.arange(n), np.full(n, T_MAX))


def build_snapshot(ws: Workspace, fs: FeatureState, split: Split, features: FeaturesConfig, seed: int,
                   visible_parts: tuple[int, ...], given_validation: str = "auto") -> Snapshot:
    """The features of `split` as seen by a stage that may read `visible_parts` (given_validation:
    data.given_validation)."""
    e = load_engagements(ws, fs, split, seed=seed, given_validation_mode=given_validation)
    visible = np.isin(e.part, visible_parts)
    stats = None
    if features.pin_stats:
        stats = PinStats.build(e, group_codes(ws, fs, features.stats_granularity), visible,
                               features.stats_windows_days)
    parr = pin_arrays(ws, fs)
    as_of = int(e.t[visible].max()) if visible.any() else 0
    candidates = existing_pins(e, visible, len(fs.pins))
    time = None
    if e.timed:  # a pin with a creation time exists from then on, engaged with or not
        table = table_created(ws, fs)
        candidates |= (table != NO_TIME) & (table <= as_of)
        candidates[:FIRST_ID] = False
        created = created_times(table, e.pin, e.t, visible) if features.pin_age else None
        counts = (DailyCounts.build(e, group_codes(ws, fs, features.stats_granularity), visible,
                                    features.count_windows_days) if features.pin_counts else None)
        time = TimeFields(created, counts, table != NO_TIME) if (created is not None or counts is not None) else None
    K = features.max_interests
    return Snapshot(fs, split, e, visible, PinInputs.from_arrays(parr, K), parr.interests, user_arrays(ws, fs, K),
                    Histories.build(e, len(fs.users), visible=visible), stats, candidates, time, as_of)
