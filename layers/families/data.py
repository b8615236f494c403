"""Caffe's data layers: Data (LMDB/LevelDB Datums), ImageData (image list),
HDF5Data, HDF5Output, MemoryData and WindowData.

Data, ImageData and WindowData build whole batches in a background thread
(``prefetch`` batches ahead, like Caffe's BasePrefetchingDataLayer): decode all
records of a batch into one array, transform it at once (layers/dataio/transformer.py),
queue it. forward only copies a ready batch into the tops. The loader thread
holds no reference to the layer, so a dropped layer stops its thread.

Exact resume: each queued batch carries the reader state (position, random
generators) reached after it, so ``resume_state`` describes the next batch
forward will DELIVER, not the loader's read-ahead; ``restore_resume_state``
stops the loader, repositions it and starts it again.
"""

import os
import warnings
import weakref

import numpy

from brewnet.layers.base import Layer, LayerError, layer_error, set_rng_state
from brewnet.layers.dataio.db import DBReader, datums_to_batch, read_hdf5_list, read_list_file, read_mean_file
from brewnet.layers.dataio.images import read_image, resize_linear
from brewnet.layers.dataio import shard
from brewnet.layers.dataio.prefetch import Prefetcher
from brewnet.layers.dataio.transformer import DataTransformer
from brewnet.layers.registry import register
from brewnet.netdef import caffe_pb2


def _child_rng(rng):
    # the loader thread draws from its own generator, seeded from the layer's:
    # reproducible whatever the thread timing (Caffe seeds its prefetch RNG the same way)
    return numpy.random.default_rng(int(rng.integers(0, 2**63)))


def _copy_to_top(blob, array):
    blob.reshape(array.shape)
    blob.data[...] = blob.xp.asarray(array)


def _rng_state(rng):
    return rng.bit_generator.state


def _next_indices(state, count, size, shuffle, rng):
    """The next ``count`` indices of a list of ``size`` in state["order"] from state["pos"]
    (advanced): at the list's end the position wraps and, with ``shuffle``, the order is drawn
    again from ``rng``, whose state before the draw goes to state["order_rng"] (for resume)."""
    picks = []
    for _ in range(count):
        picks.append(int(state["order"][state["pos"]]))
        state["pos"] += 1
        if state["pos"] >= size:  # epoch done: start over, reshuffled
            state["pos"] = 0
            if shuffle:
                state["order_rng"] = _rng_state(rng)
                state["order"] = rng.permutation(size)
    return picks


def _seek(reader, current, target):
    """Move a cycling DBReader from record index ``current`` to ``target``."""
    size = len(reader)
    target %= size
    if target < current:  # back to the first record rather than round the cycle
        if reader.backend == "lmdb":
            reader.cursor.first()
        else:
            reader._iter = None  # value() restarts the iteration
        current = 0
    for _ in range(target - current):
        reader.next()
    return target


class _PrefetchingDataLayer(Layer):
    """Shared part of the prefetching layers: subclasses call ``_start`` with
    ``load`` (a callable returning (data, labels) numpy arrays), ``capture``
    (-> the loader's JSON-able state now) and ``apply`` (state -> reposition
    the loader), and set ``self._shapes``. None of them may refer to the layer."""

    exact_bottoms = 0
    min_tops = 1
    max_tops = 2
    has_backward = False  # no bottoms: nothing to differentiate

    def allow_force_backward(self, bottom_index):
        return False

    def _shard(self):
        """(rank, size): this process reads records rank, rank+size, ... of each global batch (TRAIN only)."""
        return shard.current() if self.train else (0, 1)

    def _transformer(self):
        return DataTransformer(self.param.transform_param, self.phase, _child_rng(self.rng), self.dtype, self.where)

    def _start(self, load, depth, capture, apply):
        def load_with_state():
            data, labels = load()
            return data, labels, capture()

        self._load_with_state, self._depth, self._apply = load_with_state, depth, apply
        self._delivered = capture()  # the state the next delivered batch starts from
        self._run_prefetcher()

    def _run_prefetcher(self):
        self._prefetcher = Prefetcher(self._load_with_state, self._depth)
        weakref.finalize(self, self._prefetcher.close)

    def resume_state(self):
        return self._delivered

    def restore_resume_state(self, state):
        self._prefetcher.join()  # no read-ahead may run while the loader is moved
        try:
            self._apply(state)
        except LayerError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise self.error(f"cannot restore the saved data position ({exc})") from None
        self._delivered = state
        self._run_prefetcher()

    def reshape(self, bottom, top):
        data_shape, label_shape = self._shapes
        top[0].reshape(data_shape)
        if len(top) > 1:
            top[1].reshape(label_shape)

    def forward(self, bottom, top):
        data, labels, self._delivered = self._prefetcher.get()
        _copy_to_top(top[0], data)
        if len(top) > 1:
            _copy_to_top(top[1], labels)

    def close(self):
        """Stop the prefetch thread (it also stops when the layer is dropped)."""
        if getattr(self, "_prefetcher", None) is not None:
            self._prefetcher.close()


