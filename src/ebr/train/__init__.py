"""Training: the loss (sampled softmax + logQ), the loop, checkpoints and resume."""
