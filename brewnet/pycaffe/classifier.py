"""pycaffe's ``caffe.Classifier``: a Net that classifies images, with resizing,
centre cropping or 10-crop oversampling, and the Transformer's preprocessing."""

import numpy

from brewnet.api import Net
from brewnet.netdef.caffe_pb2 import TEST
from brewnet.pycaffe import io

__all__ = ["Classifier", "make_transformer"]


def make_transformer(net, mean=None, input_scale=None, raw_scale=None, channel_swap=None):
    """The Transformer for ``net``'s first input: H x W x K images to K x H x W, then the
    optional mean, scales and channel order."""
    name = net.inputs[0]
    transformer = io.Transformer({name: tuple(net.blobs[name].data.shape)})
    transformer.set_transpose(name, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(name, mean)
    if input_scale is not None:
        transformer.set_input_scale(name, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(name, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(name, channel_swap)
    return transformer


class Classifier(Net):
    """A TEST-phase Net from ``model_file`` and ``pretrained_file`` whose predict()
    takes images (H x W x K arrays, as io.load_image gives them).

    image_dims: the size images are resized to before cropping (default: the net's
    input size, i.e. no crop); mean, input_scale, raw_scale, channel_swap: the
    Transformer's settings (see io.Transformer)."""

    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None):
        super().__init__(model_file, TEST, weights=pretrained_file)
        self.transformer = make_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.crop_dims = numpy.array(self.blobs[self.inputs[0]].data.shape[2:])
        self.image_dims = self.crop_dims if image_dims is None or not len(image_dims) else image_dims

    def predict(self, inputs, oversample=True):
        """Class probabilities (N x classes) of N images: averaged over ten crops (the
        corners, the centre and their mirrors) with ``oversample``, else of the centre crop."""
        height, width = (int(d) for d in self.image_dims)
        resized = numpy.zeros((len(inputs), height, width, inputs[0].shape[2]), dtype=numpy.float32)
        for i, image in enumerate(inputs):
            resized[i] = io.resize_image(image, (height, width))
        if oversample:
            crops = io.oversample(resized, self.crop_dims)
        else:
            ch, cw = (int(d) for d in self.crop_dims)
            top, left = int(height / 2.0 - ch / 2.0), int(width / 2.0 - cw / 2.0)
            crops = resized[:, top:top + ch, left:left + cw, :]
        name = self.inputs[0]
        batch = numpy.stack([self.transformer.preprocess(name, crop) for crop in crops])
        predictions = self.forward_all(**{name: batch})[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(axis=1)
        return predictions
