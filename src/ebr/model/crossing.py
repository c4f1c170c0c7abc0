"""Feature-crossing blocks of the towers (TECHNIQUES.md sections 2 and 3).

Every block takes the concatenated feature fields (B, in_dim), knows the field widths, normalises
its input first (`input_norm`: a LayerNorm per field, the default, since fields arrive on very
different scales; one LayerNorm over the concatenation; or none) and returns (B, out_dim):

- `MLPCrossing`: Linear-ReLU stack;
- `ParallelMaskNet`: Pinterest's variant: mask = W2 act(W1 x) (m -> ratio*m -> m), h = x * mask,
  o = W4 act(W3 h) (m -> q -> q); 4 blocks in parallel, concatenated, bottleneck MLP to out_dim.
  `variant="original"` uses the paper's MaskBlock (instance-guided mask applied to a layer-normed
  hidden layer: o = ReLU(LN(W (mask * LN(x))))) for ablations;
- `FieldTransformer`: each field (or equal-width slice) is a token; attention runs across fields;
- `DHENLevel`: y = LayerNorm(ensemble of modules(x) + shortcut(x)); `DHEN` stacks levels, by
  default the blog's order [MLP || MaskNet] -> [MLP || field transformer], then Linear to out_dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class FieldLayerNorm(nn.Module):
    """LayerNorm per feature field, then concatenation: (B, sum(widths)) -> same shape."""

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        self.widths = list(widths)
        self.norms = nn.ModuleList(nn.LayerNorm(w) for w in self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.widths, dim=-1)
        return torch.cat([n(p) for n, p in zip(self.norms, parts)], dim=-1)


INPUT_NORMS = ("field", "global", "none")


def input_norm(widths: Sequence[int], kind: str = "field") -> nn.Module:
    """The input normalisation of a crossing block: per field, over the concatenation, or none."""
    if kind == "field":
        return FieldLayerNorm(widths)
    if kind == "global":
        return nn.LayerNorm(sum(widths))
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown input_norm {kind!r}; available: {', '.join(INPUT_NORMS)}")


def _mlp(dims: Sequence[int], act: str = "relu", last_act: bool = False, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2 or last_act:
            layers.append(ACTIVATIONS[act]())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MLPCrossing(nn.Module):
    """Input normalisation, then Linear-ReLU stacks, then Linear to out_dim."""

    def __init__(self, widths: Sequence[int], out_dim: int, hidden: Sequence[int], dropout: float = 0.0,
                 norm: str = "field"):
        super().__init__()
        self.norm = input_norm(widths, norm)
        self.net = _mlp([sum(widths), *hidden, out_dim], dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, out_dim)
        return self.net(self.norm(x))


class MaskBlock(nn.Module):
    """Pinterest variant: o = W4 act(W3 (x * W2 act(W1 x))), (B, m) -> (B, q)."""

    def __init__(self, m: int, q: int = 128, ratio: float = 0.5, act: str = "relu"):
        super().__init__()
        self.mask = _mlp([m, max(1, int(ratio * m)), m], act)
        self.out = _mlp([m, q, q], act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x * self.mask(x))


class OriginalMaskBlock(nn.Module):
    """Wang et al.'s MaskBlock: o = ReLU(LN(W (mask(x) * LN(x)))), (B, m) -> (B, q)."""

    def __init__(self, m: int, q: int = 128, ratio: float = 0.5, act: str = "relu"):
        super().__init__()
        self.mask = _mlp([m, max(1, int(ratio * m)), m], act)
        self.ln_in = nn.LayerNorm(m)
        self.proj = nn.Linear(m, q, bias=False)
        self.ln_out = nn.LayerNorm(q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.ln_out(self.proj(self.mask(x) * self.ln_in(x))))


class ParallelMaskNet(nn.Module):
    """Blocks in parallel on the same input, concatenated, then a bottleneck MLP: (B, m) -> (B, out_dim)."""

    def __init__(self, m: int, out_dim: int, blocks: int = 4, q: int = 128, ratio: float = 0.5,
                 bottleneck: int = 256, variant: str = "pinterest", act: str = "relu"):
        super().__init__()
        block = {"pinterest": MaskBlock, "original": OriginalMaskBlock}[variant]
        self.blocks = nn.ModuleList(block(m, q, ratio, act) for _ in range(blocks))
        self.head = _mlp([blocks * q, bottleneck, out_dim], act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([b(x) for b in self.blocks], dim=-1))


