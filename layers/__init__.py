"""layers: the registry, every layer, fillers, the Net builder and the array backend."""

from .backend import get_array_module
from .base import Layer
from .blob import Blob
from .registry import get_layer_class, known_types, register

__all__ = ["Blob", "Layer", "get_array_module", "get_layer_class", "known_types", "register"]
