"""pycaffe's ``caffe.io``: arrays to and from Caffe's protobuf messages, the
Transformer that prepares images for a net, and image helpers.

Images are read with Pillow (pycaffe used scikit-image) and resized with
scipy's spline interpolation on pixel centres, edges replicated (scikit-image's
``resize(..., mode='edge')`` without anti-aliasing); pycaffe's own resized
pixels depend on its scikit-image version.
"""

import numpy

from brewnet.netdef import caffe_pb2

__all__ = ["blobproto_to_array", "array_to_blobproto", "arraylist_to_blobprotovector_str",
           "blobprotovector_str_to_arraylist", "array_to_datum", "datum_to_array", "Transformer",
           "load_image", "resize_image", "oversample"]

_LEGACY = ("num", "channels", "height", "width")


# -- messages <-> arrays ------------------------------------------------------------------

def blobproto_to_array(blob, return_diff=False):
    """A BlobProto's data (or, with ``return_diff``, its diff) as a float64 array of the
    blob's shape: the legacy num/channels/height/width when any is set, else
    ``shape.dim`` (a blob with neither holds one scalar). ValueError when the values
    do not fill the shape."""
    if return_diff:
        values = blob.double_diff if len(blob.double_diff) else blob.diff
    else:
        values = blob.double_data if len(blob.double_data) else blob.data
    array = numpy.array(values, dtype=numpy.float64)
    if any(blob.HasField(name) for name in _LEGACY):
        shape = tuple(getattr(blob, name) for name in _LEGACY)
    else:
        shape = tuple(blob.shape.dim)
    count = int(numpy.prod(shape, dtype=numpy.int64))
    if array.size != count:
        raise ValueError(f"a blob of shape {shape} needs {count} values, the BlobProto holds {array.size}")
    return array.reshape(shape)


def array_to_blobproto(arr, diff=None):
    """A BlobProto with ``arr``'s shape and values (float32 on the wire), and ``diff`` when given."""
    from brewnet.netdef import array_to_blob

    arr = numpy.asarray(arr)
    return array_to_blob(arr, diff=None if diff is None else numpy.asarray(diff).reshape(arr.shape))


def arraylist_to_blobprotovector_str(arraylist):
    """A serialized BlobProtoVector of the arrays."""
    vector = caffe_pb2.BlobProtoVector()
    for arr in arraylist:
        vector.blobs.add().CopyFrom(array_to_blobproto(arr))
    return vector.SerializeToString()


def blobprotovector_str_to_arraylist(str):  # noqa: A002  (pycaffe's parameter name)
    """The arrays of a serialized BlobProtoVector."""
    vector = caffe_pb2.BlobProtoVector()
    vector.ParseFromString(str)
    return [blobproto_to_array(blob) for blob in vector.blobs]


def array_to_datum(arr, label=None):
    """A Datum of a (channels, height, width) array: uint8 arrays as bytes in ``data``,
    others as ``float_data``. The label is set only when given."""
    arr = numpy.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"array_to_datum needs a (channels, height, width) array, got shape {arr.shape}")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = (int(d) for d in arr.shape)
    if arr.dtype == numpy.uint8:
        datum.data = numpy.ascontiguousarray(arr).tobytes()
    else:
        datum.float_data.extend(arr.astype(numpy.float64).ravel().tolist())
    if label is not None:
        datum.label = int(label)
    return datum


def datum_to_array(datum):
    """A Datum's values as a (channels, height, width) array: uint8 from ``data``, float64
    from ``float_data``; an encoded Datum (an image file) is decoded, as Caffe's data layer
    would (BGR). The label stays in ``datum.label``."""
    shape = (datum.channels, datum.height, datum.width)
    if datum.encoded:
        from brewnet.layers.dataio.images import decode_image

        image = decode_image(datum.data, color=None if not datum.channels else datum.channels != 1)
        return numpy.ascontiguousarray(image.transpose(2, 0, 1))
    if len(datum.data):
        return numpy.frombuffer(datum.data, dtype=numpy.uint8).reshape(shape).copy()
    return numpy.array(datum.float_data, dtype=numpy.float64).reshape(shape)


