"""Two towers. The pin side's ItemEncoder (pin ID, categorical, numeric, pretrained content and
interest fields) is shared with the user side's history encoder, so a pin means the same thing as a
candidate and as a past engagement; one interest table embeds a pin's interests and the user's
followed ones. Tower outputs are L2-normalised; score(u, i, t) = (<u, v_i> + <w_u, c_i(t)>) / tau.
The second, the time term (on when the data has time), scores what changes with time about a pin:
c_i(t) sums embeddings of its age bucket and its recent-engagement-count buckets, read at the query's
time t (in training, every pin of a batch as of each example's time; features/age.py, pinstats.py).
With model.pin_bias a learned scalar b_i per pin (a head on the pin tower) is added to every score.
The user tower returns the query [u, (1,) w_u] and the index stores [v_i, (tau b_i,) c_i(as of the
bundle)], so the score stays one inner product for the ANN search."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ebr.model.crossing import make_crossing
from ebr.model.interests import N_ACTIONS, make_extractor, valid_items
from ebr.model.ops import lookup

OOV = 1  # the out-of-vocabulary row of every ID table (ebr.features.state; model/ reads no features)


def bag_mean(table: nn.Embedding, codes: torch.Tensor) -> torch.Tensor:
    """Mean embedding of each row's codes, padding (0) skipped: (N, K) -> (N, dim); zeros if none."""
    m = (codes > 0).unsqueeze(-1).to(table.weight.dtype)
    return (lookup(table, codes) * m).sum(1) / m.sum(1).clamp(min=1.0)


class ItemEncoder(nn.Module):
    """Pin fields -> one concatenated representation (B, out_dim)."""

    def __init__(self, n_pins: int, pin_cat: list[int], n_num: int, emb_dim: int, id_dim: int, cat_dim: int,
                 field_dim: int, use_id: bool = True, use_content: bool = True,
                 interest: nn.Embedding | None = None, id_dropout: float = 0.0):
        super().__init__()
        self.id = nn.Embedding(n_pins, id_dim) if use_id else None
        self.id_drop = nn.Dropout(id_dropout) if id_dropout else None
        self.cats = nn.ModuleList(nn.Embedding(n, cat_dim) for n in pin_cat)
        self.num = nn.Sequential(nn.Linear(n_num, field_dim), nn.ReLU()) if n_num else None
        self.content = nn.Linear(emb_dim, field_dim) if (emb_dim and use_content) else None
        self.interest = interest
        # a sparse gradient for the pin-ID table (rows of the batch, not a dense (n_pins, dim) tensor
        # allocated and zeroed per step: backward 47-54 -> 14 ms at 1M pins, train_throughput.py);
        # the training loop turns it into the dense gradient Adam expects (TrainState.dense_id_grad).
        # Off unless the loop sets it.
        self.sparse_id_grad = False
        # the ID row each pin reads: its own, or the shared OOV row for a pin with too few training
        # positives to learn one (share_rare_ids); a buffer, so the bundle's export reads the same
        self.register_buffer("id_row", torch.arange(n_pins), persistent=True)
        self.widths = ([id_dim] if use_id else []) + [cat_dim] * len(pin_cat) + ([field_dim] if n_num else []) + (
            [field_dim] if self.content is not None else []) + ([interest.embedding_dim] if interest else [])
        self.out_dim = sum(self.widths)
        if self.out_dim == 0:
            raise ValueError("the item encoder has no field: enable the pin ID or give pins features")
        if self.id is not None:
            nn.init.normal_(self.id.weight, std=0.05)

    @torch.no_grad()
    def share_rare_ids(self, positives: torch.Tensor, min_count: int) -> int:
        """Pins with fewer than `min_count` training positives (positives (n_pins,) counts) read the
        shared OOV row instead of their own ID: an ID seen a few times stays near its random init
        and adds noise to a pin the other fields describe; the shared row learns what rare pins have
        in common. Returns how many pins share it."""
        rare = positives < min_count
        rare[:OOV + 1] = False  # padding and OOV keep their rows
        self.id_row.copy_(torch.where(rare, torch.full_like(self.id_row, OOV), torch.arange(len(self.id_row))))
        return int(rare.sum())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "id_row", torch.arange(len(self.id_row)))  # checkpoints before rare IDs
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, ids: torch.Tensor, cat: torch.Tensor, num: torch.Tensor, emb: torch.Tensor,
                interests: torch.Tensor) -> torch.Tensor:
        """ids (N,), cat (N, C), num (N, Nn), emb (N, E), interests (N, K) -> (N, out_dim)"""
        fields = []
        if self.id is not None:
            rows = self.id_row[ids]
            e = (F.embedding(rows, self.id.weight, sparse=True) if self.sparse_id_grad and self.training
                 else lookup(self.id, rows))
            fields.append(e if self.id_drop is None else self.id_drop(e))
        fields += [lookup(e, cat[:, j]) for j, e in enumerate(self.cats)]
        if self.num is not None:
            fields.append(self.num(num))
        if self.content is not None:
            fields.append(self.content(emb))
        if self.interest is not None:
            fields.append(bag_mean(self.interest, interests))
        return torch.cat(fields, dim=-1)


