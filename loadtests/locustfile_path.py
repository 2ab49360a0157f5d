"""Where the locustfile is and the environment variables it reads (importable without
locust, which Kiln's own modules never import)."""

from pathlib import Path

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
TOKEN_ENV = "KILN_TOKEN"
SHAPE_ENV = "KILN_SHAPE"
