"""Importing this module registers every built-in layer family."""

from . import common, data, loss, neuron, normalization, python_layer, recurrent, vision  # noqa: F401
