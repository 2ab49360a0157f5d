"""Logging for Kiln's command-line tools: our lines at INFO, other libraries' at WARNING."""

import logging


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("kiln").setLevel(logging.DEBUG if verbose else logging.INFO)
    # torch's ONNX exporter warns once per missing torchvision op; Kiln has none.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
