"""Caffe's data tools as functions: convert_imageset, convert_mnist (Caffe's
examples/mnist/convert_mnist_data), convert_cifar10 (examples/cifar10/convert_cifar_data)
and compute_image_mean. `brewnet convert_imageset ...` and friends are thin
commands over these.

Every database is built under a temporary name beside its final one and renamed
only when complete (db.DBWriter), and the mean file is written the same way, so
an error or an interrupt never leaves a half-written output. Problems with the
inputs raise DefinitionError with a one-line message. What a tool has to say
(counts, warnings, progress) goes to a Reporter, silent unless one is given.
"""

import contextlib
import os
import pickle

import numpy

from brewnet.layers.dataio import db, images
from brewnet.netdef import DefinitionError, atomic_write, caffe_pb2


class Reporter:
    """Where a conversion reports to; this one is silent. The CLI passes one that
    prints messages and shows progress bars on stderr."""

    def info(self, message):
        pass

    def warn(self, message):
        pass

    def progress(self, iterable, length=None, label=""):
        """A context manager yielding ``iterable`` (to iterate with a progress display)."""
        return contextlib.nullcontext(iterable)


_SILENT = Reporter()


# ---------------------------------------------------------------------------
# convert_imageset
# ---------------------------------------------------------------------------
def _match_ext(name, encoding):
    ext = name.rsplit(".", 1)[-1].lower()
    return ext == encoding or (encoding == "jpg" and ext == "jpeg")


def image_datum(path, name, label, height, width, color, encoding):
    """Caffe's ReadImageToDatum: (Datum, decoded HWC shape), or (None, None) when the
    image cannot be read. ``encoding`` '' stores raw BGR pixels; otherwise the Datum
    holds the file's own bytes when they already are that encoding (and need no
    resize or colour change), else the image re-encoded."""
    img = images.read_image(path, height, width, color)
    if img is None:
        return None, None
    if encoding:
        if (img.shape[2] == 3) == color and not height and not width and _match_ext(name, encoding):
            with open(path, "rb") as f:
                return db.encoded_datum(f.read(), label), img.shape
        return db.encoded_datum(images.encode_image(img, encoding), label), img.shape
    return db.array_to_datum(img.transpose(2, 0, 1), label), img.shape


def image_path(root_folder, name):
    """Caffe's root_folder + name, as written; where that file does not exist but the two
    joined as folder and file do (a root given without its trailing slash), the latter."""
    caffe_path = root_folder + name
    if root_folder and not os.path.exists(caffe_path) and os.path.exists(os.path.join(root_folder, name)):
        return os.path.join(root_folder, name)
    return caffe_path


def _shape_text(shape):
    return f"{shape[1]}x{shape[0]}x{shape[2]}"


def convert_imageset(root_folder, list_file, db_path, *, gray=False, shuffle=False, seed=None, backend="lmdb",
                     resize_height=0, resize_width=0, check_size=False, encoded=False, encode_type="",
                     overwrite=False, report=None):
    """Write the images listed in ``list_file`` ("relative/path LABEL" lines) into the
    database ``db_path``, as Caffe's convert_imageset: keys "%08d_<path>" (the line's
    index in the, possibly shuffled, list), raw Datums of channels x height x width
    uint8 in BGR order, or encoded Datums with ``encoded``/``encode_type``.

    Each path is appended to ``root_folder`` as Caffe does (a root without its trailing
    slash is joined as a folder). Unreadable images are skipped with a warning; when
    none could be read, no database is written. Returns (records written, the skipped
    paths).
    """
    report = report or _SILENT
    root_folder, list_file, db_path = os.fspath(root_folder), os.fspath(list_file), os.fspath(db_path)
    lines = db.read_list_file(list_file)
    if shuffle:
        order = numpy.random.default_rng(seed).permutation(len(lines))
        lines = [lines[i] for i in order]
    report.info(f"A total of {len(lines)} images.")
    color = not gray
    height, width = max(0, resize_height), max(0, resize_width)
    encode_type = encode_type.lower().lstrip(".")
    first, skipped = None, []
    with db.DBWriter(db_path, backend, overwrite=overwrite) as out:
        with report.progress(list(enumerate(lines)), label="converting") as items:
            for line_id, (name, label) in items:
                encoding = encode_type
                if encoded and not encoding:
                    if "." not in os.path.basename(name):
                        raise DefinitionError(f"cannot guess the encoding of {name!r}: give --encode_type",
                                              list_file)
                    encoding = name.rsplit(".", 1)[-1].lower()
                path = image_path(root_folder, name)
                datum, shape = image_datum(path, name, label, height, width, color, encoding)
                if datum is None:
                    report.warn(f"could not open or decode image {path}: skipped")
                    skipped.append(path)
                    continue
                if check_size:
                    if first is None:
                        first = shape
                    elif numpy.prod(shape) != numpy.prod(first):
                        raise DefinitionError(f"image {path} is {_shape_text(shape)}, the first image is "
                                              f"{_shape_text(first)} (--check_size)")
                out.put(f"{line_id:08d}_{name}", datum.SerializeToString())
        written = out.count
        if not written and lines:  # raising here discards the unfinished database
            raise DefinitionError(f"none of the {len(lines)} images could be read (the first: "
                                  f"{image_path(root_folder, lines[0][0])}); no database written", list_file)
    report.info(f"Processed {written} files" +
                (f"; {len(skipped)} unreadable image(s) skipped." if skipped else "."))
    return written, skipped


