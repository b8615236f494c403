"""What a net is, without running it: per layer its output shapes, parameter count,
forward FLOPs and activation memory, and the data its data layers would read.

``summarize(net_param, state)`` builds the net (brewnet's own Net, so the shapes are
exactly those training would see) with three changes that keep it cheap and free of
side effects:

- every data layer (Data, ImageData, HDF5Data, WindowData) becomes an Input layer of
  the shape its source gives: one record, list line or dataset header is read, no
  reader or prefetch thread is started. A source that is missing (or unreadable) is
  reported, and the layers that depend on it are listed without shapes;
- Python layers (user code is not run) and HDF5Output (it would create its file) are
  left out the same way;
- weights are filled with zeros instead of their fillers (filler types are still
  checked).

FLOPs count a multiply-add as two (convolution, deconvolution, fully connected,
recurrent layers), a pooling output as its window, and every other output element as
one; data movement (split, reshape, concat, slice, ...) counts none.
"""

import dataclasses
import os

import numpy

from brewnet.netdef import caffe_pb2, filter_net
from brewnet.netdef.errors import DefinitionError

DATA_TYPES = ("Data", "ImageData", "HDF5Data", "WindowData")
LEFT_OUT = {"Python": "a Python layer: check does not run user code",
            "HDF5Output": "HDF5Output writes its file when built"}
NO_FLOPS = {"Input", "DummyData", "MemoryData", "Split", "Flatten", "Reshape", "Concat", "Slice", "Silence",
            "Crop", "Tile", "Filter", "BatchReindex", "Parameter", "HDF5Output", *DATA_TYPES}


@dataclasses.dataclass
class DataSource:
    """What one data layer reads: its top shapes (None when unknown) and what was found."""

    layer: str
    type: str
    shapes: list = None
    facts: list = dataclasses.field(default_factory=list)  # lines saying what the source holds
    problems: list = dataclasses.field(default_factory=list)  # lines saying what is missing or wrong
    records: int = None  # samples in one pass (None: not counted, or sampled at random)
    batch: int = None


@dataclasses.dataclass
class LayerRow:
    name: str
    type: str
    bottoms: list
    tops: list
    shapes: list = None  # one shape per top; None when unknown
    params: int = 0
    shared_params: bool = False
    flops: int = 0
    activation_bytes: int = 0
    note: str = ""


@dataclasses.dataclass
class Summary:
    rows: list
    sources: list
    unknown_reasons: list  # why some shapes are unknown
    batch: int
    itemsize: int

    @property
    def params(self):
        return sum(r.params for r in self.rows)

    @property
    def flops(self):
        return sum(r.flops for r in self.rows)

    @property
    def activation_bytes(self):
        return sum(r.activation_bytes for r in self.rows)

    @property
    def complete(self):
        return all(r.shapes is not None for r in self.rows)

    def training_bytes(self, history=1):
        """Weights, their gradients and ``history`` solver blobs per weight, plus activations and
        their gradients (an estimate: workspaces and the framework itself are not counted)."""
        return self.params * self.itemsize * (2 + history) + 2 * self.activation_bytes

    def inference_bytes(self):
        return self.params * self.itemsize + self.activation_bytes


# -- data layers -------------------------------------------------------------------------------

def _where(lp):
    return f"layer '{lp.name}' ({lp.type})"


def _missing(path):
    full = os.path.abspath(path)
    return f"{path} does not exist" + (f" (relative to {os.getcwd()})" if full != path else "")


def _crop_shape(lp, channels, height, width, source):
    crop = int(lp.transform_param.crop_size)
    if crop and (crop > height or crop > width):
        source.problems.append(f"crop_size {crop} is larger than the {height}x{width} data")
        return None
    return (channels, crop or height, crop or width)