class FieldTransformer(nn.Module):
    """Each field (given widths) or equal slice of width token_dim is projected to a token;
    a transformer encoder attends across tokens; the tokens are flattened and projected.
    (B, sum(widths)) -> (B, out_dim). Flattening keeps field identity: it is not a bag of fields."""

    def __init__(self, widths: Sequence[int], out_dim: int, token_dim: int = 32, layers: int = 2, heads: int = 4):
        super().__init__()
        self.widths = list(widths)
        self.proj = nn.ModuleList(nn.Linear(w, token_dim) for w in self.widths)
        self.field_emb = nn.Parameter(torch.randn(len(self.widths), token_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(token_dim, heads, 2 * token_dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(len(self.widths) * token_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.widths, dim=-1)
        tokens = torch.stack([p(f) for p, f in zip(self.proj, parts)], dim=1) + self.field_emb  # (B, F, t)
        return self.out(self.encoder(tokens).flatten(1))


def equal_slices(width: int, token_dim: int) -> list[int]:
    """Split a width into slices of token_dim (the last one takes the remainder)."""
    n = max(1, width // token_dim)
    return [token_dim] * (n - 1) + [width - token_dim * (n - 1)]


class DHENLevel(nn.Module):
    """y = LayerNorm(ensemble_k module_k(x) + shortcut(x)); ensemble = sum, or concat then Linear."""

    def __init__(self, modules: Sequence[nn.Module], in_dim: int, out_dim: int, ensemble: str = "sum"):
        super().__init__()
        self.mods = nn.ModuleList(modules)
        self.ensemble = ensemble
        self.merge = nn.Linear(out_dim * len(modules), out_dim) if ensemble == "concat" else None
        self.shortcut = nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x) for m in self.mods]
        y = self.merge(torch.cat(outs, dim=-1)) if self.merge is not None else torch.stack(outs).sum(0)
        return self.norm(y + self.shortcut(x))


class DHEN(nn.Module):
    """Stacked DHEN levels over the normalised input, then Linear to out_dim."""

    def __init__(self, widths: Sequence[int], out_dim: int, levels: Sequence[Sequence[str]], width: int = 256,
                 ensemble: str = "sum", masknet: dict | None = None, transformer: dict | None = None,
                 mlp_hidden: int = 512, norm: str = "field"):
        super().__init__()
        self.norm = input_norm(widths, norm)
        masknet, transformer = masknet or {}, transformer or {}
        blocks = []
        d_in, fields = sum(widths), list(widths)
        for names in levels:
            mods = []
            for name in names:
                if name == "mlp":
                    mods.append(_mlp([d_in, mlp_hidden, width]))
                elif name == "masknet":
                    mods.append(ParallelMaskNet(d_in, width, **masknet))
                elif name == "transformer":
                    mods.append(FieldTransformer(fields, width, **transformer))
                else:
                    raise ValueError(f"unknown DHEN module {name!r}: use mlp, masknet or transformer")
            blocks.append(DHENLevel(mods, d_in, width, ensemble))
            d_in = width
            fields = equal_slices(width, transformer.get("token_dim", 32))  # later levels: equal slices
        self.levels = nn.Sequential(*blocks)
        self.out = nn.Linear(d_in, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.levels(self.norm(x)))


def make_crossing(kind: str, widths: Sequence[int], out_dim: int, cfg) -> nn.Module:
    """The crossing block named `kind` for fields of these widths; sizes from the model config."""
    if kind == "mlp":
        return MLPCrossing(widths, out_dim, cfg.hidden, cfg.dropout, cfg.input_norm)
    if kind == "masknet":
        m = cfg.masknet
        return nn.Sequential(input_norm(widths, cfg.input_norm), ParallelMaskNet(
            sum(widths), out_dim, m.blocks, m.q, m.ratio, m.bottleneck, m.variant, m.activation))
    if kind == "dhen":
        d = cfg.dhen
        mk = {"blocks": cfg.masknet.blocks, "q": cfg.masknet.q, "ratio": cfg.masknet.ratio,
              "bottleneck": cfg.masknet.bottleneck, "variant": cfg.masknet.variant, "act": cfg.masknet.activation}
        tr = {"token_dim": d.token_dim, "layers": d.transformer_layers, "heads": d.heads}
        return DHEN(widths, out_dim, d.levels, d.width, d.ensemble, mk, tr, d.mlp_hidden, cfg.input_norm)
    raise ValueError(f"unknown crossing {kind!r}; available: mlp, masknet, dhen")