# ---------------------------------------------------------------------------
# convert_mnist
# ---------------------------------------------------------------------------
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def convert_mnist(image_file, label_file, db_path, *, backend="lmdb", overwrite=False, report=None):
    """Write MNIST-format IDX files (raw or .gz; Fashion-MNIST too) into ``db_path``,
    as Caffe's convert_mnist_data: keys "%08d", Datums 1 x rows x cols. Returns the
    number of records."""
    report = report or _SILENT
    image_file, label_file, db_path = os.fspath(image_file), os.fspath(label_file), os.fspath(db_path)
    if db.idx_magic(image_file) != IMAGES_MAGIC:
        raise DefinitionError(f"incorrect image file magic (expected {IMAGES_MAGIC}, an IDX ubyte 3-D file)",
                              image_file)
    if db.idx_magic(label_file) != LABELS_MAGIC:
        raise DefinitionError(f"incorrect label file magic (expected {LABELS_MAGIC}, an IDX ubyte 1-D file)",
                              label_file)
    with db.DBWriter(db_path, backend, overwrite=overwrite) as out:  # an existing db_path fails first
        pixels, labels = db.read_idx(image_file), db.read_idx(label_file)
        if len(pixels) != len(labels):
            raise DefinitionError(f"{len(pixels)} images, but {label_file} holds {len(labels)} labels", image_file)
        n, rows, cols = pixels.shape
        report.info(f"A total of {n} items. Rows: {rows} Cols: {cols}")
        # the label is a C char in Caffe's tool: bytes above 127 wrap to negative values
        labels = labels.astype(numpy.int8).astype(int)
        datum = caffe_pb2.Datum(channels=1, height=rows, width=cols)
        with report.progress(range(n), label="converting") as items:
            for i in items:
                datum.data = pixels[i].tobytes()
                datum.label = int(labels[i])
                out.put(f"{i:08d}", datum.SerializeToString())
    report.info(f"Processed {n} files.")
    return n


# ---------------------------------------------------------------------------
# convert_cifar10
# ---------------------------------------------------------------------------
CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]


def _cifar_batch_path(folder, name):
    """The batch's binary file (NAME.bin) or else its python pickle (NAME)."""
    for path in (os.path.join(folder, name + ".bin"), os.path.join(folder, name)):
        if os.path.isfile(path):
            return path
    raise DefinitionError(f"neither {name}.bin nor {name} found", folder)


def read_cifar10_batch(folder, name):
    """(labels, images as (N, 3072) uint8 R, G, B planes) of one CIFAR-10 batch, from its
    binary file or its python pickle (trusted input)."""
    path = _cifar_batch_path(folder, name)
    if path.endswith(".bin"):
        raw = numpy.fromfile(path, dtype=numpy.uint8)
        if raw.size % CIFAR_RECORD:
            raise DefinitionError(f"size {raw.size} is not a multiple of {CIFAR_RECORD}-byte records", path)
        raw = raw.reshape(-1, CIFAR_RECORD)
        return raw[:, 0].astype(numpy.int8).astype(int), raw[:, 1:]
    with open(path, "rb") as f:
        try:
            batch = pickle.load(f, encoding="bytes")
            data = numpy.asarray(batch[b"data"], dtype=numpy.uint8).reshape(-1, 3072)
            labels = numpy.asarray(batch[b"labels"], dtype=int)
        except Exception as exc:
            raise DefinitionError(f"not a CIFAR-10 python batch ({exc.__class__.__name__}: {exc})", path) from None
    return labels, data


def _write_cifar_db(path, batches, folder, backend, overwrite, report):
    datum = caffe_pb2.Datum(channels=3, height=32, width=32)
    key = 0
    with db.DBWriter(path, backend, overwrite=overwrite) as out:
        for name in batches:
            labels, pixels = read_cifar10_batch(folder, name)
            with report.progress(range(len(labels)), label=name) as items:
                for i in items:
                    datum.label = int(labels[i])
                    datum.data = pixels[i].tobytes()
                    out.put(f"{key:05d}", datum.SerializeToString())
                    key += 1
    report.info(f"Wrote {key} records to {path}")
    return key


