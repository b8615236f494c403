"""Reading and writing Caffe's files: prototxt (text), binary protos, blobs.

Every reader turns a user mistake into one ``DefinitionError`` line naming the
file (and line:column for text); every writer goes through ``atomic_write`` so
an interrupted save never leaves a half-written file behind.
"""

import contextlib
import difflib
import hashlib
import os
import re
import tempfile

import numpy
from google.protobuf import message as _pb_message
from google.protobuf import text_format

from brewnet.netdef import caffe_pb2
from brewnet.netdef.errors import DefinitionError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


# -- atomic writes -----------------------------------------------------------

def _new_file_mode(path):
    """Permissions for a fresh file: the old file's, or 0666 less the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Yield a file on a temporary name beside ``path``; rename over it on success.

    If the body raises, the temporary file is removed and ``path`` is untouched.
    ``mode`` is any writable open() mode ("wb", "w", "w+b", ...).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(message, path):
    """Write any protobuf message as prototxt, atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(text_format.MessageToString(message))


def write_binary(message, path):
    """Write any protobuf message in the binary wire format, atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(message.SerializeToString())


# -- reading files -----------------------------------------------------------

def read_bytes(path):
    """The file's bytes; a missing or unreadable file is a DefinitionError."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise DefinitionError("no such file", path) from None
    except IsADirectoryError:
        raise DefinitionError("is a directory, not a file", path) from None
    except OSError as exc:
        raise DefinitionError(f"cannot read: {exc.strerror}", path) from None


def decode_text(data):
    """Text from a prototxt's bytes: UTF-8, else latin-1 (odd bytes in comments)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def read_text_file(path):
    """The text of a prototxt file (DefinitionError when it cannot be read)."""
    return decode_text(read_bytes(path))


def sha1_of_file(path, chunk=1 << 20):
    """The file's sha1, hex (how the zoo verifies weights and a sidecar names its state)."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def is_hdf5(path):
    """True when the file starts with the HDF5 signature (as Caffe's H5Fis_hdf5)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


# -- text format errors --------------------------------------------------------

_LOCATION = re.compile(r"^\d+(?::\d+)? : ")
_NO_FIELD = re.compile(r'^Message type "([\w.]+)" has no field named "(\w+)"\.?$')
_NO_ENUM_VALUE = re.compile(r'^Enum type "([\w.]+)" has no value named (\w+)\.?$')


def _close_match(word, candidates, cutoff=0.6):
    """The closest candidate (difflib, or the same word in another case), else None."""
    candidates = list(candidates)
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=cutoff)
    close += [c for c in candidates if c.lower() == word.lower()]
    return close[0] if close else None


def _short_type_name(full_name):
    return full_name[len("caffe."):] if full_name.startswith("caffe.") else full_name


def _unknown_field_message(type_name, field):
    """`unknown field "x" in Message (did you mean "y"?)`."""
    descriptor = _find_descriptor(type_name)
    names = [f.name for f in descriptor.fields] if descriptor is not None else []
    param_block = type_name == "caffe.LayerParameter" and field.endswith("_param")
    # "*_param" names all share that suffix: only a near-identical one is a likely typo
    guess = _close_match(field, names, cutoff=0.85 if param_block else 0.6)
    hint = f' (did you mean "{guess}"?)' if guess else ""
    if not guess and param_block:
        # e.g. permute_param: the parameters of a layer type from a Caffe fork
        hint = (f"; BVLC Caffe has no layer type with a {field} block (it belongs to a layer of a "
                "Caffe fork, which brewnet does not implement)")
    return f'unknown field "{field}" in {_short_type_name(type_name)}{hint}'


def _unknown_enum_message(type_name, value):
    """`unknown value X for Enum (did you mean Y?)`."""
    descriptor = _find_enum_descriptor(type_name)
    names = [v.name for v in descriptor.values] if descriptor is not None else []
    guess = _close_match(value, names)
    hint = f" (did you mean {guess}?)" if guess else ""
    return f"unknown value {value} for {_short_type_name(type_name)}{hint}"


def _find_descriptor(full_name):
    try:
        return caffe_pb2.DESCRIPTOR.pool.FindMessageTypeByName(full_name)
    except KeyError:
        return None


def _find_enum_descriptor(full_name):
    try:
        return caffe_pb2.DESCRIPTOR.pool.FindEnumTypeByName(full_name)
    except KeyError:
        return None


def _strip_quoted_line(reason, line, text):
    """Drop the "'<source line>': " prefix protobuf puts before some messages."""
    source_lines = text.splitlines(keepends=True)
    if not reason.startswith("'") or not 0 < (line or 0) <= len(source_lines):
        return reason
    raw = source_lines[line - 1]
    for quoted in (raw, raw.rstrip("\n"), raw.rstrip("\r\n")):
        prefix = "'" + quoted + "': "
        if reason.startswith(prefix):
            return reason[len(prefix):]
    return reason


def printable(text):
    """``text`` with control characters escaped, so a message never echoes raw terminal bytes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


