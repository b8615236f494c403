"""netdef: Caffe's file formats (schema, reading, writing, upgrading). No compute."""

from . import caffe_pb2
from .errors import DefinitionError

__all__ = ["caffe_pb2", "DefinitionError"]
