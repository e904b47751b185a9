"""The student as an ONNX file: ``export`` writes and verifies it, ``runtime`` runs it (ONNX Runtime,
or the PyTorch student behind the same interface), ``format`` holds what both agree on."""