# ---------------------------------------------------------------------------
@register("Data", v1="DATA")
class Data(_PrefetchingDataLayer):
    def setup(self, bottom, top):
        p = self.param.data_param
        if not p.source:
            raise self.error("data_param.source is not set")
        if p.batch_size <= 0:
            raise self.error("data_param.batch_size must be positive")
        backend = "lmdb" if p.backend == caffe_pb2.DataParameter.LMDB else "leveldb"
        reader = DBReader(p.source, backend, what=self.where)
        self.epoch_size = len(reader)  # records in one pass over the source
        position = [0]  # index of the reader's current record
        if p.rand_skip:
            skip = int(self.rng.integers(0, p.rand_skip))
            position[0] = _seek(reader, 0, skip)
        transform = self._transformer()
        name, type_name = self.name, self.type  # the loader holds no reference to the layer
        first = _datum_batch([reader.value()], transform, name, type_name, p.source)
        c, h, w = transform.output_shape(*first.shape[1:])
        batch_size = int(p.batch_size)
        self._shapes = ((batch_size, c, h, w), (batch_size,))
        dtype = self.dtype
        rank, ranks = self._shard()

        def load():
            records = reader.take(batch_size * ranks)[rank::ranks]
            position[0] = (position[0] + batch_size * ranks) % len(reader)
            data, labels = _datum_batch(records, transform, name, type_name, p.source, labels=True)
            return transform(data), labels.astype(dtype)

        def capture():
            return {"position": position[0], "records": len(reader), "transform_rng": _rng_state(transform.rng)}

        def apply(state):
            if state["records"] != len(reader):
                raise ValueError(f"saved for a source of {state['records']} records, {p.source} has {len(reader)}")
            position[0] = _seek(reader, position[0], state["position"])
            set_rng_state(transform.rng, state["transform_rng"], name, type_name)

        self._start(load, p.prefetch, capture, apply)


def _datum_batch(records, transform, name, type_name, source, labels=False):
    """Parse serialized Datums and stack them into one (N, C, H, W) array."""
    try:
        datums = [caffe_pb2.Datum.FromString(v) for v in records]
        data = datums_to_batch(datums, transform.color)
    except Exception as exc:  # protobuf DecodeError, bad sizes, undecodable images
        raise layer_error(name, type_name, f"bad record in {source}: {exc}") from None
    if labels:
        return data, numpy.array([d.label for d in datums])
    return data


