"""Caffe's on-disk data formats: Datum records in LMDB (or LevelDB), IDX files,
image list files, mean BlobProtos, and images read the way OpenCV reads them.

Shared by the data layers and by the conversion scripts in scripts/. Images
are host numpy arrays in OpenCV's layout: (height, width, channels) uint8 with
colour channels in BGR order, which is what Caffe stores in raw Datums.
"""

import gzip
import os
import shutil
import tempfile
import weakref

import numpy

from brewnet.layers.dataio.images import decode_image
from brewnet.netdef import DefinitionError, caffe_pb2

COMMIT_EVERY = 1000  # Caffe's tools commit a transaction every 1000 records


# ---------------------------------------------------------------------------
# Datum
# ---------------------------------------------------------------------------
def array_to_datum(array, label=0):
    """A raw Datum from a (C, H, W) uint8 array (or float array -> float_data), as CVMatToDatum."""
    array = numpy.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"a Datum holds a (channels, height, width) array, got shape {array.shape}")
    datum = caffe_pb2.Datum(channels=array.shape[0], height=array.shape[1], width=array.shape[2])
    if array.dtype == numpy.uint8:
        datum.data = array.tobytes()
    else:
        datum.float_data.extend(array.astype(numpy.float32).ravel().tolist())
    datum.label = int(label)
    datum.encoded = False  # CVMatToDatum sets it explicitly, so it is serialised
    return datum


def encoded_datum(data, label=0):
    """An encoded Datum (file bytes), as Caffe's ReadFileToDatum: no dimensions."""
    return caffe_pb2.Datum(data=bytes(data), label=int(label), encoded=True)


def parse_datum(record, where="a Datum record"):
    """A Datum from a database record's bytes; damaged bytes are a one-line DefinitionError."""
    try:
        return caffe_pb2.Datum.FromString(record)
    except Exception as exc:  # protobuf's DecodeError (and, with some backends, others)
        raise DefinitionError(f"{where}: not a valid Datum ({type(exc).__name__})") from None


def datum_shape(datum):
    """(channels, height, width) of a raw Datum; negative sizes (a damaged record) refused."""
    shape = (datum.channels, datum.height, datum.width)
    if min(shape) < 0:
        raise DefinitionError(f"a Datum with a negative size {shape}")
    return shape


def datum_to_array(datum, color=None):
    """(C, H, W) array of one Datum: uint8 for ``data``, float32 for ``float_data``.

    Encoded datums are decoded (color: True/False forces BGR/gray, None keeps
    the file's own channels, as DecodeDatumToCVMatNative).
    """
    if datum.encoded:
        return decode_image(datum.data, color, "an encoded Datum").transpose(2, 0, 1)
    shape = datum_shape(datum)
    size = shape[0] * shape[1] * shape[2]
    if datum.data:
        if len(datum.data) != size:
            raise DefinitionError(f"Datum data holds {len(datum.data)} bytes, expected {size} for shape {shape}")
        return numpy.frombuffer(datum.data, dtype=numpy.uint8).reshape(shape)
    if len(datum.float_data) != size:
        raise DefinitionError(f"Datum float_data holds {len(datum.float_data)} values, expected {size} for shape {shape}")
    return numpy.asarray(datum.float_data, dtype=numpy.float32).reshape(shape)


def datums_to_batch(datums, color=None):
    """Stack datums into one (N, C, H, W) array, with one join for raw uint8 data."""
    first = datums[0]
    if not first.encoded and first.data and all(not d.encoded and d.data for d in datums):
        shape = datum_shape(first)
        if any((d.channels, d.height, d.width) != shape for d in datums):
            bad = next(d for d in datums if (d.channels, d.height, d.width) != shape)
            raise DefinitionError(f"datums of one batch differ in shape: {shape} and {(bad.channels, bad.height, bad.width)}")
        flat = numpy.frombuffer(b"".join(d.data for d in datums), dtype=numpy.uint8)
        if flat.size != len(datums) * shape[0] * shape[1] * shape[2]:
            raise DefinitionError(f"a Datum's data does not match its shape {shape}")
        return flat.reshape((len(datums),) + shape)
    arrays = [datum_to_array(d, color) for d in datums]
    shape = arrays[0].shape
    for a in arrays[1:]:
        if a.shape != shape:
            raise DefinitionError(f"datums of one batch differ in shape: {shape} and {a.shape}")
    dtype = numpy.float32 if any(a.dtype != numpy.uint8 for a in arrays) else numpy.uint8
    return numpy.stack([a.astype(dtype, copy=False) for a in arrays])


# ---------------------------------------------------------------------------
# databases
# ---------------------------------------------------------------------------
def _import_plyvel(what):
    try:
        import plyvel
    except ImportError:
        raise DefinitionError(f"{what}: backend LEVELDB needs the plyvel package (pip install plyvel); "
                              "only LMDB is supported without it") from None
    return plyvel


def is_lmdb(path):
    return os.path.isfile(os.path.join(path, "data.mdb")) or (os.path.isfile(path) and not os.path.isdir(path))


