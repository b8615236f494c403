#!/usr/bin/env python
"""Mean image of a Datum database, as Caffe's compute_image_mean.

    compute_image_mean.py [OPTIONS] INPUT_DB OUTPUT_FILE

OUTPUT_FILE is a BlobProto (num 1, channels, height, width; usable as
transform_param.mean_file), or a (1, C, H, W) float32 numpy array when it ends
in .npy. The per-channel mean values are printed too.
"""

import os
import sys

import click
import numpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import info, one_line_errors, progress  # noqa: E402

from brewnet import netdef  # noqa: E402
from brewnet.layers.dataio import db  # noqa: E402
from brewnet.netdef import caffe_pb2  # noqa: E402

CHUNK = 1024


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("input_db", type=click.Path())
@click.argument("output_file", type=click.Path(dir_okay=False))
@click.option("--backend", type=click.Choice(["lmdb", "leveldb"]), default="lmdb", show_default=True)
@one_line_errors
def main(input_db, output_file, backend):
    """Average every Datum of INPUT_DB and write the mean image to OUTPUT_FILE."""
    reader = db.DBReader(input_db, backend)
    total = None
    shape = None
    count = 0

    def add(chunk):
        # Caffe adds datum after datum into float32 sums: a float32 running sum (cumsum) is the same
        nonlocal total
        flat = chunk.reshape(len(chunk), -1).astype(numpy.float32)
        sums = numpy.cumsum(numpy.concatenate([total[None], flat]), axis=0, dtype=numpy.float32)
        total = sums[-1]

    pending = []
    with progress(reader.items(), length=len(reader), label="averaging") as items:
        for key, value in items:
            array = db.datum_to_array(caffe_pb2.Datum.FromString(value), color=None)
            if shape is None:
                shape = array.shape
                total = numpy.zeros(array.size, dtype=numpy.float32)
            elif array.size != total.size:
                raise click.ClickException(f"{input_db}: record {key.decode(errors='replace')} holds "
                                           f"{array.size} values, the first {total.size}")
            pending.append(array.reshape(-1))
            count += 1
            if len(pending) == CHUNK:
                add(numpy.stack(pending))
                pending = []
    if pending:
        add(numpy.stack(pending))
    reader.close()
    mean = (total / numpy.float32(count)).astype(numpy.float32).reshape((1,) + shape)
    with netdef.atomic_write(output_file, "wb") as f:
        if output_file.endswith(".npy"):
            numpy.save(f, mean)
        else:
            f.write(db.mean_blobproto(mean[0]).SerializeToString())
    info(f"{count} images of shape {shape}; written to {output_file}")
    for c, value in enumerate(mean[0].reshape(shape[0], -1).sum(axis=1, dtype=numpy.float32) / shape[1] / shape[2]):
        info(f"mean_value channel [{c}]: {value:g}")


if __name__ == "__main__":
    main()