# ---------------------------------------------------------------------------
@register("ImageData", v1="IMAGE_DATA")
class ImageData(_PrefetchingDataLayer):
    exact_tops = 2
    min_tops = None
    max_tops = None

    def setup(self, bottom, top):
        p = self.param.image_data_param
        if (p.new_height > 0) != (p.new_width > 0):
            raise self.error("new_height and new_width must be set together")
        if p.batch_size <= 0:
            raise self.error("image_data_param.batch_size must be positive")
        if not p.source or not os.path.isfile(p.source):
            raise self.error(f"image list {p.source or '(source not set)'} does not exist")
        lines = read_list_file(p.source, self.where)
        self.epoch_size = len(lines)  # images in one pass over the list
        rng = _child_rng(self.rng)
        # rng only draws the permutations: its state before the current one regenerates it
        order_rng = _rng_state(rng)
        order = rng.permutation(len(lines)) if p.shuffle else numpy.arange(len(lines))
        position = 0
        if p.rand_skip:
            position = int(self.rng.integers(0, p.rand_skip))
            if position >= len(lines):
                raise self.error(f"rand_skip {p.rand_skip}: not enough images ({len(lines)}) to skip {position}")
        root, size, color = p.root_folder, (int(p.new_height), int(p.new_width)), bool(p.is_color)
        name, type_name = self.name, self.type  # the loader holds no reference to the layer

        def read(i):
            path = root + lines[i][0]
            img = read_image(path, size[0], size[1], color)
            if img is None:
                raise layer_error(name, type_name, f"could not load image {path}")
            return img

        transform = self._transformer()
        first = read(order[position])
        c, h, w = transform.output_shape(first.shape[2], first.shape[0], first.shape[1])
        batch_size = int(p.batch_size)
        self._shapes = ((batch_size, c, h, w), (batch_size,))
        state = {"order": order, "pos": position, "order_rng": order_rng}
        dtype = self.dtype
        rank, ranks = self._shard()

        def load():
            picks = _next_indices(state, batch_size * ranks, len(lines), p.shuffle, rng)[rank::ranks]
            images = [read(i) for i in picks]
            for i, img in zip(picks, images):
                if img.shape != images[0].shape:
                    raise layer_error(name, type_name, f"image {root + lines[i][0]} is "
                                      f"{img.shape[1]}x{img.shape[0]}, the batch's first is "
                                      f"{images[0].shape[1]}x{images[0].shape[0]} (set new_height/new_width)")
            batch = numpy.stack(images).transpose(0, 3, 1, 2)
            labels = numpy.array([lines[i][1] for i in picks], dtype=dtype)
            return transform(batch), labels

        def capture():
            return {"position": state["pos"], "images": len(lines),
                    "order_rng": state["order_rng"] if p.shuffle else None,
                    "transform_rng": _rng_state(transform.rng)}

        def apply(saved):
            if saved["images"] != len(lines) or not 0 <= saved["position"] < len(lines):
                raise ValueError(f"saved for a list of {saved['images']} images, {p.source} has {len(lines)}")
            if p.shuffle:
                set_rng_state(rng, saved["order_rng"], name, type_name)
                state["order_rng"] = saved["order_rng"]
                state["order"] = rng.permutation(len(lines))
            state["pos"] = int(saved["position"])
            set_rng_state(transform.rng, saved["transform_rng"], name, type_name)

        self._start(load, self.param.data_param.prefetch, capture, apply)


