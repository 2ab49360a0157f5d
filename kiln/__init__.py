"""Kiln: from a PyTorch training script to a fast, observable TorchServe endpoint."""
