"""Tables -> tensors: vocabularies, numeric statistics, point-in-time histories, batches."""
