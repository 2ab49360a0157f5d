"""TorchServe configuration and the logic that starts, waits for and stops it."""