# -- preparing inputs ---------------------------------------------------------------------

class Transformer:
    """Turns images (H x W x K arrays, RGB in [0, 1] as load_image gives them) into a
    net's input layout and back. ``inputs`` maps input names to their blob shapes
    (``{name: net.blobs[name].data.shape}``). preprocess applies, in this order:
    float32, resize to the input's height and width, transpose, channel swap,
    raw_scale, mean subtraction, input_scale."""

    def __init__(self, inputs):
        self.inputs = inputs
        self.transpose = {}
        self.channel_swap = {}
        self.raw_scale = {}
        self.mean = {}
        self.input_scale = {}

    def _input_shape(self, in_):
        if in_ not in self.inputs:
            raise ValueError(f"{in_} is not one of the net inputs: {self.inputs}")
        return tuple(self.inputs[in_])

    def preprocess(self, in_, data):
        """One image (H' x W' x K) as the input ``in_`` wants it (K x H x W)."""
        shape = self._input_shape(in_)
        out = numpy.array(data, dtype=numpy.float32)  # a copy: the caller's array stays as it was
        if out.shape[:2] != shape[2:]:
            out = resize_image(out, shape[2:])
        if in_ in self.transpose:
            out = out.transpose(self.transpose[in_])
        if in_ in self.channel_swap:
            out = out[list(self.channel_swap[in_]), :, :]
        if self.raw_scale.get(in_) is not None:
            out = out * self.raw_scale[in_]
        if self.mean.get(in_) is not None:
            out = out - self.mean[in_]
        if self.input_scale.get(in_) is not None:
            out = out * self.input_scale[in_]
        return numpy.ascontiguousarray(out, dtype=numpy.float32)

    def deprocess(self, in_, data):
        """preprocess undone (except the resize): an input blob's image as H x W x K."""
        self._input_shape(in_)
        out = numpy.array(data).squeeze()
        if self.input_scale.get(in_) is not None:
            out = out / self.input_scale[in_]
        if self.mean.get(in_) is not None:
            out = out + self.mean[in_]
        if self.raw_scale.get(in_) is not None:
            out = out / self.raw_scale[in_]
        if in_ in self.channel_swap:
            out = out[numpy.argsort(self.channel_swap[in_]), :, :]
        if in_ in self.transpose:
            out = out.transpose(numpy.argsort(self.transpose[in_]))
        return out

    def set_transpose(self, in_, order):
        """The axis order taking an image to the input, e.g. (2, 0, 1) for H x W x K -> K x H x W."""
        shape = self._input_shape(in_)
        if len(order) != len(shape) - 1:
            raise ValueError(f"transpose order {tuple(order)} must have {len(shape) - 1} axes, as the input")
        self.transpose[in_] = order

    def set_channel_swap(self, in_, order):
        """The channel order (after the transpose), e.g. (2, 1, 0) for RGB -> BGR."""
        shape = self._input_shape(in_)
        if len(order) != shape[1]:
            raise ValueError(f"channel swap {tuple(order)} must name {shape[1]} channels, as the input")
        self.channel_swap[in_] = order

    def set_raw_scale(self, in_, scale):
        """Multiply the image by ``scale`` before the mean is subtracted (255 for
        models trained on [0, 255] pixels, as CaffeNet)."""
        self._input_shape(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_, mean):
        """The mean to subtract: per channel (a K vector) or per pixel (K x H x W, or
        H x W; resized to the input's height and width when they differ)."""
        shape = self._input_shape(in_)
        mean = numpy.asarray(mean)
        if mean.ndim == 1:
            if mean.shape[0] != shape[1]:
                raise ValueError(f"mean has {mean.shape[0]} channels, the input {shape[1]}")
            mean = mean[:, None, None]
        else:
            if mean.ndim == 2:
                mean = mean[None]
            if mean.ndim != 3:
                raise ValueError(f"mean of shape {mean.shape}: give K, H x W or K x H x W values")
            if mean.shape != shape[1:]:
                if mean.shape[0] != shape[1]:
                    raise ValueError(f"mean has {mean.shape[0]} channels, the input {shape[1]}")
                low, high = float(mean.min()), float(mean.max())
                span = (high - low) or 1.0
                scaled = resize_image(((mean - low) / span).transpose(1, 2, 0), shape[2:])
                mean = scaled.transpose(2, 0, 1) * span + low
        self.mean[in_] = mean

    def set_input_scale(self, in_, scale):
        """Multiply by ``scale`` after the mean is subtracted."""
        self._input_shape(in_)
        self.input_scale[in_] = scale


