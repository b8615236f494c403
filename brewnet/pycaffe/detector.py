"""pycaffe's ``caffe.Detector``: windowed detection, R-CNN style. Each window
(ymin, xmin, ymax, xmax) of an image is cropped, optionally with a border of
context, warped to the net's input size and classified."""

import os

import numpy

from brewnet.api import Net
from brewnet.netdef.caffe_pb2 import TEST
from brewnet.pycaffe import io
from brewnet.pycaffe.classifier import make_transformer

__all__ = ["Detector"]


class Detector(Net):
    """A TEST-phase Net from ``model_file`` and ``pretrained_file`` that scores image
    windows. mean, input_scale, raw_scale, channel_swap: the Transformer's settings;
    context_pad: pixels of the net's input that show context around the window."""

    def __init__(self, model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
                 channel_swap=None, context_pad=None):
        super().__init__(model_file, TEST, weights=pretrained_file)
        self.transformer = make_transformer(self, mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows):
        """[{'window', 'prediction', 'filename'}] for (image file, [windows]) pairs."""
        images_windows = [(name, list(windows)) for name, windows in images_windows]
        crops = []
        for name, windows in images_windows:
            image = io.load_image(name).astype(numpy.float32)
            crops.extend(self.crop(image, window) for window in windows)
        in_ = self.inputs[0]
        batch = numpy.stack([self.transformer.preprocess(in_, crop) for crop in crops])
        predictions = self.forward_all(**{in_: batch})[self.outputs[0]]
        detections, i = [], 0
        for name, windows in images_windows:
            for window in windows:
                detections.append({"window": window, "prediction": predictions[i], "filename": name})
                i += 1
        return detections

    def detect_selective_search(self, image_fnames):
        """detect_windows over Selective Search proposals (needs the
        selective_search_ijcv_with_python module, and MATLAB, as in pycaffe)."""
        import selective_search_ijcv_with_python as selective_search

        image_fnames = [os.path.abspath(name) for name in image_fnames]
        windows = selective_search.get_windows(image_fnames, cmd="selective_search_rcnn")
        return self.detect_windows(zip(image_fnames, windows))

    def crop(self, im, window):
        """The window of image ``im`` (H x W x K); with context_pad, a larger box around it
        scaled so the window fills the input minus the pad, the part outside the image
        filled with the mean."""
        window = numpy.asarray(window)
        y0, x0, y1, x1 = (int(v) for v in window[:4])
        if not self.context_pad:
            return im[y0:y1, x0:x1]
        size = self.blobs[self.inputs[0]].width  # a square input
        scale = size / (1.0 * size - self.context_pad * 2)
        half_h, half_w = (y1 - y0 + 1) / 2.0, (x1 - x0 + 1) / 2.0
        centre = numpy.array([y0 + half_h, x0 + half_w])
        box = numpy.round(numpy.tile(centre, 2) + scale * numpy.array([-half_h, -half_w, half_h, half_w]))
        scale_h = size / (box[2] - box[0] + 1)
        scale_w = size / (box[3] - box[1] + 1)
        pad_y = int(round(max(0, -box[0]) * scale_h))  # rows of the input that lie above the image
        pad_x = int(round(max(0, -box[1]) * scale_w))
        im_h, im_w = im.shape[:2]
        box = numpy.clip(box, 0.0, [im_h, im_w, im_h, im_w])
        clip_h, clip_w = box[2] - box[0] + 1, box[3] - box[1] + 1
        assert clip_h > 0 and clip_w > 0
        crop_h = min(int(round(clip_h * scale_h)), size - pad_y)
        crop_w = min(int(round(clip_w * scale_w)), size - pad_x)
        context = im[int(box[0]):int(box[2]), int(box[1]):int(box[3])]
        out = numpy.ones(self.crop_dims, dtype=numpy.float32) * self.crop_mean
        out[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = io.resize_image(context, (crop_h, crop_w))
        return out

    def configure_crop(self, context_pad):
        """Set the crop size (the input's, as H x W x K) and the context padding; with
        padding, the mean in image space fills what lies outside the image."""
        in_ = self.inputs[0]
        undo = numpy.argsort(self.transformer.transpose[in_])
        self.crop_dims = numpy.array(self.blobs[in_].data.shape[1:])[undo]
        self.context_pad = context_pad
        if not context_pad:
            return
        mean = self.transformer.mean.get(in_)
        if mean is None:
            self.crop_mean = numpy.zeros(self.crop_dims, dtype=numpy.float32)
            return
        crop_mean = numpy.array(mean, dtype=numpy.float32).transpose(undo)
        order = self.transformer.channel_swap.get(in_)
        if order is not None:
            crop_mean = crop_mean[:, :, numpy.argsort(order)]
        raw_scale = self.transformer.raw_scale.get(in_)
        if raw_scale is not None:
            crop_mean = crop_mean / raw_scale
        self.crop_mean = crop_mean
