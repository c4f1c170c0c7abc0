"""ANN backends over unit-norm pin embeddings (inner product). Ids in the index are pin codes."""

from __future__ import annotations

import faiss
import numpy as np

BACKENDS = ("exact",)


def build_index(backend: str, emb: np.ndarray, codes: np.ndarray) -> faiss.Index:
    """An index over emb[codes] that returns pin codes."""
    if backend != "exact":
        raise ValueError(f"unknown index backend {backend!r}; available: {', '.join(BACKENDS)}")
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(emb.shape[1]))
    index.add_with_ids(np.ascontiguousarray(emb[codes], dtype=np.float32), codes.astype(np.int64))
    return index