class HistoryEncoder(nn.Module):
    """History item representations + action [+ position] -> pooled fields (masked mean, attention
    pooling). positions > 0 (model.history_position): a learned embedding per slot, slot L-1 the
    most recent event (histories are left-padded), zero at the start."""

    def __init__(self, item_dim: int, field_dim: int, positions: int = 0):
        super().__init__()
        self.proj = nn.Linear(item_dim, field_dim)
        self.action = nn.Embedding(N_ACTIONS, field_dim)
        self.query = nn.Parameter(torch.randn(field_dim) * 0.05)
        self.position = nn.Parameter(torch.zeros(positions, field_dim)) if positions else None
        self.widths = [field_dim, field_dim]
        self.out_dim = 2 * field_dim

    def forward(self, hist: torch.Tensor | None, actions: torch.Tensor,
                projected: torch.Tensor | None = None) -> torch.Tensor:
        """hist (B, L, item_dim), actions (B, L) -> (B, 2 * field_dim). `projected` (B, L, field_dim)
        is proj(hist) computed elsewhere (training projects each distinct item once, then gathers)."""
        x = (self.proj(hist) if projected is None else projected) + lookup(self.action, actions)
        if self.position is not None:  # the last L slots' embeddings: slot -1 is the most recent
            P, L = self.position.shape[0], actions.shape[1]
            if L > P:
                raise ValueError(f"a history of {L} slots is longer than the {P} positions the model embeds "
                                 "(features.history_len it was trained with)")
            x = x + self.position[P - L:]
        h = F.gelu(x)
        valid = valid_items(actions)  # hides stay in the sequence, excluded from pooling
        m = valid.to(h.dtype)
        att = (h @ self.query).masked_fill(~valid, -1e9)
        w = torch.softmax(att, dim=1) * valid.any(1, keepdim=True).to(h.dtype)
        # both poolings as one batched matmul: (B, 2, L) weights @ (B, L, d) -> [mean, attention]
        weights = torch.stack([m / m.sum(1, keepdim=True).clamp(min=1.0), w], dim=1)
        return torch.bmm(weights, h).flatten(1)


