"""The training core shared by every `examples/train_*.py` script."""