def convert_cifar10(input_folder, output_folder, *, backend="lmdb", overwrite=False, report=None):
    """Write the CIFAR-10 batches of ``input_folder`` (data_batch_1..5 and test_batch,
    binary .bin files or python pickles) into OUTPUT/cifar10_train_<backend> and
    OUTPUT/cifar10_test_<backend>, as Caffe's convert_cifar_data: keys "%05d",
    Datums 3 x 32 x 32 holding the bytes as stored. Returns the two paths."""
    report = report or _SILENT
    input_folder, output_folder = os.fspath(input_folder), os.fspath(output_folder)
    if not os.path.isdir(input_folder):
        raise DefinitionError("is not a folder of CIFAR-10 batches", input_folder)
    for name in CIFAR_TRAIN + CIFAR_TEST:  # all there before anything is written
        _cifar_batch_path(input_folder, name)
    train = os.path.join(output_folder, f"cifar10_train_{backend}")
    test = os.path.join(output_folder, f"cifar10_test_{backend}")
    for path in (train, test):
        if os.path.lexists(path) and not overwrite:
            raise db.DBExistsError(f"{path} already exists (use --overwrite to replace it)")
    _write_cifar_db(train, CIFAR_TRAIN, input_folder, backend, overwrite, report)
    _write_cifar_db(test, CIFAR_TEST, input_folder, backend, overwrite, report)
    return train, test


# ---------------------------------------------------------------------------
# compute_image_mean
# ---------------------------------------------------------------------------
MEAN_CHUNK_BYTES = 32 << 20  # float32 rows summed at once: memory stays a few chunks whatever the data set


def _mismatch(key, shape, first):
    """A record of another shape than the first, and what to do about it."""
    text = "x".join
    return (f"record {key.decode(errors='replace')!r} is {text(map(str, shape))} (channels x height x width), the "
            f"first {text(map(str, first))}: images of different sizes have no mean image; convert them to one size "
            f"(brewnet convert_imageset --resize_height {first[1]} --resize_width {first[2]}, or the size the net "
            f"takes)")


def compute_image_mean(input_db, output_file=None, *, backend="lmdb", report=None):
    """The mean image of every Datum in ``input_db``, as Caffe's compute_image_mean:
    a (1, C, H, W) float32 array, summed datum after datum in float32 as Caffe does.

    With ``output_file`` it is written there (atomically): a BlobProto (usable as
    transform_param.mean_file), or a numpy array when the name ends in .npy. The
    per-channel means are reported either way. Records are read one at a time and
    summed in chunks of at most MEAN_CHUNK_BYTES, so memory does not grow with the
    database. Records of another shape than the first are an error (with a hint to
    resize them when converting).
    """
    report = report or _SILENT
    input_db = os.fspath(input_db)
    output_file = os.fspath(output_file) if output_file is not None else None
    reader = db.DBReader(input_db, backend)
    total, shape, count, pending, chunk_rows = None, None, 0, [], 1

    def add(chunk):
        # a float32 running sum (cumsum) adds in the same order as Caffe's datum-by-datum loop
        nonlocal total
        rows = numpy.concatenate([total[None], numpy.stack(chunk).astype(numpy.float32)])
        total = numpy.cumsum(rows, axis=0, dtype=numpy.float32)[-1]

    try:
        with report.progress(reader.items(), length=len(reader), label="averaging") as items:
            for key, value in items:
                where = f"{input_db}: record {key.decode(errors='replace')!r}"
                array = db.datum_to_array(db.parse_datum(value, where), color=None)
                if shape is None:
                    shape = array.shape
                    total = numpy.zeros(array.size, dtype=numpy.float32)
                    chunk_rows = max(1, MEAN_CHUNK_BYTES // (4 * array.size))
                elif array.shape != shape:
                    raise DefinitionError(_mismatch(key, array.shape, shape), input_db)
                pending.append(array.reshape(-1))
                count += 1
                if len(pending) == chunk_rows:
                    add(pending)
                    pending = []
    finally:
        reader.close()
    if pending:
        add(pending)
    mean = (total / numpy.float32(count)).astype(numpy.float32).reshape((1,) + shape)
    if output_file is not None:
        with atomic_write(output_file, "wb") as f:
            if output_file.endswith(".npy"):
                numpy.save(f, mean)
            else:
                f.write(db.mean_blobproto(mean[0]).SerializeToString())
    report.info(f"{count} images of shape {shape}" + (f"; written to {output_file}" if output_file else ""))
    channel_means = mean[0].reshape(shape[0], -1).sum(axis=1, dtype=numpy.float32) / shape[1] / shape[2]
    for c, value in enumerate(channel_means):
        report.info(f"mean_value channel [{c}]: {value:g}")
    return mean