class DBExistsError(DefinitionError):
    pass


class DBWriter:
    """Writes records into a new database built under a temporary name in the
    same folder; ``close()`` renames it to ``path`` only when complete, so an
    interrupted run leaves nothing under the final name.
    """

    def __init__(self, path, backend="lmdb", overwrite=False, commit_every=COMMIT_EVERY):
        self.path = os.path.abspath(path)
        self.backend = backend.lower()
        if self.backend not in ("lmdb", "leveldb"):
            raise DefinitionError(f"unknown backend {backend!r} (use lmdb or leveldb)")
        if os.path.lexists(self.path) and not overwrite:
            raise DBExistsError(f"{path} already exists (use --overwrite to replace it)")
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.tmp-", dir=parent)
        os.chmod(self.tmp, 0o755)
        self.commit_every = commit_every
        self.pending = []
        self.count = 0
        if self.backend == "lmdb":
            import lmdb

            self._lmdb = lmdb
            self.map_size = 64 << 20
            self.env = lmdb.open(self.tmp, map_size=self.map_size, subdir=True, meminit=False)
        else:
            plyvel = _import_plyvel(path)
            os.rmdir(self.tmp)
            self.env = plyvel.DB(self.tmp, create_if_missing=True, error_if_exists=True)

    def put(self, key, value):
        self.pending.append((key.encode() if isinstance(key, str) else bytes(key), value))
        self.count += 1
        if len(self.pending) >= self.commit_every:
            self.commit()

    def commit(self):
        if not self.pending:
            return
        if self.backend == "leveldb":
            with self.env.write_batch() as batch:
                for k, v in self.pending:
                    batch.put(k, v)
            self.pending = []
            return
        while True:  # as Caffe: on a full map, double it and redo the whole transaction
            try:
                with self.env.begin(write=True) as txn:
                    for k, v in self.pending:
                        txn.put(k, v)
                break
            except self._lmdb.MapFullError:
                self.map_size *= 2
                self.env.set_mapsize(self.map_size)
        self.pending = []

    def close(self):
        """Commit what is left and move the finished database to its name."""
        self.commit()
        self.env.close()
        if os.path.lexists(self.path):  # --overwrite: the old one goes only now
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.old-", dir=os.path.dirname(self.path))
            os.rename(self.path, os.path.join(old, "db"))
            shutil.rmtree(old, ignore_errors=True)
        os.rename(self.tmp, self.path)

    def abort(self):
        try:
            self.env.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


_READ_ENVS = weakref.WeakValueDictionary()


def _open_lmdb_readonly(path):
    """One shared read-only environment per database file: py-lmdb refuses to open the
    same one twice in a process (Caffe opens it once per layer)."""
    import lmdb

    subdir = os.path.isdir(path)
    stat = os.stat(os.path.join(path, "data.mdb") if subdir else path)
    key = (os.path.realpath(path), stat.st_ino, stat.st_mtime_ns)
    env = _READ_ENVS.get(key)
    if env is None:
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=subdir, max_readers=512)
        _READ_ENVS[key] = env
    return env


class DBReader:
    """Read-only access to a Datum database, with Caffe's cycling cursor."""

    def __init__(self, path, backend="lmdb", what=None):
        self.path = path
        what = f"{what}: " if what else ""
        if not os.path.exists(path):
            raise DefinitionError(f"{what}data source {path} does not exist")
        self.backend = backend.lower()
        if self.backend == "leveldb":
            if is_lmdb(path):
                raise DefinitionError(f"{what}{path} is an LMDB but the backend is LEVELDB "
                                      "(the default): add backend: LMDB to data_param")
            plyvel = _import_plyvel(what.rstrip(": ") or path)
            self.env = plyvel.DB(path, create_if_missing=False)
            self.size = sum(1 for _ in self.env.iterator(include_value=False))
            self._iter = None
        else:
            import lmdb

            if os.path.isdir(path) and not os.path.exists(os.path.join(path, "data.mdb")):
                raise DefinitionError(f"{what}data source {path} is a folder but not an LMDB (no data.mdb in it); "
                                      "make one with brewnet convert_imageset or convert_mnist")
            try:
                self.env = _open_lmdb_readonly(path)
            except lmdb.Error as exc:
                raise DefinitionError(f"{what}cannot open LMDB {path}: {exc}") from None
            self.size = self.env.stat()["entries"]
            self.txn = self.env.begin(buffers=False)
            self.cursor = self.txn.cursor()
            self.cursor.first()
        if self.size == 0:
            self.close()
            raise DefinitionError(f"{what}data source {path} is empty")

    def __len__(self):
        return self.size

    def items(self):
        """Every (key, value) once, in key order."""
        if self.backend == "leveldb":
            yield from self.env.iterator()
        else:
            yield from self.env.begin(buffers=False).cursor().iternext()

    def value(self):
        if self.backend == "leveldb":
            if self._iter is None:
                self._iter = self.env.iterator()
                self._cur = next(self._iter)
            return self._cur[1]
        return self.cursor.value()

    def next(self):
        """Advance; past the last record go back to the first (Caffe's cursor)."""
        if self.backend == "leveldb":
            self.value()
            self._cur = next(self._iter, None)
            if self._cur is None:
                self._iter = self.env.iterator()
                self._cur = next(self._iter)
            return
        if not self.cursor.next():
            self.cursor.first()

    def take(self, n):
        """The next n values (cycling)."""
        values = []
        for _ in range(n):
            values.append(self.value())
            self.next()
        return values

    def close(self):
        """Drop this reader (a shared LMDB environment closes with its last reader)."""
        if self.backend == "leveldb":
            self.env.close()
        self.cursor = self.txn = self.env = None


