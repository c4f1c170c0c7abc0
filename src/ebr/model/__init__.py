"""nn.Modules only: tensors in, tensors out. No file, network or clock access here."""