# ---------------------------------------------------------------------------
@register("WindowData", v1="WINDOW_DATA")
class WindowData(_PrefetchingDataLayer):
    """R-CNN style windows: fg/bg windows sampled at random, cropped with context
    padding, warped to crop_size and mean-subtracted (window_data_layer.cpp)."""

    exact_tops = 2
    min_tops = None
    max_tops = None

    def setup(self, bottom, top):
        p, t = self.param.window_data_param, self.param.transform_param
        images, fg, bg = self._read_window_file(p)
        crop = int(t.crop_size)
        if crop <= 0:
            raise self.error("transform_param.crop_size must be positive")
        if not fg or not bg:
            raise self.error(f"window file {p.source} needs foreground and background windows "
                               f"(has {len(fg)} and {len(bg)})")
        channels = images[-1][1][0]
        batch_size = int(p.batch_size)
        self._shapes = ((batch_size, channels, crop, crop), (batch_size,))
        mean = mean_values = None
        if t.HasField("mean_file"):
            mean = read_mean_file(t.mean_file, self.where)
            mean = mean.reshape((-1,) + mean.shape[-2:])
        elif len(t.mean_value):
            mean_values = numpy.asarray(t.mean_value, dtype=numpy.float32)
            if len(mean_values) not in (1, channels):
                raise self.error(f"specify either 1 mean_value or as many as channels: {channels}")
            mean_values = numpy.broadcast_to(mean_values, (channels,))
        rng = _child_rng(self.rng)
        cache = {}
        rank, ranks = self._shard()  # every rank draws the global batch's windows, warps its share
        total = batch_size * ranks
        num_fg = int(numpy.float32(total) * numpy.float32(p.fg_fraction))
        dtype, name, type_name = self.dtype, self.name, self.type  # the loader holds no reference to the layer

        def image(index):
            if index not in cache or not p.cache_images:
                path = images[index][0]
                img = read_image(path, color=True)
                if img is None:
                    raise layer_error(name, type_name, f"could not open or find file {path}")
                cache[index] = img
            return cache[index]

        def load():
            out = numpy.zeros((batch_size, channels, crop, crop), dtype=numpy.float32)
            labels = numpy.zeros(batch_size, dtype=dtype)
            picks = []
            for pool, count in ((bg, total - num_fg), (fg, num_fg)):
                for _ in range(count):
                    window = pool[int(rng.integers(0, 2**32)) % len(pool)]
                    do_mirror = bool(t.mirror) and int(rng.integers(0, 2**32)) % 2 == 1
                    picks.append((window, do_mirror))
            for item, (window, do_mirror) in enumerate(picks[rank::ranks]):
                img = image(window[0])
                warped, pad_h, pad_w = _warp_window(img, window, crop, int(p.context_pad),
                                                    p.crop_mode == "square", do_mirror)
                wh, ww = warped.shape[:2]
                pix = warped.transpose(2, 0, 1).astype(numpy.float32)
                if mean is not None:
                    off = (mean.shape[-1] - crop) // 2
                    pix -= mean[:, off + pad_h:off + pad_h + wh, off + pad_w:off + pad_w + ww]
                elif mean_values is not None:
                    pix -= mean_values[:, None, None]
                out[item, :, pad_h:pad_h + wh, pad_w:pad_w + ww] = pix * numpy.float32(p.scale)
                labels[item] = window[1]
            return out.astype(dtype, copy=False), labels

        def capture():
            return {"rng": _rng_state(rng)}

        def apply(state):
            set_rng_state(rng, state["rng"], name, type_name)

        self._start(load, self.param.data_param.prefetch, capture, apply)

    def _read_window_file(self, p):
        """[(path, (c, h, w))], fg and bg windows as (image_index, label, overlap, x1, y1, x2, y2)."""
        try:
            with open(p.source) as f:
                tokens = f.read().split()
        except OSError:
            raise self.error(f"window file {p.source or '(source not set)'} does not exist") from None
        if not tokens:
            raise self.error(f"window file {p.source} is empty")
        images, fg, bg = [], [], []
        pos = 0
        try:
            while pos < len(tokens):
                if tokens[pos] != "#":
                    raise ValueError(f"expected '#' before image {len(images)}, got {tokens[pos]!r}")
                index = int(tokens[pos + 1])
                path = p.root_folder + tokens[pos + 2]
                size = tuple(int(v) for v in tokens[pos + 3:pos + 6])
                n = int(tokens[pos + 6])
                pos += 7
                images.append((path, size))
                for _ in range(n):
                    label, overlap = int(tokens[pos]), float(tokens[pos + 1])
                    box = [int(v) for v in tokens[pos + 2:pos + 6]]
                    pos += 6
                    if overlap >= p.fg_threshold:
                        if label <= 0:
                            raise ValueError(f"foreground window with label {label}")
                        fg.append((index, label, overlap, *box))
                    elif overlap < p.bg_threshold:
                        bg.append((index, 0, 0.0, *box))
        except (ValueError, IndexError) as exc:
            raise self.error(f"window file {p.source}: {exc}") from None
        return images, fg, bg


def _cround(x):
    """C's round(): halves away from zero."""
    return int(numpy.sign(x) * numpy.floor(abs(x) + 0.5))


def _warp_window(img, window, crop, context_pad, square, mirror):
    """Crop one window (with context padding) and warp it, as WindowData::load_batch."""
    f32 = numpy.float32
    x1, y1, x2, y2 = window[3:7]
    rows, cols = img.shape[:2]
    pad_w = pad_h = 0
    out_w = out_h = crop
    if context_pad > 0 or square:
        context_scale = f32(crop) / f32(crop - 2 * context_pad)
        half_h, half_w = f32((y2 - y1 + 1) / 2.0), f32((x2 - x1 + 1) / 2.0)
        cx, cy = f32(x1) + half_w, f32(y1) + half_h
        if square:
            half_h = half_w = max(half_h, half_w)
        x1, x2 = _cround(cx - half_w * context_scale), _cround(cx + half_w * context_scale)
        y1, y2 = _cround(cy - half_h * context_scale), _cround(cy + half_h * context_scale)
        unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
        px1, py1 = max(0, -x1), max(0, -y1)
        px2, py2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
        x1, x2, y1, y2 = x1 + px1, x2 - px2, y1 + py1, y2 - py2
        scale_x, scale_y = f32(crop) / f32(unclipped_w), f32(crop) / f32(unclipped_h)
        out_w = _cround(f32(x2 - x1 + 1) * scale_x)
        out_h = _cround(f32(y2 - y1 + 1) * scale_y)
        px1, px2 = _cround(f32(px1) * scale_x), _cround(f32(px2) * scale_x)
        py1 = _cround(f32(py1) * scale_y)
        pad_h = py1
        pad_w = px2 if mirror else px1
        out_h = min(out_h, crop - pad_h)
        out_w = min(out_w, crop - pad_w)
    warped = resize_linear(img[y1:y2 + 1, x1:x2 + 1], out_h, out_w)
    if mirror:
        warped = warped[:, ::-1]
    return warped, pad_h, pad_w


