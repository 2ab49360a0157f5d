"""Training, data and export for Kiln's models. Never imported by a TorchServe worker."""