_BAD_VALUE = re.compile(r"^(Couldn't parse|Expected (string|integer|double|bool|identifier)|Value out of range|"
                        r"Invalid value|Integer out of range)")
_FIELD_BEFORE = re.compile(r"([A-Za-z_]\w*)\s*:\s*$")


def _field_at(text, line, column):
    """The field whose value starts at (line, column): the name before its colon."""
    lines = text.splitlines()
    if not line or not 0 < line <= len(lines):
        return None
    match = _FIELD_BEFORE.search(lines[line - 1][:max((column or 1) - 1, 0)])
    return match.group(1) if match else None


def _reason_from_parse_error(exc, text):
    """protobuf's ParseError text, without location or quoted line, unknown names explained,
    a bad value prefixed with its field ("num_output: Couldn't parse integer: ten")."""
    reason = _strip_quoted_line(_LOCATION.sub("", str(exc), count=1), exc.GetLine(), text)
    match = _NO_FIELD.match(reason)
    if match:
        return _unknown_field_message(*match.groups())
    match = _NO_ENUM_VALUE.match(reason)
    if match:
        return _unknown_enum_message(*match.groups())
    field = _field_at(text, exc.GetLine(), exc.GetColumn()) if _BAD_VALUE.match(reason) else None
    return printable(f"{field}: {reason}" if field else reason)


def parse_text(text, message, path="<string>"):
    """Parse prototxt ``text`` into ``message``; errors read `PATH:LINE:COL: what`."""
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        reason = _reason_from_parse_error(exc, text)
        raise DefinitionError(reason, path, exc.GetLine(), exc.GetColumn()) from None
    return message


def read_text(path, message):
    """Parse the prototxt file at ``path`` into ``message`` (no upgrade)."""
    return parse_text(read_text_file(path), message, path)


def looks_like_text(data):
    """True when the first bytes are printable ASCII (a prototxt, not a binary proto)."""
    head = data[:256]
    return bool(head) and all(32 <= b < 127 or b in b"\t\r\n" for b in head)


def parse_binary(data, message, path="<bytes>", kind=None):
    """Parse wire-format ``data`` into ``message``; a bad file is a DefinitionError.

    ``kind`` names the expected file (".caffemodel") in the message.
    """
    noun = message.DESCRIPTOR.name
    kind = kind or f"a {noun} file"
    if not data:
        raise DefinitionError(f"the file is empty, not {kind}", path)
    try:
        message.ParseFromString(data)
    except _pb_message.DecodeError:
        why = f"it looks like a text prototxt, not {kind}" if looks_like_text(data) else f"truncated or not {kind}"
        raise DefinitionError(f"not a valid {noun} ({why})", path) from None
    return message


def read_binary(path, message, kind=None):
    """Parse the binary proto file at ``path`` into ``message`` (no upgrade)."""
    return parse_binary(read_bytes(path), message, path, kind)


# -- nets and solvers ------------------------------------------------------------

def parse_net(text, path="<string>"):
    """A NetParameter from prototxt text, upgraded to the current format."""
    from brewnet.netdef.upgrade import upgrade_net

    net = parse_text(text, caffe_pb2.NetParameter(), path)
    upgrade_net(net, path)
    return net


def read_net(path):
    """A NetParameter from a prototxt file, upgraded to the current format."""
    return parse_net(read_text_file(path), path)


def parse_solver(text, path="<string>"):
    """A SolverParameter from prototxt text, upgraded (solver_type -> type)."""
    from brewnet.netdef.upgrade import upgrade_solver

    solver = parse_text(text, caffe_pb2.SolverParameter(), path)
    upgrade_solver(solver, path)
    return solver


def read_solver(path):
    """A SolverParameter from a prototxt file, upgraded (solver_type -> type)."""
    return parse_solver(read_text_file(path), path)


def _progress(error):
    return (error.line or 0, error.column or 0)


def read_net_or_solver(path):
    """("net", NetParameter) or ("solver", SolverParameter) from a prototxt file, upgraded.

    A net is tried first; when both fail, the error that got further into the file
    is raised (it is most likely about the kind of file meant).
    """
    text = read_text_file(path)
    try:
        return "net", parse_net(text, path)
    except DefinitionError as net_error:
        try:
            return "solver", parse_solver(text, path)
        except DefinitionError as solver_error:
            raise max(net_error, solver_error, key=_progress) from None