# ---------------------------------------------------------------------------
@register("HDF5Data", v1="HDF5_DATA")
class HDF5Data(Layer):
    """Rows of the datasets named by the tops, file after file, in order (or
    shuffled), wrapping exactly as hdf5_data_layer.cpp."""

    exact_bottoms = 0
    min_tops = 1
    has_backward = False  # no bottoms: nothing to differentiate

    def allow_force_backward(self, bottom_index):
        return False

    def setup(self, bottom, top):
        p = self.param.hdf5_data_param
        if self.param.HasField("transform_param"):
            raise self.error("HDF5Data does not transform data: remove transform_param")
        if p.batch_size <= 0:
            raise self.error("hdf5_data_param.batch_size must be positive")
        self.files = read_hdf5_list(p.source, self.where)
        self.tops = list(self.param.top)
        self.shuffle = bool(p.shuffle)
        self.file_order = self.rng.permutation(len(self.files)) if self.shuffle else numpy.arange(len(self.files))
        self.current_file = 0
        self._loaded = None  # index into self.files of the file in self.arrays
        self._load(self.file_order[0])
        self.current_row = 0
        self.batch_size = int(p.batch_size)
        self.shard = shard.current() if self.train else (0, 1)

    @property
    def epoch_size(self):
        """Rows in one pass over every file of the list."""
        import h5py

        if getattr(self, "_epoch_size", None) is None:
            total = 0
            for path in self.files:
                with h5py.File(path, "r") as f:
                    total += int(f[self.tops[0]].shape[0])
            self._epoch_size = total
        return self._epoch_size

    def _load(self, index):
        import h5py

        path = self.files[index]
        if not os.path.isfile(path):
            raise self.error(f"HDF5 file {path} (listed in {self.param.hdf5_data_param.source}) does not exist")
        arrays = []
        with h5py.File(path, "r") as f:
            for name in self.tops:
                if name not in f:
                    raise self.error(f"HDF5 file {path} has no dataset {name!r} (has {', '.join(f.keys())})")
                arrays.append(numpy.asarray(f[name], dtype=self.dtype))
        for name, a in zip(self.tops, arrays):
            if a.ndim < 1 or a.shape[0] != arrays[0].shape[0]:
                raise self.error(f"HDF5 file {path}: dataset {name!r} has {a.shape[0] if a.ndim else 0} rows, "
                                   f"{self.tops[0]!r} has {arrays[0].shape[0]}")
            if hasattr(self, "arrays") and a.shape[1:] != self.arrays[self.tops.index(name)].shape[1:]:
                raise self.error(f"HDF5 file {path}: dataset {name!r} rows have shape {a.shape[1:]}, "
                                   f"earlier files {self.arrays[self.tops.index(name)].shape[1:]}")
        if arrays[0].shape[0] == 0:
            raise self.error(f"HDF5 file {path} holds no rows")
        self.arrays = arrays
        self._loaded = int(index)
        self.rows = arrays[0].shape[0]
        self.row_order = self.rng.permutation(self.rows) if self.shuffle else numpy.arange(self.rows)

    def resume_state(self):
        state = {"files": len(self.files), "current_file": int(self.current_file),
                 "current_row": int(self.current_row), "rows": int(self.rows)}
        if self.shuffle:  # the permutations in use and the generator that draws the next ones
            state.update(file_order=[int(i) for i in self.file_order], row_order=[int(i) for i in self.row_order],
                         rng=self.rng.bit_generator.state)
        return state

    def restore_resume_state(self, state):
        try:
            if state["files"] != len(self.files):
                raise ValueError(f"saved for {state['files']} files, {self.param.hdf5_data_param.source} "
                                 f"lists {len(self.files)}")
            if ("rng" in state) != self.shuffle:
                raise ValueError("saved with shuffle " + ("on" if "rng" in state else "off"))
            file_order = numpy.asarray(state["file_order"] if self.shuffle else self.file_order, dtype=numpy.int64)
            index = int(file_order[state["current_file"]])
            if index != self._loaded:
                self._load(index)
            if state["rows"] != self.rows or not 0 <= state["current_row"] < self.rows:
                raise ValueError(f"saved for {state['rows']} rows in {self.files[index]}, it has {self.rows}")
        except LayerError:
            raise  # from _load: already names the layer
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise self.error(f"cannot restore the saved data position ({exc})") from None
        self.file_order = file_order
        self.current_file = int(state["current_file"])
        self.current_row = int(state["current_row"])
        if self.shuffle:
            self.row_order = numpy.asarray(state["row_order"], dtype=numpy.int64)
            set_rng_state(self.rng, state["rng"], self.name, self.type)

    def reshape(self, bottom, top):
        for t, a in zip(top, self.arrays):
            t.reshape((self.batch_size,) + a.shape[1:])

    def _end_of_file(self):
        if len(self.files) > 1:
            self.current_file += 1
            if self.current_file == len(self.files):
                self.current_file = 0
                if self.shuffle:
                    self.rng.shuffle(self.file_order)
            self._load(self.file_order[self.current_file])
        self.current_row = 0
        if self.shuffle:
            self.rng.shuffle(self.row_order)

    def forward(self, bottom, top):
        pieces = [[] for _ in top]
        rank, ranks = self.shard
        need = self.batch_size * ranks
        while need:  # a run of consecutive rows of the current file at a time
            take = min(need, self.rows - self.current_row)
            rows = self.row_order[self.current_row:self.current_row + take]
            for out, a in zip(pieces, self.arrays):
                out.append(a[rows])
            need -= take
            self.current_row += take
            if self.current_row == self.rows:
                self._end_of_file()
        for t, out in zip(top, pieces):
            rows = numpy.concatenate(out) if len(out) > 1 else out[0]
            _copy_to_top(t, rows[rank::ranks] if ranks > 1 else rows)