def _check_mean(lp, chw, source):
    """Caffe's checks of a data layer's mean: the file exists and matches the data's size."""
    t = lp.transform_param
    if t.HasField("mean_file"):
        from brewnet.layers.dataio.db import read_mean_file

        if not os.path.isfile(t.mean_file):
            source.problems.append(f"mean file {_missing(t.mean_file)}")
            return
        try:
            mean = read_mean_file(t.mean_file, _where(lp))
        except DefinitionError as exc:
            source.problems.append(f"mean file {t.mean_file}: {exc.reason}")
            return
        shape = tuple(mean.shape[-3:]) if mean.ndim >= 3 else tuple(mean.shape)
        source.facts.append(f"mean file {t.mean_file}: {'x'.join(map(str, shape))}")
        if chw is not None and shape != tuple(chw):
            source.problems.append(f"mean file {t.mean_file} is {'x'.join(map(str, shape))}, the data "
                                   f"{'x'.join(map(str, chw))}")
    if len(t.mean_value) and chw is not None and len(t.mean_value) not in (1, chw[0]):
        source.problems.append(f"{len(t.mean_value)} mean_value given for {chw[0]} channels (give 1 or {chw[0]})")


def _db_source(lp, source):
    from brewnet.layers.dataio import db

    p = lp.data_param
    source.batch = int(p.batch_size)
    backend = "lmdb" if p.backend == caffe_pb2.DataParameter.LMDB else "leveldb"
    if not p.source:
        source.problems.append("data_param.source is not set")
        return None
    if not os.path.exists(p.source):
        source.problems.append(f"source {_missing(p.source)}")
        return None
    try:
        reader = db.DBReader(p.source, backend, what=_where(lp))
        try:
            datum = db.parse_datum(reader.value(), f"{p.source}: first record")
            color = True if lp.transform_param.force_color else False if lp.transform_param.force_gray else None
            chw = tuple(db.datum_to_array(datum, color).shape) if datum.encoded else db.datum_shape(datum)
            source.records = len(reader)
        finally:
            reader.close()
    except DefinitionError as exc:
        source.problems.append(str(exc))
        return None
    kind = "encoded images" if datum.encoded else "records"
    source.facts.append(f"{p.source} ({backend.upper()}): {source.records} {kind} of {'x'.join(map(str, chw))}")
    _check_mean(lp, chw, source)
    return _crop_shape(lp, *chw, source)


def _image_list_source(lp, source):
    from brewnet.layers.dataio.db import read_list_file
    from brewnet.layers.dataio.images import open_image

    p = lp.image_data_param
    source.batch = int(p.batch_size)
    if not p.source or not os.path.isfile(p.source):
        source.problems.append(f"image list {_missing(p.source) if p.source else '(source not set)'}")
        return None
    try:
        lines = read_list_file(p.source, _where(lp))
    except DefinitionError as exc:
        source.problems.append(str(exc))
        return None
    source.records = len(lines)
    first = p.root_folder + lines[0][0]
    channels = 3 if p.is_color else 1
    if p.new_height > 0 and p.new_width > 0:
        height, width = int(p.new_height), int(p.new_width)
    else:
        if not os.path.isfile(first):
            source.problems.append(f"first image {_missing(first)}")
            return None
        try:
            with open_image(first) as img:
                width, height = img.size
        except Exception as exc:  # Pillow's errors for files that are no image
            source.problems.append(f"first image {first}: cannot read it ({type(exc).__name__})")
            return None
    source.facts.append(f"{p.source}: {len(lines)} images, the first {first} ({channels}x{height}x{width} "
                        f"as read{', resized' if p.new_height > 0 else ''})")
    _check_mean(lp, (channels, height, width), source)
    return _crop_shape(lp, channels, height, width, source)


