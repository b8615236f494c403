"""The built-in layer families: importing this package registers every one of them.

Each module holds the layer definitions of one family (Caffe's type strings as
class names); their compute lives in brewnet.layers.kernels and their file and
image I/O in brewnet.layers.dataio.
"""

from brewnet.layers.families import (  # noqa: F401  (registration)
    arithmetic,
    conv,
    data,
    detection,
    inner_product,
    loss,
    lrn,
    mobile,
    neuron,
    normalization,
    plumbing,
    pooling,
    python_layer,
    recurrent,
    segmentation,
    sources,
)