# ---------------------------------------------------------------------------
@register("HDF5Output", v1="HDF5_OUTPUT")
class HDF5Output(Layer):
    """Writes its two bottoms to datasets "data" and "label" of file_name (4-axis,
    as Caffe). Caffe can only write once per file; here each forward replaces them."""

    exact_bottoms = 2
    exact_tops = 0
    has_backward = False  # a sink: no gradient to give its bottoms

    def setup(self, bottom, top):
        import h5py

        self.file_name = self.param.hdf5_output_param.file_name
        if not self.file_name:
            raise self.error("hdf5_output_param.file_name is not set")
        try:
            h5py.File(self.file_name, "w").close()  # created (truncated) at setup, as Caffe
        except OSError as exc:
            raise self.error(f"cannot create HDF5 file {self.file_name}: {exc}") from None

    def reshape(self, bottom, top):
        if bottom[0].shape[:1] != bottom[1].shape[:1]:
            raise self.error(f"data and label must have the same batch size, got {bottom[0].shape} and {bottom[1].shape}")

    def forward(self, bottom, top):
        import h5py

        from brewnet.layers.kernels.backend import to_numpy

        def legacy(shape):  # Caffe reshapes both to (num, channels, height, width)
            return tuple(shape) + (1,) * (4 - len(shape)) if len(shape) <= 4 else tuple(shape)

        with h5py.File(self.file_name, "a") as f:
            for key, blob in (("data", bottom[0]), ("label", bottom[1])):
                if key in f:
                    del f[key]
                f.create_dataset(key, data=to_numpy(blob.data).reshape(legacy(blob.shape)))

    def backward(self, top, propagate_down, bottom):
        pass  # Caffe returns without touching the bottoms, even under force_backward