def _hdf5_source(lp, source):
    import h5py

    from brewnet.layers.dataio.db import read_hdf5_list

    p = lp.hdf5_data_param
    source.batch = int(p.batch_size)
    if not p.source or not os.path.isfile(p.source):
        source.problems.append(f"HDF5 file list {_missing(p.source) if p.source else '(source not set)'}")
        return None
    try:
        files = read_hdf5_list(p.source)
    except DefinitionError as exc:  # an empty list: the source exists (checked above)
        source.problems.append(exc.reason)
        return None
    shapes, rows = None, 0
    for path in files:
        if not os.path.isfile(path):
            source.problems.append(f"HDF5 file {path} (listed in {p.source}) does not exist")
            return None
        try:
            with h5py.File(path, "r") as f:
                missing = [t for t in lp.top if t not in f]
                if missing:
                    source.problems.append(f"HDF5 file {path} has no dataset {missing[0]!r}")
                    return None
                here = [tuple(f[t].shape) for t in lp.top]
        except OSError as exc:
            source.problems.append(f"HDF5 file {path}: {exc}")
            return None
        shapes = shapes or here
        rows += here[0][0] if here and here[0] else 0
    source.records = rows
    source.facts.append(f"{p.source}: {len(files)} file(s), {rows} rows; "
                        + ", ".join(f"{t} {'x'.join(map(str, s[1:])) or 'scalar'}" for t, s in zip(lp.top, shapes)))
    return [(source.batch,) + tuple(s[1:]) for s in shapes]


def _window_source(lp, source):
    p = lp.window_data_param
    source.batch = int(p.batch_size)
    if not p.source or not os.path.isfile(p.source):
        source.problems.append(f"window file {_missing(p.source) if p.source else '(source not set)'}")
        return None
    with open(p.source) as f:
        tokens = f.read().split()
    crop = int(lp.transform_param.crop_size)
    if len(tokens) < 4 or crop <= 0:
        source.problems.append("window file is empty" if len(tokens) < 4 else "transform_param.crop_size must be set")
        return None
    channels = int(tokens[3])
    source.facts.append(f"{p.source}: windows sampled at random, warped to {channels}x{crop}x{crop}")
    return (channels, crop, crop)


def data_source(lp):
    """A DataSource for a data layer's LayerParameter (nothing started, at most one record read)."""
    source = DataSource(lp.name, lp.type)
    reader = {"Data": _db_source, "ImageData": _image_list_source, "HDF5Data": _hdf5_source,
              "WindowData": _window_source}[lp.type]
    shape = reader(lp, source)
    if shape is None:
        if lp.type in ("Data", "ImageData") and not any("mean" in p for p in source.problems):
            _check_mean(lp, None, source)  # a missing source does not hide a missing mean file
        return source
    if lp.type == "HDF5Data":
        source.shapes = shape
    else:
        source.shapes = [(source.batch,) + tuple(shape), (source.batch,)][:len(lp.top)]
    return source


# -- building the stand-in net ---------------------------------------------------------------

def _filler_fields(message):
    """Every FillerParameter set in a message (recursively)."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        values = value if field.is_repeated else [value]
        for item in values:
            if field.message_type.name == "FillerParameter":
                yield field.name, item
            else:
                yield from _filler_fields(item)


def _zero_fillers(lp):
    """Check the layer's filler types and make them all constant zero (cheap to fill)."""
    from brewnet.layers.fillers import FILLERS

    for name, filler in list(_filler_fields(lp)):
        if filler.type not in FILLERS:
            raise DefinitionError(f"{_where(lp)}: {name}: unknown filler type {filler.type!r}; known: "
                                  f"{', '.join(sorted(FILLERS))}")
        filler.Clear()
        filler.type = "constant"


def _stand_in_net(filtered):
    """(net parameter to build, {layer name: DataSource}, {layer name: why left out})."""
    built = caffe_pb2.NetParameter()
    built.CopyFrom(filtered)
    built.ClearField("layer")
    sources, left_out = {}, {}
    unknown = set()
    for lp in filtered.layer:
        if any(b in unknown for b in lp.bottom):
            left_out[lp.name] = "its input shapes are unknown"
            unknown.update(lp.top)
            continue
        if lp.type in LEFT_OUT:
            left_out[lp.name] = LEFT_OUT[lp.type]
            unknown.update(lp.top)
            continue
        if lp.type in DATA_TYPES:
            source = sources[lp.name] = data_source(lp)
            if source.shapes is None:
                left_out[lp.name] = "its source cannot be read"
                unknown.update(lp.top)
                continue
            stand_in = built.layer.add(name=lp.name, type="Input", top=list(lp.top))
            for shape in source.shapes:
                stand_in.input_param.shape.add(dim=list(shape))
            continue
        copy = built.layer.add()
        copy.CopyFrom(lp)
        _zero_fillers(copy)
    return built, sources, left_out


