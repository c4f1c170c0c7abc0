"""Two towers. The pin side's ItemEncoder (pin ID, categorical, numeric and pretrained content
fields) is shared with the user side's history encoder, so a pin means the same thing as a
candidate and as a past engagement. Outputs are L2-normalised; scores are dot products / tau."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ebr.model.crossing import make_crossing

HIDE_CODE = 5  # features.state.HIDE: kept in the sequence, excluded from pooling
N_ACTIONS = 6


class ItemEncoder(nn.Module):
    """Pin fields -> one concatenated representation (B, out_dim)."""

    def __init__(self, n_pins: int, pin_cat: list[int], n_num: int, emb_dim: int, id_dim: int, cat_dim: int,
                 field_dim: int, use_id: bool = True, use_content: bool = True):
        super().__init__()
        self.id = nn.Embedding(n_pins, id_dim) if use_id else None
        self.cats = nn.ModuleList(nn.Embedding(n, cat_dim) for n in pin_cat)
        self.num = nn.Sequential(nn.Linear(n_num, field_dim), nn.ReLU()) if n_num else None
        self.content = nn.Linear(emb_dim, field_dim) if (emb_dim and use_content) else None
        self.widths = ([id_dim] if use_id else []) + [cat_dim] * len(pin_cat) + ([field_dim] if n_num else []) + (
            [field_dim] if self.content is not None else [])
        self.out_dim = sum(self.widths)
        if self.out_dim == 0:
            raise ValueError("the item encoder has no field: enable the pin ID or give pins features")
        if self.id is not None:
            nn.init.normal_(self.id.weight, std=0.05)

    def forward(self, ids: torch.Tensor, cat: torch.Tensor, num: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """ids (N,), cat (N, C), num (N, Nn), emb (N, E) -> (N, out_dim)"""
        fields = []
        if self.id is not None:
            fields.append(self.id(ids))
        fields += [e(cat[:, j]) for j, e in enumerate(self.cats)]
        if self.num is not None:
            fields.append(self.num(num))
        if self.content is not None:
            fields.append(self.content(emb))
        return torch.cat(fields, dim=-1)


class HistoryEncoder(nn.Module):
    """History item representations + action -> pooled fields (masked mean, attention pooling)."""

    def __init__(self, item_dim: int, field_dim: int):
        super().__init__()
        self.proj = nn.Linear(item_dim, field_dim)
        self.action = nn.Embedding(N_ACTIONS, field_dim)
        self.query = nn.Parameter(torch.randn(field_dim) * 0.05)
        self.widths = [field_dim, field_dim]
        self.out_dim = 2 * field_dim

    def forward(self, hist: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """hist (B, L, item_dim), actions (B, L) -> (B, 2 * field_dim)"""
        h = F.gelu(self.proj(hist) + self.action(actions))
        valid = (actions > 0) & (actions != HIDE_CODE)
        m = valid.unsqueeze(-1).to(h.dtype)
        mean = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        att = (h @ self.query).masked_fill(~valid, -1e9)
        w = torch.softmax(att, dim=1) * valid.any(1, keepdim=True).to(h.dtype)
        return torch.cat([mean, (w.unsqueeze(-1) * h).sum(1)], dim=-1)


class UserTower(nn.Module):
    """History + user categorical features + condition (interest, 0 = none) [+ user ID] -> (B, dim).

    Takes pre-encoded history items so the serving export needs no pin tables: the bundle ships
    the ItemEncoder's output per pin."""

    def __init__(self, item_dim: int, user_cat: list[int], n_interests: int, n_users: int, cfg):
        super().__init__()
        self.history = HistoryEncoder(item_dim, cfg.field_dim)
        self.cats = nn.ModuleList(nn.Embedding(n, cfg.cat_dim) for n in user_cat)
        self.condition = nn.Embedding(n_interests, cfg.cat_dim)
        self.user_id = nn.Embedding(n_users, cfg.id_dim) if cfg.use_user_id else None
        widths = self.history.widths + [cfg.cat_dim] * (len(user_cat) + 1) + ([cfg.id_dim] if cfg.use_user_id else [])
        self.crossing = make_crossing(cfg.user_crossing or cfg.crossing, widths, cfg.dim, cfg)

    def forward(self, hist: torch.Tensor, actions: torch.Tensor, user_cat: torch.Tensor, condition: torch.Tensor,
                user: torch.Tensor) -> torch.Tensor:
        """hist (B, L, item_dim), actions (B, L), user_cat (B, Cu), condition (B,), user (B,) -> (B, dim), unit norm"""
        fields = [self.history(hist, actions)] + [e(user_cat[:, j]) for j, e in enumerate(self.cats)]
        fields.append(self.condition(condition))
        if self.user_id is not None:
            fields.append(self.user_id(user))
        return F.normalize(self.crossing(torch.cat(fields, dim=-1)), dim=-1)