# ---------------------------------------------------------------------------
@register("MemoryData", v1="MEMORY_DATA")
class MemoryData(Layer):
    """Batches from arrays given by ``set_input_arrays``/``reset`` (used as they are,
    like Caffe's Reset) or ``add_arrays`` (transformed, like AddMatVector)."""

    exact_bottoms = 0
    exact_tops = 2
    has_backward = False  # no bottoms: nothing to differentiate

    def allow_force_backward(self, bottom_index):
        return False

    def setup(self, bottom, top):
        p = self.param.memory_data_param
        self.batch_size, self.shape = int(p.batch_size), (int(p.channels), int(p.height), int(p.width))
        if self.batch_size * int(numpy.prod(self.shape)) <= 0:
            raise self.error("batch_size, channels, height and width must be set and positive in memory_data_param")
        self._transform = None
        self.data = self.labels = None
        self.n = self.pos = 0
        self._pending_pos = None

    def reshape(self, bottom, top):
        top[0].reshape((self.batch_size,) + self.shape)
        top[1].reshape((self.batch_size,))

    def _check(self, data, labels, n):
        if data.ndim != 4 or data.shape[1:] != self.shape:
            raise self.error(f"data must have shape (N, {', '.join(map(str, self.shape))}), got {data.shape}")
        if labels.shape[0] != data.shape[0] or labels.size != labels.shape[0]:
            raise self.error(f"labels must have shape ({data.shape[0]},), got {labels.shape}")
        if n <= 0 or n % self.batch_size or n > data.shape[0]:
            raise self.error(f"the number of inputs ({n}) must be a positive multiple of batch_size "
                               f"{self.batch_size} and at most {data.shape[0]}")

    def reset(self, data, labels, n=None):
        """Caffe's Reset: use the first n rows as they are (no transformation)."""
        data = numpy.asarray(data) if not hasattr(data, "device") else data
        labels = labels if hasattr(labels, "device") else numpy.asarray(labels)
        n = data.shape[0] if n is None else int(n)
        self._check(data, labels, n)
        if self.param.HasField("transform_param"):
            warnings.warn(f"layer {self.name!r}: MemoryData does not transform array data given to "
                          "set_input_arrays/reset (as Caffe); use add_arrays to transform", stacklevel=2)
        self.data = self.xp.asarray(data[:n], dtype=self.dtype)
        self.labels = self.xp.asarray(labels[:n], dtype=self.dtype).reshape(n)
        self.n, self.pos = n, self._take_pending(n)

    def set_input_arrays(self, data, labels):
        """pycaffe's Net.set_input_arrays for this layer: (N, C, H, W) data, N labels."""
        self.reset(data, labels)

    def add_arrays(self, data, labels):
        """Caffe's AddMatVector/AddDatumVector: (N, C, H, W) data, transformed."""
        data = numpy.asarray(data)
        if self._transform is None:
            self._transform = DataTransformer(self.param.transform_param, self.phase, _child_rng(self.rng),
                                              self.dtype, self.where)
        transformed = self._transform(data)
        labels = numpy.asarray(labels)
        self._check(transformed, labels, transformed.shape[0])
        self.data = self.xp.asarray(transformed)
        self.labels = self.xp.asarray(labels, dtype=self.dtype).reshape(-1)
        self.n = transformed.shape[0]
        self.pos = self._take_pending(self.n)

    def _take_pending(self, n):
        position, self._pending_pos = self._pending_pos, None
        return 0 if position is None else position % n

    def resume_state(self):
        state = {"position": int(self.pos)}
        if self._transform is not None:
            state["transform_rng"] = self._transform.rng.bit_generator.state
        return state

    def restore_resume_state(self, state):
        """The position in the arrays (the same arrays must be given, before or after)."""
        position = int(state.get("position", 0))
        if self.n:
            self.pos = position % self.n
        else:  # no arrays yet: the first ones given start there
            self._pending_pos = position
        if "transform_rng" in state:
            if self._transform is None:
                self._transform = DataTransformer(self.param.transform_param, self.phase, _child_rng(self.rng),
                                                  self.dtype, self.where)
            set_rng_state(self._transform.rng, state["transform_rng"], self.name, self.type)

    def forward(self, bottom, top):
        if self.data is None:
            raise self.error("no data: call set_input_arrays(data, labels) first")
        top[0].reshape((self.batch_size,) + self.shape)
        top[1].reshape((self.batch_size, 1, 1, 1))
        top[0].data[...] = self.data[self.pos:self.pos + self.batch_size]
        top[1].data[...] = self.labels[self.pos:self.pos + self.batch_size].reshape(-1, 1, 1, 1)
        self.pos = (self.pos + self.batch_size) % self.n
