"""The exported forms of a model and the parity gate they passed (where they live: the
workspace, kiln/workspace.py).

Torch-free, unlike train.py and export.py that write them: `kiln archive` and everything else
that only reads an export imports this, not the training code (seconds and ~300 MB of torch).
"""

from kiln.handlers.backends import EXPORT_FILES

# The file of each exported form, by its name (onnx, torchscript).
FORMS = EXPORT_FILES
# The most an exported form may differ from eager PyTorch: export writes no form beyond it,
# the archive ships none.
MAX_ABS_DIFF = 1e-4