# -- per-layer figures ---------------------------------------------------------------------------

def _count(shape):
    return int(numpy.prod(shape, dtype=numpy.int64)) if shape is not None else 0


def forward_flops(lp, layer, bottoms, tops):
    """Approximate floating-point operations of one forward pass of a built layer."""
    kind = lp.type
    if kind in NO_FLOPS:
        return 0
    out = sum(t.count for t in tops)
    weights = [b for b in getattr(layer, "blobs", [])]
    if kind in ("Convolution", "DepthwiseConvolution", "ConvolutionDepthwise") and weights:  # the forks too
        return tops[0].count * 2 * _count(weights[0].shape[1:]) + (tops[0].count if len(weights) > 1 else 0)
    if kind == "Deconvolution" and weights:
        return bottoms[0].count * 2 * _count(weights[0].shape[1:]) + (tops[0].count if len(weights) > 1 else 0)
    if kind == "InnerProduct" and weights:
        rows = tops[0].count // max(int(lp.inner_product_param.num_output), 1)
        return 2 * rows * weights[0].count + (tops[0].count if len(weights) > 1 else 0)
    if kind in ("RNN", "LSTM") and weights:
        steps = bottoms[0].shape[0] * bottoms[0].shape[1] if len(bottoms[0].shape) > 1 else bottoms[0].shape[0]
        return 2 * steps * sum(w.count for w in weights)
    if kind == "Pooling":
        kernel = getattr(layer, "kernel", None) or (1, 1)
        return out * _count(kernel)
    if kind == "LRN":
        return bottoms[0].count * (int(lp.lrn_param.local_size) + 3)
    if kind == "Eltwise":
        return out * max(len(bottoms) - 1, 1)
    if kind in ("Softmax", "SoftmaxWithLoss"):
        return bottoms[0].count * 4
    # elementwise layers: one per output; losses, accuracy and reductions: one per input
    return max(out, bottoms[0].count if bottoms else 0)


def _activation_bytes(bottoms, tops):
    """Bytes of the new arrays a layer's tops hold (in-place tops and views of a bottom hold none)."""
    total = 0
    for top in tops:
        if any(top is b or numpy.may_share_memory(top.data, b.data) for b in bottoms):
            continue
        total += top.data.nbytes
    return total


def summarize(net_param, state=None, dtype=numpy.float32):
    """A Summary of ``net_param`` in ``state`` (default: its own state). Raises DefinitionError for
    a net that cannot be built; unreadable data sources are reported, not raised."""
    from brewnet.layers.net import Net

    state = state if state is not None else net_param.state
    filtered = filter_net(net_param, state)
    built, sources, left_out = _stand_in_net(filtered)
    net = Net(built, phase=state.phase, level=state.level, stages=list(state.stage), xp=numpy, dtype=dtype,
              rng=0)
    by_name = {name: i for i, name in enumerate(net.layer_names)}
    seen_params = set()
    rows = []
    for lp in filtered.layer:
        row = LayerRow(lp.name, lp.type, list(lp.bottom), list(lp.top))
        rows.append(row)
        if lp.name in left_out:
            row.note = left_out[lp.name]
            continue
        i = by_name[lp.name]
        layer, bottoms, tops = net.layers[i], net.bottom_vecs[i], net.top_vecs[i]
        row.shapes = [tuple(t.shape) for t in tops]
        for blob in layer.blobs:
            owner = getattr(blob, "owner", blob)
            if id(owner) in seen_params:
                row.shared_params = True
                continue
            seen_params.add(id(owner))
            row.params += blob.count
        row.flops = forward_flops(lp, layer, bottoms, tops)
        row.activation_bytes = _activation_bytes(bottoms, tops)
    batch = next((r.shapes[0][0] for r in rows if r.shapes and r.shapes[0]), 1)
    reasons = [f"layer '{name}': {why}" for name, why in left_out.items()
               if why != "its input shapes are unknown"]
    return Summary(rows, list(sources.values()), reasons, int(batch), numpy.dtype(dtype).itemsize)
