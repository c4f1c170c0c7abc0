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
from ebr.features.batches import PinInputs
from ebr.features.examples import Engagements, Histories, existing_pins, load_engagements
from ebr.features.pinstats import PinStats, group_codes
from ebr.features.state import FeatureState, UserArrays, pin_arrays, user_arrays
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
    candidates: np.ndarray  # (n_pins,) bool: pins that exist as of the visible data

    def pin_stats_all(self) -> np.ndarray | None:
        """(n_pins, S) statistics of every pin as of the end of the visible data."""
        from ebr.features.examples import T_MAX

        n = len(self.fs.pins)
        return None if self.stats is None else self.stats.at(np.arange(n), np.full(n, T_MAX))


def build_snapshot(ws: Workspace, fs: FeatureState, split: Split, features: FeaturesConfig, seed: int,
                   visible_parts: tuple[int, ...]) -> Snapshot:
    """The features of `split` as seen by a stage that may read `visible_parts`."""
    e = load_engagements(ws, fs, split, seed=seed)
    visible = np.isin(e.part, visible_parts)
    stats = None
    if features.pin_stats:
        stats = PinStats.build(e, group_codes(ws, fs, features.stats_granularity), visible,
                               features.stats_windows_days)
    parr = pin_arrays(ws, fs)
    return Snapshot(fs, split, e, visible, PinInputs.from_arrays(parr), parr.interests, user_arrays(ws, fs),
                    Histories.build(e, len(fs.users), visible=visible), stats, existing_pins(e, visible, len(fs.pins)))
