"""Training: the training loop (train, finish) and the comparison of architectures and recipes."""
