#!/usr/bin/env python
"""Convert a list of images to an LMDB of Datums, as Caffe's convert_imageset.

    convert_imageset.py [OPTIONS] ROOTFOLDER/ LISTFILE DB_NAME

LISTFILE holds "relative/path.jpg LABEL" lines; the path is appended to
ROOTFOLDER as written (keep its trailing slash). Raw Datums hold the pixels as
OpenCV reads them: channels x height x width, uint8, colour in BGR order.
"""

import os
import sys

import click
import numpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import backend_option, info, one_line_errors, overwrite_option, progress, warn  # noqa: E402

from brewnet.layers.dataio import db, images  # noqa: E402


def _match_ext(name, encoding):
    ext = name.rsplit(".", 1)[-1].lower()
    return ext == encoding or (encoding == "jpg" and ext == "jpeg")


def image_datum(path, name, label, height, width, color, encoding):
    """Caffe's ReadImageToDatum: a Datum and the decoded shape, or None when unreadable."""
    img = images.read_image(path, height, width, color)
    if img is None:
        return None, None
    if encoding:
        if (img.shape[2] == 3) == color and not height and not width and _match_ext(name, encoding):
            with open(path, "rb") as f:  # the file's own bytes
                return db.encoded_datum(f.read(), label), img.shape
        return db.encoded_datum(images.encode_image(img, encoding), label), img.shape
    return db.array_to_datum(img.transpose(2, 0, 1), label), img.shape


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("root_folder")
@click.argument("list_file", type=click.Path(dir_okay=False))
@click.argument("db_name", type=click.Path())
@click.option("--gray", is_flag=True, help="Treat images as grayscale.")
@click.option("--shuffle", is_flag=True, help="Randomly shuffle the order of images and labels.")
@click.option("--seed", type=int, default=None, help="Seed for --shuffle (random when omitted).")
@backend_option
@click.option("--resize_width", "--resize-width", type=int, default=0, help="Width images are resized to.")
@click.option("--resize_height", "--resize-height", type=int, default=0, help="Height images are resized to.")
@click.option("--check_size", "--check-size", is_flag=True, help="Check that all images have the same size.")
@click.option("--encoded", is_flag=True, help="Store the encoded image (file bytes) in the Datum.")
@click.option("--encode_type", "--encode-type", default="", help="Encode images as this type ('png', 'jpg', ...).")
@overwrite_option
@one_line_errors
def main(root_folder, list_file, db_name, gray, shuffle, seed, backend, resize_width, resize_height,
         check_size, encoded, encode_type, overwrite):
    """Convert images listed in LIST_FILE (under ROOT_FOLDER) into the database DB_NAME."""
    lines = db.read_list_file(list_file)
    if shuffle:
        order = numpy.random.default_rng(seed).permutation(len(lines))
        lines = [lines[i] for i in order]
    info(f"A total of {len(lines)} images.")
    color = not gray
    height, width = max(0, resize_height), max(0, resize_width)
    encode_type = encode_type.lower().lstrip(".")
    size, skipped = None, []
    with db.DBWriter(db_name, backend, overwrite=overwrite) as out:
        with progress(list(enumerate(lines)), label="converting") as items:
            for line_id, (name, label) in items:
                encoding = encode_type
                if encoded and not encoding:
                    if "." not in os.path.basename(name):
                        raise click.ClickException(f"cannot guess the encoding of {name!r}: give --encode_type")
                    encoding = name.rsplit(".", 1)[-1].lower()
                path = root_folder + name
                datum, shape = image_datum(path, name, label, height, width, color, encoding)
                if datum is None:
                    warn(f"could not open or decode image {path}: skipped")
                    skipped.append(path)
                    continue
                if check_size:
                    count = shape[0] * shape[1] * shape[2]
                    if size is None:
                        size = (count, shape)
                    elif count != size[0]:
                        raise click.ClickException(
                            f"image {path} is {shape[1]}x{shape[0]}x{shape[2]}, the first image is "
                            f"{size[1][1]}x{size[1][0]}x{size[1][2]} (--check_size)")
                out.put(f"{line_id:08d}_{name}", datum.SerializeToString())
        written = out.count
    info(f"Processed {written} files" + (f"; {len(skipped)} unreadable image(s) skipped." if skipped else "."))


if __name__ == "__main__":
    main()
