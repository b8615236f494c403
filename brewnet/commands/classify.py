"""`brewnet classify`: label images with a deploy net, as Caffe's python/classify.py.

Preprocessing, in Caffe's order (caffe.Classifier and caffe.io.Transformer): load as
RGB floats in [0, 1] (gray when the net takes one channel), resize to --images_dim,
take the center crop of the net's input size or the ten crops of oversampling (four
corners and the center, and their mirror images, predictions averaged), HWC -> CHW,
channel swap (RGB -> BGR by default for colour nets), * raw_scale, - mean, * input_scale.
A zoo model's readme may set these (`raw_scale`, `channel_swap`, `mean`, `mean_value`,
`labels`, `images_dim`).
"""

import json
import os
import pathlib
import time

import click
import numpy

from brewnet.netdef.errors import DefinitionError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm", "pbm")


def load_image(path, gray):
    from PIL import UnidentifiedImageError

    from brewnet.layers.dataio.images import open_image

    try:
        with open_image(path) as img:
            img = img.convert("L" if gray else "RGB")
            array = numpy.asarray(img, dtype=numpy.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise DefinitionError(f"cannot read the image ({exc.__class__.__name__}: {exc})", path) from None
    return array[:, :, None] if gray else array


def resize(image, height, width):
    """Bilinear resize of an HxWxC float image (per channel, like caffe.io.resize_image)."""
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    channels = [Image.fromarray(numpy.ascontiguousarray(image[:, :, c]), mode="F").resize((width, height),
                                                                                         Image.BILINEAR)
                for c in range(image.shape[2])]
    return numpy.stack([numpy.asarray(c, dtype=numpy.float32) for c in channels], axis=2)


def center_crop(image, height, width):
    top = (image.shape[0] - height) // 2
    left = (image.shape[1] - width) // 2
    return image[top:top + height, left:left + width]


def oversample(image, height, width):
    """The ten crops of caffe.io.oversample: four corners and the center, then the same five
    mirrored left to right."""
    rows, cols = image.shape[:2]
    if rows < height or cols < width:
        raise DefinitionError(f"images of {cols}x{rows} are smaller than the net's {width}x{height} input "
                              f"(set --images_dim to at least {height},{width})")
    corners = [(0, 0), (0, cols - width), (rows - height, 0), (rows - height, cols - width),
               ((rows - height) // 2, (cols - width) // 2)]
    crops = [image[top:top + height, left:left + width] for top, left in corners]
    return crops + [crop[:, ::-1] for crop in crops]


def load_mean(path, channels, height, width):
    """A mean for the net's input: per channel (C values), or an image resized to the input
    size as caffe.io.Transformer.set_mean does when its size differs."""
    from brewnet import netdef
    from brewnet.layers.dataio.db import read_npy

    path = str(path)
    mean = read_npy(path) if path.endswith(".npy") else netdef.read_blobproto(path)
    mean = numpy.asarray(mean, dtype=numpy.float32)
    if mean.ndim == 1:
        if mean.shape[0] != channels:
            raise DefinitionError(f"mean has {mean.shape[0]} channels, the net takes {channels}", path)
        return mean.reshape(channels, 1, 1)
    mean = mean.reshape(-1, *mean.shape[-2:])
    if mean.shape[0] != channels:
        raise DefinitionError(f"mean has {mean.shape[0]} channels, the net takes {channels}", path)
    if mean.shape[1:] != (height, width):
        mean = resize(mean.transpose(1, 2, 0), height, width).transpose(2, 0, 1)
    return mean


def preprocess(images, shape, channel_swap, raw_scale, mean, input_scale, images_dim, crops=False):
    """(N or 10N, C, H, W) net input from HxWxK images in [0, 1]."""
    channels, height, width = shape
    pieces = []
    for image in images:
        image = resize(image, *(images_dim or (height, width)))
        pieces.extend(oversample(image, height, width) if crops else [center_crop(image, height, width)])
    batch = numpy.empty((len(pieces), channels, height, width), dtype=numpy.float32)
    for i, piece in enumerate(pieces):
        chw = piece.transpose(2, 0, 1)
        if channel_swap is not None:
            chw = chw[list(channel_swap)]
        chw = chw * raw_scale
        if mean is not None:
            chw = chw - mean
        batch[i] = chw * input_scale
    return batch


def _floats(text):
    return [float(v) for v in text.split(",")] if text else None


def expand_inputs(inputs, ext):
    """(name, loader) for every image: files as given, a folder's images in name order (those
    ending in .EXT, or in any image extension), the images of an .npy array (N x H x W x K)."""
    from brewnet.layers.dataio.db import read_npy

    found = []
    for item in inputs:
        path = os.path.expanduser(item)
        if os.path.isdir(path):
            wanted = (ext.lower().lstrip("."),) if ext else IMAGE_EXTENSIONS
            names = sorted(n for n in os.listdir(path) if n.lower().rsplit(".", 1)[-1] in wanted
                           and os.path.isfile(os.path.join(path, n)))
            if not names:
                raise DefinitionError(f"no images ({', '.join('*.' + e for e in wanted)}) in this folder", path)
            found += [(os.path.join(path, n), None) for n in names]
        elif path.endswith(".npy"):
            array = read_npy(path)
            array = array[None] if array.ndim == 3 else array
            if array.ndim != 4:
                raise DefinitionError(f"an .npy input holds images as N x H x W x K, got shape {array.shape}", path)
            found += [(f"{path}[{i}]", image) for i, image in enumerate(array)]
        elif os.path.isfile(path):
            found.append((path, None))
        else:
            raise DefinitionError("no such image, folder or .npy file", path)
    return found


def open_test_net(model, weights, gpu):
    """The TEST net (on GPU ``gpu`` when given), its input's name and (channels, height, width)."""
    import brewnet

    if gpu is not None:
        brewnet.set_mode_gpu()
        brewnet.set_device(gpu)
    net = brewnet.Net(model, weights=weights, phase=brewnet.TEST)
    input_name = net.inputs[0]
    return net, input_name, net.blobs[input_name].shape[1:]


def _labels(path):
    """class index -> its label (from the labels file, else the index)."""
    lines = pathlib.Path(path).read_text().splitlines() if path else None
    return lambda k: lines[k] if lines and k < len(lines) else str(k)


@click.command("classify")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT... [OUTPUT.npy]")
@click.option("--model", "--model_def", "model", required=True, help="Deploy prototxt, or zoo:NAME.")
@click.option("--weights", "--pretrained_model", "weights",
              help="Weights (.caffemodel/.h5 or zoo:NAME); zoo:NAME's own weights by default.")
@click.option("--mean", "--mean_file", "mean_file",
              help="Mean (.npy or .binaryproto): an image (resized to the input when its size differs) or one value "
                   "per channel.")
@click.option("--mean-value", help="Per-channel mean, e.g. 104,117,123.")
@click.option("--labels", "labels_file", type=click.Path(exists=True, dir_okay=False),
              help="Text file: one label per line, in class order.")
@click.option("--raw-scale", type=float, help="Scale applied to [0,1] pixels before the mean (default 255, or the zoo's).")
@click.option("--input-scale", type=float, default=1.0, show_default=True, help="Scale applied after the mean.")
@click.option("--channel-swap", help="Channel order, e.g. 2,1,0 (default for colour nets: RGB -> BGR).")
@click.option("--images-dim", help="Resize to H,W before cropping (default: the net's input size, or the zoo's).")
@click.option("--center_only", "crops", flag_value="center", help="Predict from the center crop alone.")
@click.option("--oversample", "crops", flag_value="ten",
              help="Average the predictions of ten crops (corners, center, mirrored). Default when --images_dim "
                   "is larger than the net's input, as in classify.py; else --center_only.")
@click.option("--ext", default=None, help="Image extension to take from a folder (default: every image extension).")
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False),
              help="Save the predictions (N x classes, float32) to this .npy file, as classify.py does; a last "
                   "argument ending in .npy after an input is taken as this too (classify.py INPUT OUTPUT).")
@click.option("--top-k", default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Images per forward pass (x10 crops when oversampling).")
@click.option("--gpu", type=int, help="GPU device id.")
def classify(inputs, model, weights, mean_file, mean_value, labels_file, raw_scale, input_scale, channel_swap,
             images_dim, crops, ext, output, top_k, as_json, batch_size, gpu):
    """Classify images: print the top-k labels of each, or save every prediction (.npy).

    INPUT may be image files, folders of images and .npy arrays of images (N x H x W x K,
    values in [0, 1]). With an OUTPUT.npy (or --output) the predictions are saved there as
    Caffe's classify.py saves them; the labels are printed when there is no output file,
    or with --labels/--json.
    """
    import brewnet
    from brewnet import zoo

    inputs = list(inputs)
    if output is None and len(inputs) >= 2 and inputs[-1].endswith(".npy"):
        output = inputs.pop()
    meta = {}
    if zoo.is_zoo_spec(model):
        entry = zoo.find_model(model)
        meta = entry.meta
        weights = weights or model
        labels_file = labels_file or (str(entry.folder / meta["labels"]) if meta.get("labels") else None)
        if mean_file is None and meta.get("mean"):
            mean_file = str(entry.folder / meta["mean"])
    if weights is None:
        raise DefinitionError("--weights is needed (or a zoo:NAME model that has weights)")
    found = expand_inputs(inputs, ext)
    net, input_name, (channels, height, width) = open_test_net(model, weights, gpu)

    raw_scale = raw_scale if raw_scale is not None else float(meta.get("raw_scale", 255.0))
    swap = _floats(channel_swap) or meta.get("channel_swap")
    if swap is None and channels == 3:
        swap = [2, 1, 0]
    swap = [int(s) for s in swap] if swap is not None else None
    dims = _floats(images_dim) or meta.get("images_dim")
    dims = tuple(int(d) for d in dims) if dims else None
    if crops is None:  # classify.py oversamples; it only means something when there is more than the crop
        crops = "ten" if dims and (dims[0] > height or dims[1] > width) else "center"
    mean = None
    if mean_file:
        mean = load_mean(mean_file, channels, height, width)
    elif mean_value or meta.get("mean_value"):
        values = _floats(mean_value) or [float(v) for v in meta["mean_value"]]
        mean = numpy.asarray(values if len(values) == channels else values * channels, dtype=numpy.float32)
        mean = mean[:channels].reshape(channels, 1, 1)
    label = _labels(labels_file)

    say = (lambda message: click.echo(message, err=True)) if output else (lambda message: None)
    say(f"Classifying {len(found)} inputs ({'ten crops' if crops == 'ten' else 'center crop'} each).")
    start = time.monotonic()
    rows = []
    for first in range(0, len(found), batch_size):
        chunk = found[first:first + batch_size]
        images = [image if image is not None else load_image(path, gray=channels == 1) for path, image in chunk]
        for (path, _), image in zip(chunk, images):
            if image.ndim != 3 or image.shape[2] != channels:
                raise DefinitionError(f"image has shape {image.shape}, the net takes {channels} channel(s)", path)
        batch = preprocess(images, (channels, height, width), swap, raw_scale, mean, input_scale, dims,
                           crops=crops == "ten")
        net.blobs[input_name].reshape(*batch.shape)
        net.reshape()
        probs = brewnet.to_numpy(net.forward(**{input_name: batch})[net.outputs[0]]).reshape(len(batch), -1)
        if crops == "ten":
            probs = probs.reshape(len(chunk), 10, -1).mean(axis=1)
        rows.append(numpy.asarray(probs, dtype=numpy.float32))
    predictions = numpy.concatenate(rows)
    say(f"Done in {time.monotonic() - start:.2f} s.")
    if output:
        from brewnet.netdef import atomic_write

        with atomic_write(output, "wb") as f:
            numpy.save(f, predictions)
        say(f"Saving results into {output}: predictions of shape {predictions.shape}")
        if not (labels_file or as_json):
            return

    results = []
    for (path, _), row in zip(found, predictions):
        order = numpy.argsort(-row, kind="stable")[:top_k]
        results.append({"image": path, "top": [
            {"class": int(k), "label": label(int(k)), "probability": float(row[k])} for k in order]})
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for item in results:
        click.echo(item["image"])
        for rank, top in enumerate(item["top"], 1):
            click.echo(f"  {rank}. {top['label']:<20} {top['probability']:.4f}")


COMMANDS = [classify]
