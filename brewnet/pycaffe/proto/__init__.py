"""pycaffe's ``caffe.proto``: ``caffe_pb2`` is brewnet's own schema module
(brewnet.netdef.caffe_pb2, Caffe master's caffe.proto), the very same module
object, so messages from either name are one type."""

import sys

from brewnet.netdef import caffe_pb2

# `import brewnet.pycaffe.proto.caffe_pb2` (and caffe.proto.caffe_pb2 under the alias) finds it here
sys.modules[f"{__name__}.caffe_pb2"] = caffe_pb2

__all__ = ["caffe_pb2"]
