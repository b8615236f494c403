"""layers: the registry, every layer, fillers, the Net builder and the array backend."""

from brewnet.layers.base import Layer
from brewnet.layers.blob import Blob
from brewnet.layers.kernels.backend import get_array_module
from brewnet.layers.registry import get_layer_class, known_types, register

__all__ = ["Blob", "Layer", "get_array_module", "get_layer_class", "known_types", "register"]
