"""Batch inference: `kiln batch NAME INPUT OUTPUT` scores a folder of images or a table of rows
locally (ONNX Runtime), through the running TorchServe, or on Ray, in resumable chunks."""
