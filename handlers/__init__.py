"""The serving core: decoders and validators per input kind, one answer path per output kind,
backends, metrics and the thin TorchServe and OIP adapters. Shipped whole in every archive."""
