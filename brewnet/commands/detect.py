"""`brewnet detect`: find objects in images with an SSD-style deploy net.

The net ends in SSD's DetectionOutput layer (rows of [image, label, score, xmin, ymin, xmax,
ymax], coordinates in [0, 1]). Each image is warped to the net's input size, as SSD's demos do
(no crop), then preprocessed like `brewnet classify`: HWC -> CHW, channel swap (RGB -> BGR by
default for colour nets), * raw_scale, - mean, * input_scale. Boxes are printed in the original
image's pixels; --draw writes the image with its boxes.
"""

import json
import os
import time

import click
import numpy

from brewnet.commands.classify import _floats, expand_inputs, load_image, load_mean, open_test_net, resize
from brewnet.netdef.errors import DefinitionError

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40)]


def read_labels(path):
    """label id -> name: SSD's labelmap prototxt (item { name label display_name }), or a text file
    with one name per line in label order (line 0 is label 0, the background in SSD's maps)."""
    if path is None:
        return {}
    from brewnet.netdef import caffe_pb2
    from brewnet.netdef.io import parse_text

    with open(path, encoding="utf-8") as f:
        text = f.read()
    if "item" in text and "{" in text:
        labelmap = parse_text(text, caffe_pb2.LabelMap(), path)
        return {item.label: item.display_name or item.name for item in labelmap.item}
    return {i: line.strip() for i, line in enumerate(text.splitlines())}


def detection_blob(net):
    """The output of the net's DetectionOutput layer (else its first output)."""
    for name, layer in zip(net.layer_names, net.layers):
        if layer.type == "DetectionOutput":
            return net.top_names[name][0]
    return net.outputs[0]


def draw_boxes(image_path, image, detections, out_path):
    """Save ``image`` (HxWx3 floats in [0, 1], or the file) with a labelled rectangle per detection."""
    from PIL import Image, ImageDraw

    from brewnet.netdef import atomic_write

    picture = Image.fromarray((numpy.clip(image, 0, 1) * 255).round().astype(numpy.uint8)).convert("RGB")
    pen = ImageDraw.Draw(picture)
    width = max(2, round(max(picture.size) / 250))
    for det in detections:
        colour = PALETTE[det["label_id"] % len(PALETTE)]
        x0, y0, x1, y1 = det["box"]
        pen.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        caption = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = pen.textbbox((x0, y0), caption)
        lift = bottom - top + 2
        pen.rectangle([x0, y0 - lift, x0 + right - left + 4, y0], fill=colour)
        pen.text((x0 + 2, y0 - lift), caption, fill=(0, 0, 0))
    suffix = os.path.splitext(out_path)[1].lstrip(".").upper() or "PNG"
    with atomic_write(out_path, "wb") as f:
        picture.save(f, format={"JPG": "JPEG"}.get(suffix, suffix))


def _draw_path(draw, image_path, count):
    """--draw OUT for one image; for several, OUT is a folder receiving NAME.png per image."""
    if count == 1 and not os.path.isdir(draw):
        return draw
    os.makedirs(draw, exist_ok=True)
    stem = os.path.splitext(os.path.basename(image_path.split("[")[0]))[0]
    suffix = image_path[len(image_path.split("[")[0]):].strip("[]")
    return os.path.join(draw, f"{stem}{'_' + suffix if suffix else ''}.png")


@click.command("detect")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--model", "--model_def", "model", required=True, help="Deploy prototxt ending in DetectionOutput.")
@click.option("--weights", "--pretrained_model", "weights", required=True, help="Weights (.caffemodel/.h5).")
@click.option("--labels", "labels_file", type=click.Path(exists=True, dir_okay=False),
              help="SSD labelmap prototxt, or a text file with one label per line (line 0: label 0).")
@click.option("--threshold", type=float, default=0.5, show_default=True,
              help="Print and draw detections scoring at least this.")
