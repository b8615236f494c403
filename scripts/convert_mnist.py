#!/usr/bin/env python
"""Convert MNIST-format IDX files (raw or .gz; Fashion-MNIST too) to an LMDB,
as Caffe's examples/mnist/convert_mnist_data: keys "%08d", Datums 1 x rows x cols.

    convert_mnist.py [OPTIONS] IMAGE_FILE LABEL_FILE DB_NAME
"""

import os
import sys

import click

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import backend_option, info, one_line_errors, overwrite_option, progress  # noqa: E402

from brewnet.layers.dataio import db  # noqa: E402
from brewnet.netdef import caffe_pb2  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("image_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("label_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("db_name", type=click.Path())
@backend_option
@overwrite_option
@one_line_errors
def main(image_file, label_file, db_name, backend, overwrite):
    """Write the images of IMAGE_FILE with the labels of LABEL_FILE into DB_NAME."""
    if db.idx_magic(image_file) != 2051:
        raise click.ClickException(f"{image_file}: incorrect image file magic (expected 2051, an IDX ubyte 3-D file)")
    if db.idx_magic(label_file) != 2049:
        raise click.ClickException(f"{label_file}: incorrect label file magic (expected 2049, an IDX ubyte 1-D file)")
    images, labels = db.read_idx(image_file), db.read_idx(label_file)
    if len(images) != len(labels):
        raise click.ClickException(f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels")
    n, rows, cols = images.shape
    info(f"A total of {n} items. Rows: {rows} Cols: {cols}")
    # the label is a C char in Caffe's tool: bytes above 127 wrap to negative values
    labels = labels.astype("int8").astype(int)
    datum = caffe_pb2.Datum(channels=1, height=rows, width=cols)
    with db.DBWriter(db_name, backend, overwrite=overwrite) as out:
        with progress(range(n), label="converting") as items:
            for i in items:
                datum.data = images[i].tobytes()
                datum.label = int(labels[i])
                out.put(f"{i:08d}", datum.SerializeToString())
    info(f"Processed {n} files.")


if __name__ == "__main__":
    main()
