"""KAmal Studio's desktop front end (PySide6). It owns no training logic: everything goes through
:mod:`kamal_engine`, and what the window shows is saved as the same recipe ``kamal run`` runs."""

from kamal_engine import __version__

__all__ = ["__version__"]
