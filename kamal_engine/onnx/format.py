"""What an exported student's ONNX file looks like: the names and versions export and runtime share.

``export`` writes files of this format and ``runtime`` reads them; both import these constants from
here, so neither imports the other's module for them (``docs/architecture.md``, "Exported ONNX").
"""

ONNX_FORMAT = "kamal-onnx"  # metadata "format" of a file this project wrote
ONNX_FORMAT_VERSION = 1  # raised when the metadata changes incompatibly; runtime refuses newer files
METADATA_KEY = "kamal"  # the metadata property holding the JSON description
DEFAULT_OPSET = 18
MIN_OPSET = 17  # older opsets cannot express the exported graph (the converter fails on Reduce* axes)
INPUT_NAME, OUTPUT_NAMES = "image", ("logits", "probabilities")
