"""Bundles from a run's checkpoint: pin embeddings, the exported user tower, ANN indexes."""
