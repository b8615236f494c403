"""`brewnet classify`: label images with a deploy net, using pycaffe classify's preprocessing.

Preprocessing, in Caffe's order: load as RGB floats in [0, 1] (gray when the net
takes one channel), resize to --images-dim, center-crop to the net's input,
HWC -> CHW, channel swap (RGB -> BGR by default for colour nets), * raw_scale,
- mean, * input_scale. A zoo model's readme may set these (`raw_scale`,
`channel_swap`, `mean`, `mean_value`, `labels`, `images_dim`).
"""

import json
import pathlib

import click
import numpy

from brewnet.netdef.errors import DefinitionError


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
    channels = [Image.fromarray(image[:, :, c], mode="F").resize((width, height), Image.BILINEAR)
                for c in range(image.shape[2])]
    return numpy.stack([numpy.asarray(c, dtype=numpy.float32) for c in channels], axis=2)


def center_crop(image, height, width):
    top = (image.shape[0] - height) // 2
    left = (image.shape[1] - width) // 2
    return image[top:top + height, left:left + width]


def load_mean(path, channels, height, width):
    from brewnet import netdef
    from brewnet.layers.dataio.db import read_npy

    path = str(path)
    mean = read_npy(path) if path.endswith(".npy") else netdef.read_blobproto(path)
    mean = numpy.asarray(mean, dtype=numpy.float32).reshape(-1, *numpy.shape(mean)[-2:])
    if mean.shape[0] != channels:
        raise DefinitionError(f"mean has {mean.shape[0]} channels, the net takes {channels}", path)
    if mean.shape[1:] != (height, width):
        # Caffe's classify averages a full-size mean to one value per channel when sizes differ
        mean = mean.reshape(channels, -1).mean(axis=1)
    return mean.reshape(channels, -1, 1) if mean.ndim == 1 else mean


def preprocess(images, shape, channel_swap, raw_scale, mean, input_scale, images_dim):
    channels, height, width = shape
    batch = numpy.empty((len(images), channels, height, width), dtype=numpy.float32)
    for i, image in enumerate(images):
        image = resize(image, *(images_dim or (height, width)))
        image = center_crop(image, height, width)
        chw = image.transpose(2, 0, 1)
        if channel_swap is not None:
            chw = chw[list(channel_swap)]
        chw = chw * raw_scale
        if mean is not None:
            chw = chw - mean
        batch[i] = chw * input_scale
    return batch


def _floats(text):
    return [float(v) for v in text.split(",")] if text else None


@click.command("classify")
@click.option("--model", required=True, help="Deploy prototxt, or zoo:NAME.")
@click.option("--weights", help="Weights (.caffemodel/.h5 or zoo:NAME); zoo:NAME's own weights by default.")
@click.option("--mean", "mean_file", help="Mean file (.binaryproto or .npy).")
@click.option("--mean-value", help="Per-channel mean, e.g. 104,117,123.")
@click.option("--labels", "labels_file", type=click.Path(exists=True, dir_okay=False),
              help="Text file: one label per line, in class order.")
@click.option("--raw-scale", type=float, help="Scale applied to [0,1] pixels before the mean (default 255, or the zoo's).")
@click.option("--input-scale", type=float, default=1.0, show_default=True, help="Scale applied after the mean.")
@click.option("--channel-swap", help="Channel order, e.g. 2,1,0 (default for colour nets: RGB -> BGR).")
@click.option("--images-dim", help="Resize to H,W before the center crop (default: the net's input size).")
@click.option("--top-k", default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--gpu", type=int, help="GPU device id.")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def classify(model, weights, mean_file, mean_value, labels_file, raw_scale, input_scale, channel_swap, images_dim,
             top_k, as_json, gpu, images):
    """Print the top-k labels with probabilities for each image."""
    import brewnet
    from brewnet import zoo

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
    if gpu is not None:
        brewnet.set_mode_gpu()
        brewnet.set_device(gpu)
    net = brewnet.Net(model, weights=weights, phase=brewnet.TEST)
    input_name = net.inputs[0]
    _, channels, height, width = net.blobs[input_name].shape

    raw_scale = raw_scale if raw_scale is not None else float(meta.get("raw_scale", 255.0))
    swap = _floats(channel_swap) or meta.get("channel_swap")
    if swap is None and channels == 3:
        swap = [2, 1, 0]
    swap = [int(s) for s in swap] if swap is not None else None
    dims = _floats(images_dim) or meta.get("images_dim")
    dims = tuple(int(d) for d in dims) if dims else None
    mean = None
    if mean_file:
        mean = load_mean(mean_file, channels, height, width)
    elif mean_value or meta.get("mean_value"):
        values = _floats(mean_value) or [float(v) for v in meta["mean_value"]]
        mean = numpy.asarray(values if len(values) == channels else values * channels, dtype=numpy.float32)
        mean = mean[:channels].reshape(channels, 1, 1)
    labels = pathlib.Path(labels_file).read_text().splitlines() if labels_file else None

    batch = preprocess([load_image(p, gray=channels == 1) for p in images], (channels, height, width), swap,
                       raw_scale, mean, input_scale, dims)
    net.blobs[input_name].reshape(*batch.shape)
    net.reshape()
    probs = brewnet.to_numpy(net.forward(**{input_name: batch})[net.outputs[0]]).reshape(len(images), -1)

    results = []
    for path, row in zip(images, probs):
        order = numpy.argsort(-row, kind="stable")[:top_k]
        results.append({"image": path, "top": [
            {"class": int(k), "label": labels[k] if labels and k < len(labels) else str(k),
             "probability": float(row[k])} for k in order]})
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for item in results:
        click.echo(item["image"])
        for rank, top in enumerate(item["top"], 1):
            click.echo(f"  {rank}. {top['label']:<20} {top['probability']:.4f}")


COMMANDS = [classify]