def read_binary_net(path):
    """A binary NetParameter (.caffemodel), upgraded; V1 and V2 files alike."""
    from brewnet.netdef.upgrade import upgrade_net

    net = read_binary(path, caffe_pb2.NetParameter(), "a .caffemodel")
    upgrade_net(net, path)
    return net


def read_weights(path):
    """Trained weights: binary .caffemodel (upgraded) or HDF5 .caffemodel.h5."""
    if is_hdf5(path):
        from brewnet.netdef.hdf5 import read_weights_hdf5

        return read_weights_hdf5(path)
    return read_binary_net(path)


def write_weights(net_param, path):
    """Write weights: HDF5 (Caffe's Net::ToHDF5 layout) when ``path`` ends in .h5, else binary."""
    if os.fspath(path).endswith(".h5"):
        from brewnet.netdef.hdf5 import write_weights_hdf5

        write_weights_hdf5(net_param, path)
    else:
        write_binary(net_param, path)


# -- blobs -------------------------------------------------------------------------

_LEGACY_DIMS = ("num", "channels", "height", "width")


def blob_shape(blob):
    """A BlobProto's shape: ``shape.dim``, or the legacy 4-D num/channels/height/width."""
    if any(blob.HasField(name) for name in _LEGACY_DIMS):
        return tuple(getattr(blob, name) for name in _LEGACY_DIMS)
    return tuple(blob.shape.dim)


def blob_to_array(blob, dtype=numpy.float32, diff=False):
    """A BlobProto's data (or diff) as an array; double_data is used when present."""
    if diff:
        values = blob.double_diff if len(blob.double_diff) else blob.diff
    else:
        values = blob.double_data if len(blob.double_data) else blob.data
    shape = blob_shape(blob)
    array = numpy.array(values, dtype=dtype)
    count = int(numpy.prod(shape, dtype=numpy.int64))
    if array.size != count:
        what = "diff" if diff else "data"
        raise DefinitionError(f"blob of shape {list(shape)} needs {count} values but holds {array.size} {what}")
    return array.reshape(shape)


def _varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _packed_field(number, array):
    """Wire bytes of one packed repeated float/double field (much faster than extend())."""
    payload = numpy.ascontiguousarray(array).tobytes()
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


_DATA, _DIFF, _DOUBLE_DATA, _DOUBLE_DIFF = 5, 6, 8, 9


def array_to_blob(array, diff=None, double=False):
    """A BlobProto holding ``array`` (and ``diff``), with ``shape`` set.

    Values are stored as float32 ``data``/``diff`` (what Caffe<float> reads),
    or as ``double_data``/``double_diff`` when ``double`` is true.
    """
    array = numpy.asarray(array)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(int(d) for d in array.shape)
    kind = "<f8" if double else "<f4"
    fields = (_DOUBLE_DATA, _DOUBLE_DIFF) if double else (_DATA, _DIFF)
    wire = _packed_field(fields[0], array.astype(kind, copy=False))
    if diff is not None:
        diff = numpy.asarray(diff)
        if diff.shape != array.shape:
            raise ValueError(f"diff shape {diff.shape} differs from data shape {array.shape}")
        wire += _packed_field(fields[1], diff.astype(kind, copy=False))
    blob.MergeFromString(wire)
    return blob


def read_blobproto(path):
    """A mean file (binary BlobProto, .binaryproto) as a float32 array."""
    blob = read_binary(path, caffe_pb2.BlobProto(), "a .binaryproto")
    try:
        return blob_to_array(blob)
    except DefinitionError as exc:
        raise DefinitionError(exc.reason, path) from None


def write_blobproto(array, path):
    """Write ``array`` as a binary BlobProto (a .binaryproto mean file), atomically."""
    write_binary(array_to_blob(array), path)


# -- solver state ------------------------------------------------------------------

def read_solverstate(path):
    """A SolverState from a binary .solverstate or Caffe's HDF5 .solverstate.h5."""
    if is_hdf5(path):
        from brewnet.netdef.hdf5 import read_solverstate_hdf5

        return read_solverstate_hdf5(path)
    return read_binary(path, caffe_pb2.SolverState(), "a .solverstate")


def write_solverstate(state, path):
    """Write a SolverState: Caffe's HDF5 layout when ``path`` ends in .h5, else binary."""
    if os.fspath(path).endswith(".h5"):
        from brewnet.netdef.hdf5 import write_solverstate_hdf5

        write_solverstate_hdf5(state, path)
    else:
        write_binary(state, path)
