"""The Retriever: a bundle + a user (stored state, or history/features given) -> k pins with
scores. Offline evaluation and the HTTP service both call this class, so what is measured is
what is served."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ebr.features.age import N_AGE_BUCKETS, age_buckets
from ebr.features.state import ACTION_CODE, FIRST_ID, N_ACTION_CODES, OOV, PAD, FeatureState
from ebr.index.backends import AnnIndex, SearchDefaults
from ebr.index.verify import BundleError, CheckedBundle, verified_bundle
from ebr.model.interests import valid_items
from ebr.ranking import topk_masked
from ebr.serve.merge import max_merge, quotas, round_robin
from ebr.stages import Stages, mark

__all__ = ["BundleError", "Result", "Retriever"]


@dataclass
class Result:
    pin_ids: list[str]
    scores: list[float]
    sources: list[str]
    cold_start: bool
    # multi mode, when asked: per embedding {"source", "importance", "history": [pin ids]}
    embeddings: list[dict] = field(default_factory=list)


TRACE_MAX_NODES = 2000  # exported towers above this many graph nodes serve untraced


class Queries(NamedTuple):
    """A user tower's output for B users: queries (B, K, D), active (B, K) (the first K used),
    importance (B, K) and each history slot's embedding (B, L), -1 for items not clustered.
    A single-embedding tower gives K = 1."""

    queries: torch.Tensor
    active: torch.Tensor
    importance: torch.Tensor
    assign: torch.Tensor


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _codes_below(x: np.ndarray, n: int) -> bool:
    return x.size == 0 or (int(x.min()) >= 0 and int(x.max()) < n)


JUST_NOW = int(age_buckets(np.zeros(1), np.zeros(1))[0])  # features.user_gap's bucket of a zero gap


class Retriever:
    def __init__(self, path: str | Path, expect_version: str | None = None):
        """Load a bundle after every check of index/verify.py (BundleError lists what failed):
        nothing is read from a file before its type, checksum and content were checked."""
        self.path = Path(path)
        checked = verified_bundle(self.path, expect_version)
        self.manifest = checked.manifest
        try:
            self._load(checked)
        except BundleError:
            raise
        except Exception as e:  # a checked bundle that still does not load is refused, never half-served
            raise BundleError(f"bundle {self.path.name!r} refused: it passed the checks but does not load "
                              f"({type(e).__name__}: {str(e)[:200]})") from None

    def _load(self, b: CheckedBundle) -> None:
        """Parse the checked bytes (never the files again: a file swapped after the check is not read)."""
        m, f = b.manifest, b.files
        self.version = m["version"]
        self.L = m["history_len"]
        self.backend = m["index"]["backend"]
        self.budget = m["config"]["model"].get("multi", {}).get("budget", "equal")
        self.tower = torch.export.load(io.BytesIO(b.tower)).module(check_guards=False)
        # without the per-call input-constraint check (about 1 ms of sympy per request): every input
        # is built here from the checked bundle's arrays, in the shapes the export declared
        for key, hook in list(self.tower._forward_pre_hooks.items()):
            if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
                del self.tower._forward_pre_hooks[key]
        self.item_repr = torch.from_numpy(_npy(f["item_repr.npy"]))
        self.pin_emb = torch.from_numpy(_npy(f["pin_embeddings.npy"]))
        # with its vectors: selective filters and exclusions fall back to exact scoring
        self.index = AnnIndex.from_bytes(f["index.faiss"], _npy(f["index_codes.npy"]), self.backend,
                                         vectors=self.pin_emb.numpy())
        self.defaults = SearchDefaults(**m["index"].get("search", {}))
        pins = pq.read_table(pa.BufferReader(f["pins.parquet"]))
        self.pin_ids: list[str] = pins["pin_id"].to_pylist()
        self.pin_interests: list[list[int]] = pins["interests"].to_pylist()
        self.candidate = torch.from_numpy(pins["candidate"].to_numpy(zero_copy_only=False).copy())
        by_interest: dict[int, list[int]] = {}
        cand = self.candidate.numpy()
        for code, ints in enumerate(self.pin_interests):
            if cand[code]:
                for i in ints:
                    by_interest.setdefault(i, []).append(code)
        # sorted and unique (a pin listing an interest twice would break the intersections' assume_unique)
        self.interest_pins = {i: np.unique(np.array(v, dtype=np.int64)) for i, v in by_interest.items()}
        s = np.load(io.BytesIO(f["user_state.npz"]), allow_pickle=False)
        self.hist, self.actions, self.cat, self.followed = (
            s["hist"].astype(np.int64),
            s["actions"].astype(np.int64),
            s["cat"].astype(np.int64),
            s["followed"].astype(np.int64),
        )
        self.engaged_ptr, self.engaged = s["engaged_ptr"], s["engaged"].astype(np.int64)
        self.popular = _npy(f["popular.npy"])
        self.fs = FeatureState.from_dict(json.loads(f["feature_state.json"]))
        self.interest_ids = ["<pad>", "<oov>"] + self.fs.interests.ids
        self._pin_code = {p: i for i, p in enumerate(self.pin_ids) if i >= FIRST_ID}
        self._pin_id_array = np.array(self.pin_ids, dtype=object)  # codes -> ids without a Python loop
        self._user_code = {u: i for i, u in enumerate(self.fs.users.ids, start=FIRST_ID)}
        P, U = len(self.pin_ids), len(self.fs.users)
        # features.user_gap: the last cat column holds each user's gap bucket (a bool, checked below)
        self.user_gap = gap = self.manifest["user_tower"].get("user_gap", False)
        consistent = (
            self.item_repr.shape[0] == P
            and self.pin_emb.shape[0] == P
            and len(self.candidate) == P
            and self.hist.shape == (U, self.L)
            and self.actions.shape == (U, self.L)
            and len(self.cat) == U
            and len(self.engaged_ptr) == U + 1
            and bool(np.all(np.diff(self.engaged_ptr) >= 0))
            and all(_codes_below(x, P) for x in (self.hist, self.engaged, self.popular, self.index.codes))
            and self.index.index.ntotal == len(self.index.codes)
            and isinstance(gap, bool)
            and self.cat.ndim == 2 and self.cat.shape[1] == len(self.fs.user_cat) + gap
            and (not gap or _codes_below(self.cat[:, -1], N_AGE_BUCKETS))
            and all(_codes_below(self.cat[:, j], len(v)) for j, v in enumerate(self.fs.user_cat.values()))
            and _codes_below(self.actions, N_ACTION_CODES)
            and self.followed.ndim == 2 and len(self.followed) == U
            and _codes_below(self.followed, len(self.fs.interests))
            and self.index.index.d == self.pin_emb.shape[1]
        )
        if not consistent:
            raise BundleError(f"bundle {self.path.name!r} refused: its arrays disagree in shape or codes")
        self.tower_one = self._trace_for_one()

    # ---- lookups -------------------------------------------------------------------------
    def user_codes(self, user_ids: Sequence[str]) -> np.ndarray:
        """User ids -> codes (OOV for unknown ones), by dictionary: per request, hashing the whole
        vocabulary (Vocab.encode) cost about 0.8 ms."""
        return np.array([self._user_code.get(str(u), OOV) for u in user_ids], dtype=np.int64)

    def pin_codes(self, pin_ids: Sequence[str]) -> np.ndarray:
        return np.array([self._pin_code.get(str(p), OOV) for p in pin_ids], dtype=np.int64)

    def engaged_pins(self, code: int) -> np.ndarray:
        return self.engaged[self.engaged_ptr[code] : self.engaged_ptr[code + 1]]

    def is_warm(self, code: int) -> bool:
        return code >= FIRST_ID and bool((self.hist[code] != PAD).any())

    # ---- the tower and the search ----------------------------------------------------------
    def _tower_inputs(self, hist: np.ndarray, actions: np.ndarray, cat: np.ndarray, followed: np.ndarray,
                      condition: np.ndarray | None = None, users: np.ndarray | None = None) -> tuple[torch.Tensor, ...]:
        B = hist.shape[0]
        cond = torch.zeros(B, dtype=torch.long) if condition is None else torch.from_numpy(condition)
        u = torch.zeros(B, dtype=torch.long) if users is None else torch.from_numpy(users)
        return (self.item_repr[torch.from_numpy(hist)], torch.from_numpy(actions), torch.from_numpy(cat),
                torch.from_numpy(followed), cond, u)

    @torch.no_grad()
    def _trace_for_one(self, sample: int = 8) -> torch.jit.ScriptModule | None:
        """The exported tower traced into TorchScript for one user per call (a request's batch):
        the exported FX graph runs op by op in Python (about 0.5 ms a call for the default tower),
        the traced, frozen graph in C++ (about 0.2 ms). Kept only where it gives the exported
        module's outputs for `sample` stored users and the no-history row at load; else None (the
        exported module serves). Graphs above TRACE_MAX_NODES nodes are not traced: a crafted
        bundle's 16,000-node chain crashed the process in TorchScript (the default towers have
        100-350 nodes)."""
        graph = getattr(self.tower, "graph", None)
        if graph is None or len(graph.nodes) > TRACE_MAX_NODES:  # a crafted graph must not reach TorchScript
            return None
        U = len(self.fs.users)
        codes = [0] + list(range(FIRST_ID, min(U, FIRST_ID + sample)))
        examples = [self._tower_inputs(*self.stored_inputs(np.array([c])), users=np.array([c])) for c in codes]
        try:
            traced = torch.jit.freeze(torch.jit.trace(self.tower, examples[-1], check_trace=False).eval())
            for x in examples * 3:  # past the profiling executor's first runs, then compared
                got, want = traced(*x), self.tower(*x)
                got, want = (v if isinstance(v, (tuple, list)) else (v,) for v in (got, want))
                if len(got) != len(want) or not all(
                    a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
                    for a, b in zip(got, want)
                ):
                    return None
        except Exception:  # a graph TorchScript cannot trace: the exported module serves
            return None
        return traced

    @torch.no_grad()
    def embed_all(
        self,
        hist: np.ndarray,
        actions: np.ndarray,
        cat: np.ndarray,
        followed: np.ndarray,
        condition: np.ndarray | None = None,
        users: np.ndarray | None = None,
    ) -> Queries:
        """hist/actions (B, L) pin/action codes, cat (B, Cu), followed (B, K) interest codes -> every
        embedding of each user (what the index's vectors are scored against). One user at a time
        (a request) runs the traced tower when the load kept one."""
        B = hist.shape[0]
        x = self._tower_inputs(hist, actions, cat, followed, condition, users)
        out = (self.tower_one if B == 1 and self.tower_one is not None else self.tower)(*x)
        if isinstance(out, (tuple, list)):
            return Queries(*out)
        valid = valid_items(x[1])
        return Queries(out[:, None], torch.ones(B, 1, dtype=torch.bool), valid.sum(1, keepdim=True).float(),
                       torch.where(valid, 0, -1))

    def embed(self, *inputs: np.ndarray, **kw: np.ndarray | None) -> torch.Tensor:
        """(B, D): the single-mode query of each user: the tower's embedding, or a multi-embedding
        tower's first (most important) one. Arguments as embed_all."""
        return self.embed_all(*inputs, **kw).queries[:, 0]

    def search_lists(self, qs: Queries, k: int, exclude: Sequence[np.ndarray] | None = None,
                     allowed: np.ndarray | None = None) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """One ANN query per active embedding (one batched search) -> per user, each embedding's
        (codes, scores), best first."""
        b_idx, j_idx = torch.nonzero(qs.active, as_tuple=True)
        ex = None if exclude is None else [exclude[int(b)] for b in b_idx]
        s, i = self.search(qs.queries[b_idx, j_idx], k, ex, allowed)
        out, row = [], 0
        for b in range(qs.active.shape[0]):
            n = int(qs.active[b].sum())
            out.append([(i[row + j], s[row + j]) for j in range(n)])
            row += n
        return out

    def search_all(self, qs: Queries, k: int, exclude: Sequence[np.ndarray] | None = None,
                   allowed: np.ndarray | None = None, merge: str = "round_robin",
                   ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """search_lists, then each user's lists merged (serve/merge.py: round_robin under the
        budget, or max_merge) -> per user (codes, scores, embedding index), at most k each."""
        imp = qs.importance.numpy()
        out = []
        for b, lists in enumerate(self.search_lists(qs, k, exclude, allowed)):
            if merge == "max":
                out.append(max_merge(lists, k))
            else:
                out.append(round_robin(lists, k, quotas(k, imp[b] if self.budget == "importance" else None,
                                                        len(lists))))
        return out

    # ---- conditional retrieval ------------------------------------------------------------------
    def resolve_mode(self, mode: str) -> str:
        """A request's mode -> the mode served. auto: conditional auto on a conditional bundle, else
        multi on a multi-embedding bundle, else single. A mode the bundle lacks is a ValueError."""
        modes = self.manifest["modes"]
        if mode == "auto":
            return "auto" if "auto" in modes else ("multi" if "multi" in modes else "single")
        if mode not in modes:
            served = modes + ([] if "auto" in modes else ["auto"])
            raise ValueError(f"mode {mode!r} is not served by bundle {self.version}; it serves {', '.join(served)}")
        return mode

    def interest_codes(self, interests: Sequence[str]) -> np.ndarray:
        """Interest ids -> codes; unknown ones are a ValueError naming them."""
        codes = self.fs.interests.encode([str(i) for i in interests])
        unknown = [str(i) for i, c in zip(interests, codes) if c < FIRST_ID]
        if unknown:
            raise ValueError(f"unknown interest(s): {', '.join(unknown)}")
        return codes

    def inferred_interests(self, hist: np.ndarray, actions: np.ndarray, n: int) -> list[int]:
        """The n most frequent interests of a history's valid items (hides and padding skipped),
        ties to the most recently engaged."""
        valid = valid_items(torch.from_numpy(actions[None]))[0].numpy() & (hist >= FIRST_ID)
        seen: dict[int, tuple[int, int]] = {}
        for pos in np.flatnonzero(valid).tolist():
            for i in self.pin_interests[int(hist[pos])]:
                seen[i] = (seen.get(i, (0, 0))[0] + 1, pos)
        return [i for i, _ in sorted(seen.items(), key=lambda x: (-x[1][0], -x[1][1]))[:n]]

    def auto_conditions(self, hist: np.ndarray, actions: np.ndarray, followed: np.ndarray) -> list[tuple[int, str]]:
        """mode auto's conditions: (interest code, "followed" | "inferred"), followed first, no
        repeats, only interests with candidate pins, at most serve.auto_max_interests."""
        cfg = self.manifest["config"].get("serve", {})
        cap, n_inf = cfg.get("auto_max_interests", 6), cfg.get("auto_inferred", 3)
        out: dict[int, str] = {}
        for c in followed[followed >= FIRST_ID].tolist():
            out.setdefault(int(c), "followed")
        for c in self.inferred_interests(hist, actions, n_inf):
            out.setdefault(int(c), "inferred")
        return [(c, why) for c, why in out.items() if c in self.interest_pins][:cap]

    def interest_allowed(self, code: int, filt: np.ndarray | None) -> np.ndarray:
        """Sorted candidate pin codes carrying the interest (code), within `filt` when given."""
        allowed = self.interest_pins.get(int(code), np.zeros(0, dtype=np.int64))
        return allowed if filt is None else np.intersect1d(allowed, filt, assume_unique=True)

    def condition_lists(self, inputs: tuple[np.ndarray, ...], user: int, conds: Sequence[int], k: int,
                        excl: np.ndarray, filt: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """One user (inputs as stored_inputs, one row each), one list per condition: the tower
        conditioned on the interest, searched among the pins carrying it (and `filt`, if given).
        A multi-embedding tower gives one conditioned query per embedding, max-merged."""
        n = len(conds)
        rep = tuple(np.repeat(x, n, axis=0) for x in inputs)
        qs = self.embed_all(*rep, condition=np.asarray(conds, dtype=np.int64), users=np.full(n, user))
        out = []
        for j, c in enumerate(conds):
            sub = Queries(*(x[j : j + 1] for x in qs))
            lists = self.search_lists(sub, k, [excl], self.interest_allowed(c, filt))[0]
            out.append(max_merge(lists, k)[:2])
        return out

    def search(
        self, emb: torch.Tensor, k: int, exclude: Sequence[np.ndarray] | None = None, allowed: np.ndarray | None = None,
        stages: Stages | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) user embeddings -> (scores (B, k), pin codes (B, k)); excluded codes never appear;
        `allowed` (sorted pin codes) restricts the candidates (an interest filter, a corpus).
        Exact bundles score densely; others go through the ANN index with a selector (which scores
        selective filters exactly). Empty slots: code -1, score -inf. `stages` times the filters
        apart from the search (ebr/stages.py)."""
        if self.backend == "exact":
            cand = self.candidate
            if allowed is not None:
                cand = torch.zeros_like(cand)
                cand[torch.from_numpy(np.asarray(allowed, dtype=np.int64))] = True
                cand &= self.candidate
            mark(stages, "filters")
            vals, idx = topk_masked(emb @ self.pin_emb.T, k, exclude, cand)
            v, i = vals.numpy(), idx.numpy()
            mark(stages, "ann_search")
            return v, np.where(np.isfinite(v), i, -1)
        return self.index.search(emb.numpy(), k, self.defaults, allowed, exclude, stages)

    def stored_inputs(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(history, actions, categorical codes, followed interests) of users, as of the bundle's time."""
        return self.hist[codes], self.actions[codes], self.cat[codes], self.followed[codes]

    def retrieve_codes(
        self,
        codes: np.ndarray,
        k: int,
        exclude: Sequence[np.ndarray] | None = None,
        batch: int = 1024,
        allowed: np.ndarray | None = None,
        mode: str = "single",
        merge: str = "round_robin",
        condition: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Batch retrieval for known users (offline candidate generation and evaluation): (scores
        (B, k), pin codes (B, k)), empty slots -1 / -inf. exclude defaults to each user's engaged
        pins. mode multi: every embedding searched, lists merged (`merge`: round_robin as served,
        or max: the top k by max-over-embeddings score). `condition`: each user's interest code
        for a conditional tower (0: none)."""
        scores, out = [], []
        batch = batch if mode == "single" else max(1, batch // 8)  # up to 7 queries per user
        for lo in range(0, len(codes), batch):
            c = codes[lo : lo + batch]
            ex = [self.engaged_pins(int(x)) for x in c] if exclude is None else exclude[lo : lo + batch]
            inputs = self.stored_inputs(c)
            cond = None if condition is None else condition[lo : lo + batch]
            if mode == "single":
                s, i = self.search(self.embed(*inputs, users=c, condition=cond), k, ex, allowed)
            else:
                s = np.full((len(c), k), -np.inf, dtype=np.float32)
                i = np.full((len(c), k), -1, dtype=np.int64)
                qs = self.embed_all(*inputs, users=c, condition=cond)
                for r, (ci, si, _) in enumerate(self.search_all(qs, k, ex, allowed, merge)):
                    i[r, : len(ci)], s[r, : len(ci)] = ci, si
            scores.append(s)
            out.append(i)
        return np.concatenate(scores), np.concatenate(out)

    def retrieve_batch(self, user_ids: Sequence[str], k: int, mode: str = "single",
                       interests: Sequence[str] | None = None) -> list[Result]:
        """`retrieve(u, k, interests=interests, mode=mode)` for many users: warm users through one
        batched search, the others (cold, unknown) one by one through the cold-start path."""
        codes = self.user_codes(list(user_ids))
        warm = [i for i, c in enumerate(codes) if self.is_warm(int(c))]
        out: list[Result | None] = [None] * len(codes)
        if interests or mode in ("conditional", "auto"):  # filters, per-user conditions: one at a time
            warm = []
        if warm and mode == "multi":
            c = codes[warm]
            merged = self.search_all(self.embed_all(*self.stored_inputs(c), users=c), k,
                                     [self.engaged_pins(int(x)) for x in c])
            for i, (top, scores, src) in zip(warm, merged):
                out[i] = Result([self.pin_ids[x] for x in top.tolist()], scores.tolist(),
                                [f"emb{j}" for j in src.tolist()], False)
        elif warm:
            scores, top = self.retrieve_codes(codes[warm], k)
            for j, i in enumerate(warm):
                keep = top[j] >= 0
                out[i] = Result(
                    [self.pin_ids[c] for c in top[j][keep]],
                    scores[j][keep].tolist(),
                    ["single"] * int(keep.sum()),
                    False,
                )
        return [x if x is not None else self.retrieve(u, k, interests=interests, mode=mode)
                for u, x in zip(user_ids, out)]

    def allowed_for_interests(self, interests: Sequence[str]) -> np.ndarray:
        """Sorted pin codes carrying any of the interests; an unknown interest is a ValueError."""
        codes = self.interest_codes(interests)
        parts = [self.interest_pins.get(int(c), np.zeros(0, dtype=np.int64)) for c in codes]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def retrieve(
        self,
        user_id: str | None,
        k: int,
        exclude: Sequence[str] = (),
        history: Sequence[Any] | None = None,
        features: dict[str, Any] | None = None,
        exclude_engaged: bool = True,
        interests: Sequence[str] | None = None,
        followed: Sequence[str] | None = None,
        mode: str = "single",
        explain: bool = False,
        stages: Stages | None = None,
    ) -> Result:
        """One request: stored state for a known user, overridden by `history` (pin ids, most recent
        last, or {"pin_id", "action"} objects), `features` ({cat_column: value}) and `followed`
        (interest ids); `interests` filters the results to pins carrying one of them. A user with no
        history takes the tower when it has features or followed interests, else the cold-start
        path (popular pins). mode multi (a multi-embedding bundle): one search per embedding, merged
        round-robin under k, each item's source naming its embedding (emb0 = the most important);
        with `explain`, each embedding's importance and history items come back too.

        Conditional bundles: mode conditional conditions the tower on each of `interests` (then
        not a filter) and searches among that interest's pins, one list per interest; mode auto
        takes the implicit embedding(s) plus one conditioned list per followed and inferred
        interest (`interests` filters every list). Lists are merged round-robin under k; sources
        are `interest:ID` (or the embedding's). A user with nothing to embed gets each interest's
        popular pins. `stages` (ebr/stages.py) times the request's stages: single and multi mode
        stage by stage; conditional, auto and cold-start requests count everything after the
        user state as `results`."""
        mark(stages, "dispatch")
        code = int(self.user_codes([user_id or ""])[0])
        known = code >= FIRST_ID
        hist, actions, cat, fol = (x[0].copy() for x in self.stored_inputs(np.array([code if known else 0])))
        if not known:
            cat[:] = OOV
            if self.user_gap:
                cat[-1] = 0  # the time since the last engagement: none (features/batches.py user_batch)
        if followed is not None and self.manifest["user_tower"].get("followed_interests", False):
            codes = self.fs.interests.encode(list(followed))
            codes = codes[codes >= FIRST_ID][: len(fol)]  # unknown interests are dropped
            fol[:] = PAD
            fol[: len(codes)] = codes
        if history is not None:
            hist, actions = self._history_codes(history)
            if not known and self.user_gap:  # an unknown user's history ends now
                cat[-1] = JUST_NOW if (hist >= FIRST_ID).any() else 0
        if features:
            for j, (col, vocab) in enumerate(self.fs.user_cat.items()):
                key = col[4:] if col.startswith("cat_") else col
                val = features.get(col, features.get(key))
                if val is not None:
                    cat[j] = int(vocab.encode([str(val)])[0])
        excl = self.pin_codes(list(exclude)) if exclude else np.zeros(0, dtype=np.int64)
        if exclude_engaged and known:
            excl = np.concatenate([excl, self.engaged_pins(code)])
        if history is not None:
            excl = np.concatenate([excl, hist[hist >= FIRST_ID]])
        conds: list[tuple[int, str]] | None = None
        if mode == "conditional":
            if not interests:
                raise ValueError("mode conditional needs `interests`: the interest ids to condition on "
                                 "(mode auto picks them from the user's followed and inferred interests)")
            conds = [(int(c), "requested") for c in dict.fromkeys(self.interest_codes(interests).tolist())]
            interests = None  # the conditions, not a filter
        elif mode == "auto":
            conds = self.auto_conditions(hist, actions, fol)
        allowed = self.allowed_for_interests(interests) if interests else None
        has_history = bool((hist >= FIRST_ID).any())
        has_features = bool(features and (cat >= FIRST_ID).any()) or bool((fol >= FIRST_ID).any())
        inputs = (hist[None], actions[None], cat[None], fol[None])
        users = np.array([code if known else 0])
        mark(stages, "user_state")
        if conds is not None:
            return self._conditional(mode, conds, inputs, int(users[0]), k, excl, allowed,
                                     has_history or has_features, has_history, explain)
        if not has_history and not has_features:
            return self._popular(k, set(excl.tolist()), allowed)
        # with history: the user tower; without (a new user with features or followed interests): the
        # tower on those alone
        if mode == "multi":
            qs = self.embed_all(*inputs, users=users)
            mark(stages, "user_tower")
            codes, scores, src = self.search_all(qs, k, [excl], allowed)[0]
            mark(stages, "ann_search")
            sources = [f"emb{j}" if has_history else "features" for j in src.tolist()]
            info = []
            if explain:
                a = qs.assign[0].numpy()
                info = [{"source": f"emb{j}", "importance": float(qs.importance[0, j]),
                         "history": [self.pin_ids[c] for c in hist[a == j].tolist()]}
                        for j in range(int(qs.active[0].sum()))]
            out = Result(self._pin_id_array[codes].tolist(), scores.tolist(), sources, not has_history, info)
            mark(stages, "results")
            return out
        emb = self.embed(*inputs, users=users)
        mark(stages, "user_tower")
        s, i = self.search(emb, k, [excl], allowed, stages)
        keep = i[0] >= 0
        source = "single" if has_history else "features"
        out = Result(
            self._pin_id_array[i[0][keep]].tolist(), s[0][keep].tolist(), [source] * int(keep.sum()), not has_history
        )
        mark(stages, "results")
        return out

    def _conditional(self, mode: str, conds: list[tuple[int, str]], inputs: tuple[np.ndarray, ...], user: int,
                     k: int, excl: np.ndarray, allowed: np.ndarray | None, tower: bool, has_history: bool,
                     explain: bool) -> Result:
        """Modes conditional and auto (see retrieve): the lists, their names, one round-robin merge."""
        lists: list[tuple[np.ndarray, np.ndarray]] = []
        names: list[str] = []
        info: list[dict] = []
        if mode == "auto":  # the implicit embedding(s) first
            if not tower:
                pop = self._popular(k, set(excl.tolist()), allowed)
                lists.append((self.pin_codes(pop.pin_ids), np.array(pop.scores, dtype=np.float32)))
                names.append("popular")
            elif "multi" in self.manifest["modes"]:
                qs = self.embed_all(*inputs, users=np.array([user]))
                lists += self.search_lists(qs, k, [excl], allowed)[0]
                names += [f"emb{j}" if has_history else "features" for j in range(len(lists))]
            else:
                lists += [x[:2] for x in self.search_all(self.embed_all(*inputs, users=np.array([user])), k, [excl],
                                                         allowed)]
                names.append("single" if has_history else "features")
            info += [{"source": n, "kind": "implicit"} for n in names]
        codes = [c for c, _ in conds]
        if tower and codes:
            lists += self.condition_lists(inputs, user, codes, k, excl, allowed)
        else:  # nothing to embed: each interest's popular pins
            for c in codes:
                pop = self._popular(k, set(excl.tolist()), self.interest_allowed(c, allowed))
                lists.append((self.pin_codes(pop.pin_ids), np.array(pop.scores, dtype=np.float32)))
        ids = self.fs.interests.decode(np.array(codes, dtype=np.int64))
        names += [f"interest:{i}" for i in ids]
        info += [{"source": f"interest:{i}", "kind": why, "interest": i} for i, (_, why) in zip(ids, conds)]
        top, scores, src = round_robin(lists, k)
        return Result(self._pin_id_array[top].tolist(), scores.tolist(), [names[j] for j in src.tolist()],
                      not has_history, info if explain else [])

    def _history_codes(self, history: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """A request's history as the tower saw histories in training: impressions and pins unknown
        to the bundle are dropped first, then the last L kept (hides stay, marked by their action)."""
        items = [h if isinstance(h, dict) else {"pin_id": h} for h in history]
        codes = self.pin_codes([h["pin_id"] for h in items])
        acts = np.array(
            [ACTION_CODE.get(h.get("action", "click"), ACTION_CODE["click"]) for h in items], dtype=np.int64
        )
        keep = (codes != OOV) & (acts != ACTION_CODE["impression"])
        codes, acts = codes[keep][-self.L :], acts[keep][-self.L :]
        hist = np.zeros(self.L, dtype=np.int64)
        act = np.zeros(self.L, dtype=np.int64)
        n = len(codes)
        if n:
            hist[-n:], act[-n:] = codes, acts
        return hist, act

    def _popular(self, k: int, exclude: set[int], allowed: np.ndarray | None = None) -> Result:
        ok = None if allowed is None else set(allowed.tolist())
        picks = [int(c) for c in self.popular if int(c) not in exclude and (ok is None or int(c) in ok)][:k]
        n = len(picks)
        return Result(
            [self.pin_ids[c] for c in picks], [float(n - r) / max(n, 1) for r in range(n)], ["popular"] * n, True
        )
