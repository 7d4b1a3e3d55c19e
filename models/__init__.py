"""uplvp.models: the ML engine (pure PyTorch; no HTTP, no queue code)."""
