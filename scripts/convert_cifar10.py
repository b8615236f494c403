#!/usr/bin/env python
"""Convert the CIFAR-10 batches to LMDBs, as Caffe's examples/cifar10/convert_cifar_data:
OUTPUT_FOLDER/cifar10_train_lmdb (data_batch_1..5) and cifar10_test_lmdb (test_batch),
keys "%05d", Datums 3 x 32 x 32 holding the bytes as stored (R, G, B planes).

    convert_cifar10.py [OPTIONS] INPUT_FOLDER OUTPUT_FOLDER

INPUT_FOLDER holds the binary batches (data_batch_1.bin, ..., test_batch.bin)
or the python ones (data_batch_1, ..., test_batch: pickles, trusted input).
"""

import os
import pickle
import sys

import click
import numpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import backend_option, info, one_line_errors, overwrite_option, progress  # noqa: E402

from brewnet.layers.dataio import db  # noqa: E402
from brewnet.netdef import caffe_pb2  # noqa: E402

RECORD = 1 + 3 * 32 * 32
TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def read_batch(folder, name):
    """(labels, images as (N, 3072) uint8) of one batch, binary or pickled."""
    binary = os.path.join(folder, name + ".bin")
    if os.path.isfile(binary):
        raw = numpy.fromfile(binary, dtype=numpy.uint8)
        if raw.size % RECORD:
            raise click.ClickException(f"{binary}: size {raw.size} is not a multiple of {RECORD}-byte records")
        raw = raw.reshape(-1, RECORD)
        return raw[:, 0].astype(numpy.int8).astype(int), raw[:, 1:]
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise click.ClickException(f"{folder}: neither {name}.bin nor {name} found")
    with open(path, "rb") as f:
        try:
            batch = pickle.load(f, encoding="bytes")
        except Exception as exc:
            raise click.ClickException(f"{path}: not a CIFAR-10 python batch ({exc})") from None
    data = numpy.asarray(batch[b"data"], dtype=numpy.uint8).reshape(-1, 3072)
    return numpy.asarray(batch[b"labels"], dtype=int), data


def write_db(path, batches, folder, backend, overwrite):
    datum = caffe_pb2.Datum(channels=3, height=32, width=32)
    key = 0
    with db.DBWriter(path, backend, overwrite=overwrite) as out:
        for name in batches:
            labels, images = read_batch(folder, name)
            with progress(range(len(labels)), label=name) as items:
                for i in items:
                    datum.label = int(labels[i])
                    datum.data = images[i].tobytes()
                    out.put(f"{key:05d}", datum.SerializeToString())
                    key += 1
    info(f"Wrote {key} records to {path}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("input_folder", type=click.Path(exists=True, file_okay=False))
@click.argument("output_folder", type=click.Path(file_okay=False))
@backend_option
@overwrite_option
@one_line_errors
def main(input_folder, output_folder, backend, overwrite):
    """Convert the CIFAR-10 batches in INPUT_FOLDER into two databases in OUTPUT_FOLDER."""
    train = os.path.join(output_folder, f"cifar10_train_{backend}")
    test = os.path.join(output_folder, f"cifar10_test_{backend}")
    for path in (train, test):
        if os.path.lexists(path) and not overwrite:
            raise click.ClickException(f"{path} already exists (use --overwrite to replace it)")
    write_db(train, TRAIN, input_folder, backend, overwrite)
    write_db(test, ["test_batch"], input_folder, backend, overwrite)


if __name__ == "__main__":
    main()