@click.option("--mean", "--mean_file", "mean_file", help="Mean (.npy or .binaryproto).")
@click.option("--mean-value", help="Per-channel mean, e.g. 127.5,127.5,127.5.")
@click.option("--raw-scale", type=float, default=255.0, show_default=True,
              help="Scale applied to [0,1] pixels before the mean.")
@click.option("--input-scale", type=float, default=1.0, show_default=True, help="Scale applied after the mean.")
@click.option("--channel-swap", help="Channel order, e.g. 2,1,0 (default for colour nets: RGB -> BGR).")
@click.option("--ext", default=None, help="Image extension to take from a folder (default: every image extension).")
@click.option("--draw", type=click.Path(), help="Write the image with its boxes here (a folder for several images).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--gpu", type=int, help="GPU device id.")
def detect(inputs, model, weights, labels_file, threshold, mean_file, mean_value, raw_scale, input_scale,
           channel_swap, ext, draw, as_json, gpu):
    """Detect objects: print each image's boxes (pixels), labels and scores; --draw saves a picture.

    INPUT may be image files, folders of images and .npy arrays of images (N x H x W x K,
    values in [0, 1]).
    """
    import brewnet

    found = expand_inputs(inputs, ext)
    labels = read_labels(labels_file)
    net, input_name, (channels, height, width) = open_test_net(model, weights, gpu)
    output = detection_blob(net)
    swap = _floats(channel_swap)
    if swap is None and channels == 3:
        swap = [2, 1, 0]
    swap = [int(s) for s in swap] if swap is not None else None
    mean = None
    if mean_file:
        mean = load_mean(mean_file, channels, height, width)
    elif mean_value:
        values = _floats(mean_value)
        mean = numpy.asarray(values if len(values) == channels else values * channels, dtype=numpy.float32)
        mean = mean[:channels].reshape(channels, 1, 1)

    start = time.monotonic()
    results = []
    for path, image in found:
        image = image if image is not None else load_image(path, gray=channels == 1)
        if image.ndim != 3 or image.shape[2] != channels:
            raise DefinitionError(f"image has shape {image.shape}, the net takes {channels} channel(s)", path)
        chw = resize(image, height, width).transpose(2, 0, 1)
        if swap is not None:
            chw = chw[swap]
        chw = chw * raw_scale
        if mean is not None:
            chw = chw - mean
        batch = (chw * input_scale)[None].astype(numpy.float32)
        rows = brewnet.to_numpy(net.forward(**{input_name: batch})[output])
        if rows.ndim != 4 or rows.shape[-1] != 7:
            raise DefinitionError(f"output blob {output!r} of shape {rows.shape} is not SSD's detections "
                                  "(1 x 1 x N x 7: end the net in a DetectionOutput layer)", model)
        rows = rows.reshape(-1, 7)
        rows = rows[(rows[:, 1] >= 0) & (rows[:, 2] >= threshold)]
        rows = rows[numpy.argsort(-rows[:, 2], kind="stable")]
        rows_px = rows[:, 3:7] * numpy.array([image.shape[1], image.shape[0]] * 2)
        detections = [{"label_id": int(r[1]), "label": labels.get(int(r[1]), str(int(r[1]))), "score": float(r[2]),
                       "box": [round(float(v), 1) for v in box]} for r, box in zip(rows, rows_px)]
        results.append({"image": path, "detections": detections})
        if draw:
            draw_boxes(path, image if channels == 3 else numpy.repeat(image, 3, axis=2), detections,
                       _draw_path(draw, path, len(found)))
    elapsed = time.monotonic() - start
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for item in results:
        click.echo(f"{item['image']}: {len(item['detections'])} detection(s)")
        for det in item["detections"]:
            x0, y0, x1, y1 = det["box"]
            click.echo(f"  {det['label']:<16} {det['score']:.3f}  ({x0:.1f}, {y0:.1f}) - ({x1:.1f}, {y1:.1f})")
    click.echo(f"{len(results)} image(s) in {elapsed:.2f} s", err=True)


COMMANDS = [detect]
