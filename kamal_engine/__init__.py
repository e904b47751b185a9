"""KAmal Studio's engine: knowledge amalgamation from pre-trained teacher CNNs.

The package is deliberately light to import: submodules (``teacher``, ``backbones``,
``metrics``, ``demo``, ``cli`` ...) are imported where they are used, never here.
"""

__version__ = "0.1.0"