# ---------------------------------------------------------------------------
# IDX (MNIST) files
# ---------------------------------------------------------------------------
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """An IDX file (raw or gzip) as a numpy array."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DefinitionError(f"{path}: broken gzip file: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DefinitionError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DefinitionError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in numpy.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = numpy.dtype(_IDX_TYPES[raw[2]])
    count = int(numpy.prod(shape, dtype=numpy.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise DefinitionError(f"{path}: IDX data holds {len(raw) - header} bytes, "
                              f"expected {count * dtype.itemsize} for shape {shape}")
    return numpy.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def idx_magic(path):
    """The 32-bit magic number of an IDX file (2051 for images, 2049 for labels)."""
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head == b"\x1f\x8b":
            f = gzip.GzipFile(fileobj=f)
        data = f.read(4)
    return int.from_bytes(data, "big") if len(data) == 4 else -1


def idx_bytes(array):
    """The IDX encoding of an array (uint8 -> type 0x08, ...)."""
    array = numpy.asarray(array)
    codes = {numpy.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot hold {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + numpy.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(_IDX_TYPES[code]).tobytes()


# ---------------------------------------------------------------------------
# list files ("path label" per line), mean files
# ---------------------------------------------------------------------------
def read_list_file(path, what=None):
    """[(name, label)] from an image list: the label follows the last space."""
    what = f"{what}: " if what else ""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DefinitionError(f"{what}cannot read list file {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DefinitionError(f"{what}the list file is not UTF-8 text (byte 0x{data[exc.start]:02x})", path=path,
                              line=line) from None
    lines = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        name, sep, label = line.rpartition(" ")
        try:
            value = int(label)
        except ValueError:
            value = None
        if not sep or not name or value is None:
            raise DefinitionError(f"{what}expected 'PATH LABEL' (an integer label after the last space), "
                                  f"got {line!r}", path=path, line=number)
        if not -2**31 <= value < 2**31:  # a Datum's label is an int32
            raise DefinitionError(f"{what}label {value} does not fit a Datum's 32-bit label", path=path,
                                  line=number)
        lines.append((name, value))
    if not lines:
        raise DefinitionError(f"{what}list file {path} is empty")
    return lines


def read_hdf5_list(path, what=None):
    """The HDF5 files an HDF5Data source names (whitespace-separated): relative to the
    working directory, as in Caffe, else to the list file."""
    what = f"{what}: " if what else ""
    try:
        with open(path) as f:
            names = f.read().split()
    except OSError:
        raise DefinitionError(f"{what}HDF5 file list {path or '(source not set)'} does not exist") from None
    if not names:
        raise DefinitionError(f"{what}HDF5 file list {path} is empty")
    base = os.path.dirname(path)
    return [n if os.path.exists(n) or os.path.isabs(n) else os.path.join(base, n) for n in names]


def read_mean_file(path, what=None):
    """The mean image of a binaryproto (or .npy) as a float32 array."""
    what = f"{what}: " if what else ""
    if not os.path.isfile(path):
        raise DefinitionError(f"{what}mean file {path} does not exist")
    if path.endswith(".npy"):
        return read_npy(path, what)
    from brewnet import netdef

    return numpy.asarray(netdef.read_blobproto(path), dtype=numpy.float32)


def read_npy(path, what=""):
    """A numeric .npy array as float32; pickled objects are refused (loading one runs code)."""
    try:
        array = numpy.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        reason = "it holds pickled Python objects" if "pickle" in str(exc) else str(exc).splitlines()[0]
        raise DefinitionError(f"{what}not a numeric .npy array ({reason})", path) from None
    if not isinstance(array, numpy.ndarray) or array.dtype.kind not in "biuf":
        raise DefinitionError(f"{what}not a numeric .npy array (dtype {getattr(array, 'dtype', '?')})", path)
    return array.astype(numpy.float32)


def mean_blobproto(mean):
    """Caffe's compute_image_mean output: a BlobProto with legacy num/channels/height/width."""
    c, h, w = mean.shape[-3:]
    blob = caffe_pb2.BlobProto(num=1, channels=c, height=h, width=w)
    blob.data.extend(numpy.asarray(mean, dtype=numpy.float32).ravel().tolist())
    return blob


# ---------------------------------------------------------------------------
# images, read as OpenCV reads them (HWC uint8, BGR)
# ---------------------------------------------------------------------------
