"""Logging for Kiln's command-line tools: our lines at INFO, other libraries' at WARNING."""

import logging


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("kiln").setLevel(logging.DEBUG if verbose else logging.INFO)
    # torch's ONNX exporter warns once per missing torchvision op; Kiln has none.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def run_command(prog, doc, add_arguments, run, argv=None) -> int:
    """`python -m` of a module whose command is its add_arguments and run (the same two that
    `kiln` calls): parse the arguments, set up logging, run."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    return run(args)