class UserTower(nn.Module):
    """History + user categorical features + followed interests + condition (interest, 0 = none)
    [+ user ID] -> the query (B, dim [+ time_dim]): the unit-norm user embedding u, then (when the
    time term is on) w, the user's weights over the pin's time-term embedding.

    Multi-embedding (`model.user_embeddings` other than single): the history's clusters
    (model/interests.py) each join the other fields as one more field, the user's fields repeated
    per cluster, through the same crossing -> (queries (B, K_max, dim [+ time_dim]), active (B, K_max),
    importance (B, K_max), assign (B, L)); only the active (first K) queries are used.

    Takes pre-encoded history items so the serving export needs no pin tables: the bundle ships
    the ItemEncoder's output per pin."""

    def __init__(self, item_dim: int, user_cat: list[int], n_interests: int, n_users: int, cfg,
                 interest: nn.Embedding | None = None, time_dim: int = 0, pretrained_id_dim: int = 0,
                 history_positions: int = 0):
        super().__init__()
        self.history = HistoryEncoder(item_dim, cfg.field_dim, history_positions)
        self.cats = nn.ModuleList(nn.Embedding(n, cfg.cat_dim) for n in user_cat)
        self.followed = interest
        self.condition = nn.Embedding(n_interests, cfg.cat_dim)
        id_dim = pretrained_id_dim or (cfg.id_dim if cfg.use_user_id else 0)
        self.user_id = nn.Embedding(n_users, id_dim) if id_dim else None
        self.id_drop = nn.Dropout(cfg.id_dropout) if pretrained_id_dim and cfg.id_dropout else None
        self.clusters = (None if cfg.user_embeddings == "single"
                         else make_extractor(cfg.user_embeddings, item_dim, cfg.multi.dim, cfg.multi))
        widths = (self.history.widths + [cfg.cat_dim] * (len(user_cat) + 1) + ([id_dim] if id_dim else [])
                  + ([interest.embedding_dim] if interest is not None else [])
                  + ([cfg.multi.dim] if self.clusters is not None else []))
        self.crossing = make_crossing(cfg.user_crossing or cfg.crossing, widths, cfg.dim, cfg)
        self.time_weights = nn.Linear(cfg.dim, time_dim) if time_dim else None
        self.pin_bias = cfg.pin_bias

    def forward(self, hist: torch.Tensor | None, actions: torch.Tensor, user_cat: torch.Tensor, followed: torch.Tensor,
                condition: torch.Tensor, user: torch.Tensor, hist_proj: torch.Tensor | None = None):
        """hist (B, L, item_dim), actions (B, L), user_cat (B, Cu), followed (B, K), condition (B,), user (B,)
        -> (B, dim [+ time_dim]), or the multi-embedding tuple (see the class). hist_proj: the
        history's projection (HistoryEncoder `projected`) in place of hist (single embedding only)."""
        fields = [self.history(hist, actions, hist_proj)] + [lookup(e, user_cat[:, j]) for j, e in enumerate(self.cats)]
        fields.append(lookup(self.condition, condition))
        if self.user_id is not None:
            e = lookup(self.user_id, user)
            fields.append(e if self.id_drop is None else self.id_drop(e))
        if self.followed is not None:
            fields.append(bag_mean(self.followed, followed))
        x = torch.cat(fields, dim=-1)
        if self.clusters is None:
            return self._query(F.normalize(self.crossing(x), dim=-1))
        c = self.clusters(hist, actions)
        B, K, _ = c.vectors.shape
        xk = torch.cat([x[:, None, :].expand(B, K, x.shape[-1]), c.vectors], dim=-1).reshape(B * K, -1)
        q = self._query(F.normalize(self.crossing(xk), dim=-1))
        return q.reshape(B, K, -1), c.active, c.importance, c.assign

    def _query(self, u: torch.Tensor) -> torch.Tensor:
        """The unit-norm u -> [u, 1 (pin bias on), w (time term on)]."""
        parts = [u] + ([u.new_ones(u.shape[0], 1)] if self.pin_bias else [])
        if self.time_weights is not None:
            parts.append(self.time_weights(u))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class PinTower(nn.Module):
    """Item representation [+ engagement statistics field] -> (N, dim), unit norm [, then tau * b_i
    with model.pin_bias]. The statistics enter here, not in the shared ItemEncoder: a history item
    is encoded the same whenever it is read."""

    def __init__(self, item_widths: list[int], n_stats: int, cfg):
        super().__init__()
        self.stats = nn.Sequential(nn.Linear(n_stats, cfg.field_dim), nn.ReLU()) if n_stats else None
        widths = list(item_widths) + ([cfg.field_dim] if n_stats else [])
        self.crossing = make_crossing(cfg.pin_crossing or cfg.crossing, widths, cfg.dim, cfg)
        self.bias = nn.Linear(cfg.dim, 1) if cfg.pin_bias else None
        if self.bias is not None:  # starts neutral, as the time term does
            nn.init.zeros_(self.bias.weight)
            nn.init.zeros_(self.bias.bias)
        self.temperature = cfg.temperature

    def forward(self, item: torch.Tensor, stats: torch.Tensor | None = None) -> torch.Tensor:
        """item (N, sum(item_widths)), stats (N, n_stats) -> (N, dim) unit norm [+ (N, 1) tau * b]:
        against the query's [u, 1] the score <u, v>/tau + b."""
        if self.stats is not None:
            item = torch.cat([item, self.stats(stats)], dim=-1)
        h = self.crossing(item)
        v = F.normalize(h, dim=-1)
        return v if self.bias is None else torch.cat([v, self.temperature * self.bias(h)], dim=-1)