# -- images -------------------------------------------------------------------------------

_RGB_TO_GRAY = numpy.array([0.2125, 0.7154, 0.0721])  # scikit-image's rgb2gray weights


def load_image(filename, color=True):
    """An image file as float32 in [0, 1]: H x W x 3 RGB (gray images repeated), or with
    ``color=False`` H x W x 1 intensity. Alpha is dropped."""
    from brewnet.layers.dataio.images import open_image

    with open_image(filename) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
            gray = numpy.asarray(img, dtype=numpy.float64) / 65535.0
        elif img.mode in ("1", "L", "LA", "I", "F"):
            gray = numpy.asarray(img.convert("L"), dtype=numpy.float64) / 255.0
        else:
            gray = None
            rgb = numpy.asarray(img.convert("RGB"), dtype=numpy.float64) / 255.0
    if gray is not None:
        image = gray[:, :, None]
        if color:
            image = numpy.repeat(image, 3, axis=2)
    elif color:
        image = rgb
    else:
        image = (rgb @ _RGB_TO_GRAY)[:, :, None]
    return image.astype(numpy.float32)


def resize_image(im, new_dims, interp_order=1):
    """An H x W x K image resized to ``new_dims`` (height, width) with spline
    interpolation of ``interp_order`` (0 nearest, 1 linear ...); float32."""
    from scipy import ndimage

    im = numpy.asarray(im)
    height, width = (int(d) for d in new_dims)
    if im.shape[:2] == (height, width):
        return im.astype(numpy.float32)
    low, high = float(im.min()), float(im.max())
    if low == high:  # a constant image stays that constant (no division by a zero span)
        return numpy.full((height, width) + im.shape[2:], low, dtype=numpy.float32)
    zoom = (height / im.shape[0], width / im.shape[1]) + (1,) * (im.ndim - 2)
    out = ndimage.zoom(im.astype(numpy.float64), zoom, order=interp_order, mode="nearest", grid_mode=True)
    if out.shape[:2] != (height, width):  # rounding of the zoomed size: pad or trim the last row/column
        out = numpy.pad(out, [(0, max(0, height - out.shape[0])), (0, max(0, width - out.shape[1]))] +
                        [(0, 0)] * (im.ndim - 2), mode="edge")[:height, :width]
    return out.astype(numpy.float32)


def oversample(images, crop_dims):
    """Ten crops per image (the four corners and the centre, then the same five mirrored
    left-right), as one (10 * N) x h x w x K float32 array."""
    first = numpy.asarray(images[0])
    height, width = first.shape[:2]
    ch, cw = (int(d) for d in crop_dims)
    top = int((height / 2.0) - ch / 2.0)
    left = int((width / 2.0) - cw / 2.0)
    corners = [(0, 0), (0, width - cw), (height - ch, 0), (height - ch, width - cw), (top, left)]
    crops = numpy.empty((10 * len(images), ch, cw, first.shape[-1]), dtype=numpy.float32)
    for i, image in enumerate(images):
        image = numpy.asarray(image)
        for j, (y, x) in enumerate(corners):
            crop = image[y:y + ch, x:x + cw, :]
            crops[10 * i + j] = crop
            crops[10 * i + 5 + j] = crop[:, ::-1, :]
    return crops
