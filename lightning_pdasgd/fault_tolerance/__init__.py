"""Training on when replicas die and join (opt-in, on torchft)."""
