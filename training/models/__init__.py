"""One file per model, each defining exactly one nn.Module with a no-argument constructor.

The same file is what training imports and what torch-model-archiver ships as --model-file.
"""
