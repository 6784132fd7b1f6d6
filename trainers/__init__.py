"""SAE architectures and the training loop (see the issue "SAE trainers"); they take any iterator of tensors."""