class PinTower(nn.Module):
    """Item representation [+ engagement statistics field] -> (N, dim). The statistics enter here,
    not in the shared ItemEncoder: a history item is encoded the same whenever it is read."""

    def __init__(self, item_widths: list[int], n_stats: int, cfg):
        super().__init__()
        self.stats = nn.Sequential(nn.Linear(n_stats, cfg.field_dim), nn.ReLU()) if n_stats else None
        widths = list(item_widths) + ([cfg.field_dim] if n_stats else [])
        self.crossing = make_crossing(cfg.pin_crossing or cfg.crossing, widths, cfg.dim, cfg)

    def forward(self, item: torch.Tensor, stats: torch.Tensor | None = None) -> torch.Tensor:
        """item (N, sum(item_widths)), stats (N, n_stats) -> (N, dim), unit norm"""
        if self.stats is not None:
            item = torch.cat([item, self.stats(stats)], dim=-1)
        return F.normalize(self.crossing(item), dim=-1)


class TwoTower(nn.Module):
    """The retrieval model: score(u, i) = <user(u), pin(i)> / temperature."""

    def __init__(self, sizes: dict, cfg):
        super().__init__()
        self.items = ItemEncoder(sizes["n_pins"], sizes["pin_cat"], sizes["n_pin_num"], sizes["emb_dim"],
                                 cfg.id_dim, cfg.cat_dim, cfg.field_dim, cfg.use_pin_id, cfg.use_content)
        self.user = UserTower(self.items.out_dim, sizes["user_cat"], sizes["n_interests"], sizes["n_users"], cfg)
        self.pin = PinTower(self.items.widths, sizes.get("n_pin_stats", 0), cfg)
        self.temperature = cfg.temperature


    def embed_pins(self, ids: torch.Tensor, cat: torch.Tensor, num: torch.Tensor, emb: torch.Tensor,
                   stats: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) pins with their fields [and statistics (N, S)] -> (N, dim)"""
        return self.pin(self.items(ids, cat, num, emb), stats)

    @torch.no_grad()
    def encode_all_pins(self, cat: torch.Tensor, num: torch.Tensor, emb: torch.Tensor, stats: torch.Tensor | None,
                        batch: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pin code 0..P-1 -> (item representations (P, H), pin embeddings (P, dim))."""
        reps, embs = [], []
        for lo in range(0, cat.shape[0], batch):
            sl = slice(lo, lo + batch)
            r = self.items(torch.arange(lo, lo + cat[sl].shape[0]), cat[sl], num[sl], emb[sl])
            reps.append(r)
            embs.append(self.pin(r, None if stats is None else stats[sl]))
        return torch.cat(reps), torch.cat(embs)

    def embed_users_and_pins(self, hist: torch.Tensor, actions: torch.Tensor, user_cat: torch.Tensor,
                             condition: torch.Tensor, user: torch.Tensor, pins: torch.Tensor, pin_fields,
                             pin_stats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Users (history pin codes (B, L) ...) and pins (N,) [with statistics (N, S)] in one pass;
        every distinct pin is encoded once. pin_fields(ids) -> (ids, cat, num, emb).
        Returns ((B, dim), (N, dim))."""
        B, L = hist.shape
        uniq, inv = torch.unique(torch.cat([hist.reshape(-1), pins]), return_inverse=True)
        rep = self.items(*pin_fields(uniq))
        h = rep[inv[: B * L]].view(B, L, -1)
        u = self.user(h, actions, user_cat, condition, user)
        if pins.numel() == 0:
            return u, u.new_zeros(0, u.shape[1])
        return u, self.pin(rep[inv[B * L:]], pin_stats)