class TwoTower(nn.Module):
    """The retrieval model: score(u, i, t) = <query(u), [v_i, c_i(t)]> / temperature (v_i ends with
    tau * b_i and the query's embedding with 1 under model.pin_bias: score_dim columns before c).

    sizes["interest_features"]: embed pin and followed interests (one table); sizes["time_fields"]:
    the bucket count of each time-term field (empty: no time term); sizes["pretrained_id_dim"]: the
    width of pretrained user and pin ID tables (model.id_embeddings frozen | finetune), which take
    the place of the jointly learned ones (`load_id_tables` fills them)."""

    def __init__(self, sizes: dict, cfg):
        super().__init__()
        interest = (nn.Embedding(sizes["n_interests"], cfg.cat_dim, padding_idx=0)
                    if sizes.get("interest_features") else None)
        pre = int(sizes.get("pretrained_id_dim", 0))
        self.items = ItemEncoder(sizes["n_pins"], sizes["pin_cat"], sizes["n_pin_num"], sizes["emb_dim"],
                                 pre or cfg.id_dim, cfg.cat_dim, cfg.field_dim, bool(pre) or cfg.use_pin_id,
                                 cfg.use_content, interest, cfg.id_dropout if pre else cfg.pin_id_dropout)
        # the time term's fields (pin age, engagement counts per window): bucket counts per field
        fields = list(sizes.get("time_fields", []))
        self.time = nn.ModuleList(nn.Embedding(n, cfg.time_dim) for n in fields)
        for e in self.time:
            nn.init.zeros_(e.weight)  # the time term starts neutral
        # features.user_gap: the time since the user's last engagement, one more categorical column
        self.user_gap = bool(sizes.get("user_gap"))
        user_cat = list(sizes["user_cat"]) + ([sizes["user_gap"]] if self.user_gap else [])
        self.user = UserTower(self.items.out_dim, user_cat, sizes["n_interests"], sizes["n_users"], cfg,
                              interest, cfg.time_dim if fields else 0, pre, int(sizes.get("history_positions", 0)))
        self.pin = PinTower(self.items.widths, sizes.get("n_pin_stats", 0), cfg)
        self.dim = cfg.dim
        self.score_dim = cfg.dim + int(cfg.pin_bias)  # the query's and pin's columns before the time term
        self.temperature = cfg.temperature

    @torch.no_grad()
    def load_id_tables(self, user: torch.Tensor, pin: torch.Tensor, frozen: bool) -> None:
        """Pretrained ID tables (n_users, d), (n_pins, d) into the user and pin ID embeddings;
        frozen: they take no gradient (the optimiser skips them)."""
        for table, w in ((self.user.user_id, user), (self.items.id, pin)):
            table.weight.copy_(w)
            table.weight.requires_grad_(not frozen)

    @torch.no_grad()
    def init_time_prior(self, priors: list[torch.Tensor | None]) -> None:
        """Start the time term as a popularity prior (model.time_prior): channel 0 of each field's
        table holds tau * priors[f][bucket] (None: 0) and the query's channel 0 is a constant 1
        (time_weights' row 0 zero, its bias 1), so the first score is <u, v>/tau + sum_f
        priors[f][bucket_f]: the logQ-corrected softmax starts at the pins' recent popularity instead of
        at uniform. Everything stays trainable."""
        if not len(self.time):
            return
        if len(priors) != len(self.time):
            raise ValueError(f"{len(priors)} priors for {len(self.time)} time-term fields")
        tw = self.user.time_weights
        if tw is None:
            raise ValueError("model.time_prior needs the time term's query weights: set model.time_dim >= 1")
        tw.weight[0].zero_()
        tw.bias[0] = 1.0
        for e, p in zip(self.time, priors):
            if p is not None:
                e.weight[:, 0] = self.temperature * p.to(e.weight.dtype)

    @torch.no_grad()
    def index_vectors(self, v: torch.Tensor, buckets: torch.Tensor | None) -> torch.Tensor:
        """Pin embeddings (N, dim) and their time-term buckets as of the index's time (N, F) -> the
        vectors the ANN index stores: [v, sum_f c_f(bucket_f)] (v alone without the time term)."""
        if not len(self.time):
            return v
        return torch.cat([v, sum(e(buckets[:, f]) for f, e in enumerate(self.time))], dim=-1)

    def time_logits(self, query: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor | None:
        """The time term of every (query, pin) pair, each pin's fields read as of each query's time:
        query (B, score_dim + time_dim), buckets (B, N, F) -> (B, N) <w_b, sum_f c_f(bucket_bnf)>."""
        if not len(self.time):
            return None
        w = query[:, self.score_dim:]
        return sum(torch.gather(w @ e.weight.T, 1, buckets[..., f]) for f, e in enumerate(self.time))

    @torch.no_grad()
    def encode_all_pins(self, fields: tuple[torch.Tensor, ...], stats: torch.Tensor | None,
                        batch: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pin code 0..P-1, fields (cat, num, emb, interests) -> (item representations (P, H),
        pin embeddings (P, dim))."""
        reps, embs = [], []
        for lo in range(0, fields[0].shape[0], batch):
            sl = slice(lo, lo + batch)
            f = [x[sl] for x in fields]
            r = self.items(torch.arange(lo, lo + f[0].shape[0]), *f)
            reps.append(r)
            embs.append(self.pin(r, None if stats is None else stats[sl]))
        return torch.cat(reps), torch.cat(embs)

    def forward(self, hist: torch.Tensor, rest: tuple[torch.Tensor, ...], pins: torch.Tensor, pin_fields,
                pin_stats: torch.Tensor | None = None,
                distinct: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training pass: embed_users_and_pins (forward, so that DDP sees it)."""
        return self.embed_users_and_pins(hist, rest, pins, pin_fields, pin_stats, distinct)

    def embed_users_and_pins(self, hist: torch.Tensor, rest: tuple[torch.Tensor, ...], pins: torch.Tensor, pin_fields,
                             pin_stats: torch.Tensor | None = None,
                             distinct: tuple[torch.Tensor, torch.Tensor] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Users (history pin codes (B, L), then the tower's other inputs `rest`: actions, cat,
        followed, condition, user) and pins (N,) [with statistics (N, S)] in one pass; every distinct
        pin is encoded once. pin_fields(ids) -> (ids, cat, num, emb, interests). `distinct`: the
        sorted distinct codes of [hist.flatten(), pins] and each one's position among them, when
        computed ahead (training's batch assembly does, in its worker thread).
        Returns (queries (B, score_dim [+ time_dim]), pin embeddings (N, score_dim))."""
        B, L = hist.shape
        uniq, inv = distinct if distinct is not None else torch.unique(torch.cat([hist.reshape(-1), pins]),
                                                                       return_inverse=True)
        rep = self.items(*pin_fields(uniq))
        if self.user.clusters is None:  # the history's projection on distinct items, then gathered (B*L rows)
            proj = self.user.history.proj(rep).index_select(0, inv[: B * L])
            u = self.user(None, *rest, hist_proj=proj.view(B, L, -1))
        else:
            u = self.user(rep.index_select(0, inv[: B * L]).view(B, L, -1), *rest)
        if pins.numel() == 0:
            return u, rep.new_zeros(0, self.score_dim)
        return u, self.pin(rep.index_select(0, inv[B * L:]), pin_stats)
