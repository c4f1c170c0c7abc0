"""Pretrained ID embeddings: windows (what pretraining and the retrieval model may read), contrastive
pretraining on TorchRec tables, and the snapshot registry (TECHNIQUES.md 4)."""
