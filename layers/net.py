"""Net: a graph of layers built from a NetParameter, after Caffe's Net.

Construction follows Caffe's Net::Init step by step: filter the layers by the
NetState, insert Split layers where a blob feeds several consumers, create
each layer, wire its bottoms/tops (in-place when a top reuses the bottom at
the same index), set it up, record loss weights, share parameters named in
ParamSpecs, then work out which layers and blobs need a backward pass.

A shared parameter is the very Blob object of its owner in the sharing
layer's ``blobs`` list (PERMISSIVE sharing with another shape gets a
reshaped view of the owner instead). Layers must therefore read
``self.blobs[i]`` when they run rather than keep Blob references from setup.
"""

import collections
import contextlib
import logging
import os
import time

import numpy

from brewnet.netdef import caffe_pb2
from brewnet.netdef.errors import DefinitionError

from brewnet.layers.kernels import backend
from brewnet.layers.base import LayerError
from brewnet.layers.blob import Blob, BlobVec
from brewnet.layers import fusion
from brewnet.layers.registry import get_layer_class

logger = logging.getLogger("brewnet")

# Caffe::set_random_seed: nets built afterwards draw their generators from this one
_seed_source = [numpy.random.default_rng()]


def set_random_seed(seed):
    """Seed the generator that nets built from now on draw their own from."""
    _seed_source[0] = numpy.random.default_rng(seed)


def _child_rng(rng):
    return numpy.random.default_rng(int(rng.integers(0, 2**63 - 1)))


# -- Split insertion (Caffe's InsertSplits) -----------------------------------
def split_layer_name(layer_name, blob_name, top_index):
    return f"{blob_name}_{layer_name}_{top_index}_split"


def split_blob_name(layer_name, blob_name, top_index, split_index):
    return f"{blob_name}_{layer_name}_{top_index}_split_{split_index}"


def insert_splits(param, source=None):
    """A copy of ``param`` where every top read by more than one consumer goes
    through a Split layer. A nonzero loss_weight on a top counts as a consumer,
    and then the first split output carries that loss weight."""
    producer = {}  # blob name -> (layer index, top index) of its latest writer
    source_of = {}  # (layer, bottom index) -> producing (layer, top index)
    consumers = collections.Counter()
    loss_weight = {}
    for i, layer in enumerate(param.layer):
        for j, name in enumerate(layer.bottom):
            if name not in producer:
                raise DefinitionError(
                    f"layer '{layer.name}' ({layer.type}): unknown bottom blob '{name}' (bottom index {j}); "
                    f"no earlier layer produces it", path=source)
            source_of[(i, j)] = producer[name]
            consumers[producer[name]] += 1
        for j, name in enumerate(layer.top):
            producer[name] = (i, j)
        for j in range(min(len(layer.loss_weight), len(layer.top))):
            key = producer[layer.top[j]]
            loss_weight[key] = layer.loss_weight[j]
            if loss_weight[key]:
                consumers[key] += 1

    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    out.ClearField("layer")
    next_split = collections.Counter()
    for i, layer in enumerate(param.layer):
        new = out.layer.add()
        new.CopyFrom(layer)
        for j in range(len(new.bottom)):
            src = source_of[(i, j)]
            if consumers[src] > 1:
                new.bottom[j] = split_blob_name(param.layer[src[0]].name, new.bottom[j], src[1], next_split[src])
                next_split[src] += 1
        for j, name in enumerate(list(new.top)):
            count = consumers[(i, j)]
            if count <= 1:
                continue
            weight = loss_weight.get((i, j), 0.0)
            split = out.layer.add()
            split.name = split_layer_name(layer.name, name, j)
            split.type = "Split"
            split.bottom.append(name)
            for k in range(count):
                split.top.append(split_blob_name(layer.name, name, j, k))
                if weight:
                    split.loss_weight.append(weight if k == 0 else 0.0)
            if weight:
                # the loss now rides on the first split output
                new.ClearField("loss_weight")
                next_split[(i, j)] += 1
    return out


class SharedView(Blob):
    """A parameter seen with its own shape over another blob's memory
    (PERMISSIVE sharing between blobs of equal count but different shape)."""

    def __init__(self, owner, shape, name=None):
        self.owner = owner
        self.xp = owner.xp
        self.dtype = owner.dtype
        self.name = name
        self._view_shape = tuple(int(d) for d in shape)

    @property
    def data(self):
        return self.owner.data.reshape(self._view_shape)

    @data.setter
    def data(self, value):
        self.owner.data[...] = self.xp.asarray(value, dtype=self.dtype).reshape(self.owner.shape)

    @property
    def diff(self):
        return self.owner.diff.reshape(self._view_shape)

    @diff.setter
    def diff(self, value):
        self.owner.diff[...] = self.xp.asarray(value, dtype=self.dtype).reshape(self.owner.shape)

    def clear_diff(self, lazy=True):
        self.owner.clear_diff(lazy)
        return self

    def diff_to_overwrite(self):
        diff, zero = self.owner.diff_to_overwrite()
        return diff.reshape(self._view_shape), zero

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if tuple(int(d) for d in shape) != self._view_shape:
            raise ValueError(f"cannot reshape shared parameter {self.name or ''} {self._view_shape} to {shape}")


def _shape_str(shape):
    return "(" + " ".join(str(d) for d in shape) + ")"


def _proto_matches(target_shape, proto):
    """Caffe's Blob::ShapeEquals: legacy 4-D protos match a blob of at most 4
    axes whose shape, padded with leading 1s, equals (num, channels, height, width)."""
    if any(proto.HasField(f) for f in ("num", "channels", "height", "width")):
        if len(target_shape) > 4:
            return False
        padded = (1,) * (4 - len(target_shape)) + tuple(target_shape)
        return padded == (proto.num, proto.channels, proto.height, proto.width)
    return tuple(target_shape) == tuple(proto.shape.dim)


def _proto_shape(proto):
    if any(proto.HasField(f) for f in ("num", "channels", "height", "width")):
        return (proto.num, proto.channels, proto.height, proto.width)
    return tuple(proto.shape.dim)


class Net:
    """Caffe's Net on numpy/cupy. See the module docstring."""

    def __init__(self, net_param, phase=None, level=None, stages=None, xp=None, dtype=numpy.float32,
                 rng=None, source=None):
        from brewnet import netdef

        if isinstance(net_param, (str, os.PathLike)):
            source = source or str(net_param)
            net_param = netdef.read_net(net_param)
        param = caffe_pb2.NetParameter()
        param.CopyFrom(net_param)
        if netdef.net_needs_upgrade(param):
            # a NetParameter built by hand with legacy fields (V1 layers, input: ...)
            netdef.upgrade_net(param, source or "<net>")
        if phase is not None:
            param.state.phase = phase
        if level is not None:
            param.state.level = level
        if stages is not None:
            param.state.ClearField("stage")
            param.state.stage.extend(stages)

        self.source = source
        self.xp = xp if xp is not None else backend.get_array_module()
        self.dtype = numpy.dtype(dtype)
        if rng is None:
            rng = _child_rng(_seed_source[0])
        elif not isinstance(rng, numpy.random.Generator):
            rng = numpy.random.default_rng(rng)
        self.rng = rng
        self.phase = param.state.phase
        self.state = caffe_pb2.NetState()
        self.state.CopyFrom(param.state)

        filtered = netdef.filter_net(param, param.state)
        self.net_param = insert_splits(filtered, source=source)
        self.name = self.net_param.name
        self.debug_info = self.net_param.debug_info
        # called with the layer index around each layer's pass (pycaffe's net.before_forward(f) ...)
        self.before_forward_hooks, self.after_forward_hooks = [], []
        self.before_backward_hooks, self.after_backward_hooks = [], []
        self._init_layers()
        # BatchNorm -> Scale [-> activation] in place: one kernel each way (layers/fusion.py)
        self._chains = fusion.find_chains(self, {i for i, tops in enumerate(self._loss_tops) if tops})
        self._chain_of = {i: chain for chain in self._chains.values() for i in range(chain.start, chain.end + 1)}

    # -- construction ------------------------------------------------------------
    def _error(self, message):
        return DefinitionError(message, path=self.source)

    @contextlib.contextmanager
    def _layer_errors(self, where):
        """Errors while a layer is made and set up name this net's file; a plain
        ValueError (from a Blob, or a user's Python layer) also names the layer."""
        try:
            yield
        except DefinitionError as exc:
            if exc.path is not None or self.source is None:
                raise
            raise type(exc)(exc.reason, path=self.source) from None
        except ValueError as exc:
            message = str(exc)
            if where.split(" (")[0] not in message:
                message = f"{where}: {message}"
            raise LayerError(message, path=self.source) from exc

    def _init_layers(self):
        from brewnet import netdef

        self.layers = []
        self.layer_names = []
        self.bottom_vecs, self.top_vecs = [], []
        self.bottom_ids, self.top_ids = [], []
        self.bottom_need_backward = []
        self.layer_need_backward = []
        self._blob_list, self.blob_names = [], []
        self.blob_need_backward = []
        self._blob_loss = []  # per blob id
        self._input_ids = []
        self._loss_tops = []  # per layer: [(top index, weight), ...]
        self.params = collections.OrderedDict()
        # per net param (Caffe's params_): blob, owner net-param id or -1, (layer, index)
        self._net_params, self._param_owner, self._param_layer = [], [], []
        self._param_names = {}
        self.param_id_vecs = []
        self.learnable_params, self.params_lr, self.params_weight_decay = [], [], []
        self._has_lr, self._has_decay, self._learnable_id = [], [], []

        name_to_id = {}
        available = set()
        for layer_id, lp in enumerate(self.net_param.layer):
            if not lp.HasField("phase"):
                lp.phase = self.phase
            where = f"layer '{lp.name}' ({lp.type})"
            if len(lp.propagate_down) and len(lp.propagate_down) != len(lp.bottom):
                raise self._error(f"{where}: propagate_down must be given 0 or {len(lp.bottom)} times "
                                  f"(once per bottom), got {len(lp.propagate_down)}")
            stored = [netdef.blob_to_array(b, dtype=self.dtype) for b in lp.blobs]
            lp.ClearField("blobs")  # kept as Blobs on the layer; no second copy in the param
            with self._layer_errors(where):
                cls = get_layer_class(lp.type, lp.name)
                layer = cls(lp, xp=self.xp, phase=lp.phase, rng=_child_rng(self.rng), dtype=self.dtype)
            if stored:
                layer.blobs = BlobVec([self._blob_from_array(a, f"{lp.name}/param{k}") for k, a in enumerate(stored)],
                                      xp=self.xp, dtype=self.dtype, prefix=lp.name)
            self.layers.append(layer)
            self.layer_names.append(lp.name)
            self.bottom_vecs.append([])
            self.top_vecs.append([])
            self.bottom_ids.append([])
            self.top_ids.append([])
            self.bottom_need_backward.append([])

            need_backward = False
            for j, name in enumerate(lp.bottom):
                if name not in available:
                    raise self._error(f"{where}: unknown bottom blob '{name}' (bottom index {j})")
                blob_id = name_to_id[name]
                self.bottom_vecs[layer_id].append(self._blob_list[blob_id])
                self.bottom_ids[layer_id].append(blob_id)
                available.discard(name)
                needs = self.blob_need_backward[blob_id]
                if len(lp.propagate_down):
                    needs = bool(lp.propagate_down[j])
                self.bottom_need_backward[layer_id].append(needs)
                need_backward |= self.blob_need_backward[blob_id]

            n_top = len(lp.top)
            for j, name in enumerate(lp.top):
                self._append_top(layer_id, lp, j, name, name_to_id, available)
                if lp.type == "Input":
                    self._input_ids.append(self.top_ids[layer_id][-1])
            if layer.auto_top_blobs:
                # anonymous tops: not in name_to_id or available, so no later layer can read them
                for j in range(n_top, layer.tops_with_auto(n_top)):
                    self._append_top(layer_id, lp, j, None, None, None)

            bottom, top = self.bottom_vecs[layer_id], self.top_vecs[layer_id]
            with self._layer_errors(where):
                # the one place the blob-count contract is checked (Caffe's Layer::SetUp)
                layer.check_blob_counts(len(bottom), len(top))
                layer.setup(bottom, top)
                layer.reshape(bottom, top)
            self._set_loss_weights(layer_id, layer, lp, top, where)
            logger.info("%s: %s -> %s", lp.name,
                        ", ".join(lp.bottom) or "(no bottom)",
                        ", ".join(f"{self.blob_names[t]} {_shape_str(b.shape)}"
                                  for t, b in zip(self.top_ids[layer_id], top)) or "(no top)")

            n_params = len(layer.blobs)
            if len(lp.param) > n_params:
                raise self._error(f"{where}: {len(lp.param)} param specs given but the layer has only "
                                  f"{n_params} learnable blob(s)")
            layer.param_propagate_down = []
            for k in range(n_params):
                spec = lp.param[k] if k < len(lp.param) else caffe_pb2.ParamSpec()
                layer.param_propagate_down.append(spec.lr_mult != 0)
                need_backward |= spec.lr_mult != 0
            self.param_id_vecs.append([])
            for k in range(n_params):
                self._append_param(layer_id, k, where)
            if n_params:
                self.params[lp.name] = layer.blobs

            self.layer_need_backward.append(need_backward)
            if need_backward:
                for t in self.top_ids[layer_id]:
                    self.blob_need_backward[t] = True

        self._prune_backward()
        if self.net_param.force_backward:
            self._force_backward()

        # Caffe walks a std::set: outputs come in name order
        self._output_ids = [name_to_id[n] for n in sorted(available)]
        self.blobs = collections.OrderedDict(
            (n, b) for n, b in zip(self.blob_names, self._blob_list) if n is not None)
        self.blob_loss_weights = collections.OrderedDict(
            (n, w) for n, w in zip(self.blob_names, self._blob_loss) if n is not None)
        self._layer_index = {}
        for i, n in enumerate(self.layer_names):
            self._layer_index.setdefault(n, i)
        logger.info("net '%s' (%s) ready: %d layers, outputs %s", self.name,
                    "TRAIN" if self.phase == caffe_pb2.TRAIN else "TEST", len(self.layers),
                    ", ".join(self.outputs) or "none")

    def _blob_from_array(self, array, name):
        blob = Blob(array.shape, xp=self.xp, dtype=self.dtype, name=name)
        blob.data[...] = self.xp.asarray(array, dtype=self.dtype)
        return blob

    def _append_top(self, layer_id, lp, j, name, name_to_id, available):
        if name_to_id is not None and j < len(lp.bottom) and name == lp.bottom[j]:
            blob_id = name_to_id[name]  # in-place: top is the bottom blob itself
        elif name_to_id is not None and name in name_to_id:
            raise self._error(f"layer '{lp.name}' ({lp.type}): top blob '{name}' is produced by multiple "
                              f"sources (in-place use needs the same name at the same bottom index)")
        else:
            blob_id = len(self._blob_list)
            self._blob_list.append(Blob((), xp=self.xp, dtype=self.dtype, name=name))
            self.blob_names.append(name)  # None for automatic tops
            self.blob_need_backward.append(False)
            self._blob_loss.append(0.0)
            if name_to_id is not None:
                name_to_id[name] = blob_id
        self.top_ids[layer_id].append(blob_id)
        self.top_vecs[layer_id].append(self._blob_list[blob_id])
        if available is not None:
            available.add(name)

    def _set_loss_weights(self, layer_id, layer, lp, top, where):
        weights = list(lp.loss_weight)
        if weights and len(weights) != len(top):
            raise self._error(f"{where}: loss_weight must be given once per top blob ({len(top)}) or not at "
                              f"all, got {len(weights)}")
        if not weights:
            weights = [1.0 if (layer.is_loss and j == 0) else 0.0 for j in range(len(top))]
        self._loss_tops.append([(j, float(w)) for j, w in enumerate(weights) if w])
        for j, w in enumerate(weights):
            self._blob_loss[self.top_ids[layer_id][j]] = float(w)
            if w:
                top[j].diff[...] = w

    def _append_param(self, layer_id, k, where):
        layer = self.layers[layer_id]
        lp = layer.param
        spec = lp.param[k] if k < len(lp.param) else caffe_pb2.ParamSpec()
        name = spec.name
        net_id = len(self._net_params)
        self._net_params.append(layer.blobs[k])
        self._param_layer.append((layer_id, k))
        self.param_id_vecs[layer_id].append(net_id)
        if not name or name not in self._param_names:
            self._param_owner.append(-1)
            if name:
                self._param_names[name] = net_id
            self._learnable_id.append(len(self.learnable_params))
            self.learnable_params.append(layer.blobs[k])
            self._has_lr.append(spec.HasField("lr_mult"))
            self._has_decay.append(spec.HasField("decay_mult"))
            self.params_lr.append(float(spec.lr_mult))
            self.params_weight_decay.append(float(spec.decay_mult))
            return

        owner_id = self._param_names[name]
        self._param_owner.append(owner_id)
        owner_layer, owner_k = self._param_layer[owner_id]
        owner = self._net_params[owner_id]
        mine = layer.blobs[k]
        owner_name = self.layer_names[owner_layer]
        if spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE:
            if mine.count != owner.count:
                raise self._error(
                    f"cannot share param '{name}' owned by layer '{owner_name}' with layer '{lp.name}': count "
                    f"mismatch; owner shape is {_shape_str(owner.shape)}, sharing layer shape is "
                    f"{_shape_str(mine.shape)}")
        elif mine.shape != owner.shape:
            raise self._error(
                f"cannot share param '{name}' owned by layer '{owner_name}' with layer '{lp.name}': shape "
                f"mismatch; owner shape is {_shape_str(owner.shape)}, sharing layer expects "
                f"{_shape_str(mine.shape)} (use share_mode: PERMISSIVE to share by count)")
        shared = owner if mine.shape == owner.shape else SharedView(owner, mine.shape, mine.name)
        layer.blobs[k] = shared
        self._net_params[net_id] = shared
        logger.info("sharing parameter '%s' of layer '%s' (param %d) with layer '%s'", name, owner_name,
                    owner_k, lp.name)
        lid = self._learnable_id[owner_id]
        self._learnable_id.append(lid)
        for has, values, field in ((self._has_lr, self.params_lr, "lr_mult"),
                                   (self._has_decay, self.params_weight_decay, "decay_mult")):
            if not spec.HasField(field):
                continue
            value = float(getattr(spec, field))
            if has[lid] and values[lid] != value:
                raise self._error(f"shared param '{name}' has mismatched {field} in layer '{lp.name}' "
                                  f"({value} vs {values[lid]})")
            has[lid] = True
            values[lid] = value

    def _prune_backward(self):
        """Caffe's reverse sweep: skip layers that do not reach a loss, and
        layers whose every top is marked to skip backpropagation."""
        under_loss, skip = set(), set()
        for i in range(len(self.layers) - 1, -1, -1):
            losses = {j for j, _ in self._loss_tops[i]}
            contributes, skip_all = False, True
            for j, t in enumerate(self.top_ids[i]):
                name = self.blob_names[t]
                if j in losses or name in under_loss:
                    contributes = True
                if name not in skip:
                    skip_all = False
                if contributes and not skip_all:
                    break
            if self.layer_need_backward[i] and skip_all:
                self.layer_need_backward[i] = False
                self.bottom_need_backward[i] = [False] * len(self.bottom_need_backward[i])
            if not contributes:
                self.layer_need_backward[i] = False
            for j, b in enumerate(self.bottom_ids[i]):
                name = self.blob_names[b]
                if contributes:
                    under_loss.add(name)
                else:
                    self.bottom_need_backward[i][j] = False
                if not self.bottom_need_backward[i][j]:
                    skip.add(name)
            logger.debug("%s %s backward computation", self.layer_names[i],
                         "needs" if self.layer_need_backward[i] else "does not need")

    def _force_backward(self):
        for i, layer in enumerate(self.layers):
            self.layer_need_backward[i] = True
            for j, b in enumerate(self.bottom_ids[i]):
                flag = self.bottom_need_backward[i][j] or bool(layer.allow_force_backward(j))
                self.bottom_need_backward[i][j] = flag
                self.blob_need_backward[b] = self.blob_need_backward[b] or flag
            layer.param_propagate_down = [True] * len(layer.blobs)

    # -- names ---------------------------------------------------------------------
    @property
    def inputs(self):
        return [self.blob_names[i] for i in self._input_ids]

    @property
    def outputs(self):
        return [self.blob_names[i] for i in self._output_ids]

    @property
    def input_blobs(self):
        return [self._blob_list[i] for i in self._input_ids]

    @property
    def output_blobs(self):
        return [self._blob_list[i] for i in self._output_ids]

    def top_names(self, layer):
        return [self.blob_names[t] for t in self.top_ids[self.layer_index(layer)]]

    def bottom_names(self, layer):
        return [self.blob_names[b] for b in self.bottom_ids[self.layer_index(layer)]]

    def has_blob(self, name):
        return name in self.blobs

    def blob_by_name(self, name):
        try:
            return self.blobs[name]
        except KeyError:
            raise KeyError(f"net '{self.name}' has no blob '{name}'") from None

    def has_layer(self, name):
        return name in self._layer_index

    def layer_by_name(self, name):
        return self.layers[self.layer_index(name)]

    def layer_index(self, layer):
        """Index of a layer given by index or name."""
        if isinstance(layer, str):
            try:
                return self._layer_index[layer]
            except KeyError:
                raise KeyError(f"net '{self.name}' has no layer '{layer}'") from None
        index = int(layer)
        if not -len(self.layers) <= index < len(self.layers):
            raise IndexError(f"layer index {index} out of range for {len(self.layers)} layers")
        return index % len(self.layers)

    # -- running -------------------------------------------------------------------
    # Caffe's ForwardFromTo/BackwardFromTo. brewnet's own code (the solver, `brewnet time`)
    # calls these names: pycaffe's Net (brewnet.api) gives forward/backward pycaffe's meaning.
    # a list to collect (loss weight, device sum) per loss top instead of summing on the host
    # (the solver's deferred loss reading: solver/solver.py); None: forward returns the loss
    loss_terms = None

    def _fusing(self, *hooks):
        """Whether chains (layers/fusion.py) run fused now: fusion on, and nothing watching the
        layers one by one (hooks, debug_info)."""
        return bool(self._chains) and not (any(hooks) or self.debug_info) and fusion.enabled()

    def forward_from_to(self, start=None, end=None):
        """Run layers start..end (inclusive; indices or names) and return the
        weighted loss they produce (Caffe's ForwardFromTo)."""
        first = 0 if start is None else self.layer_index(start)
        last = len(self.layers) - 1 if end is None else self.layer_index(end)
        before, after = self.before_forward_hooks, self.after_forward_hooks
        fuse = self._fusing(before, after)
        loss = 0.0
        i = first - 1
        while i < last:
            i += 1
            chain = self._chain_of.get(i)
            if chain is not None:
                if fuse and i == chain.start and chain.end <= last and chain.forward():
                    i = chain.end
                    continue
                chain.forward_fused = False
            for hook in before:
                hook(i)
            layer, bottom, top = self.layers[i], self.bottom_vecs[i], self.top_vecs[i]
            layer.reshape(bottom, top)
            layer.forward(bottom, top)
            for j, weight in self._loss_tops[i]:
                blob = top[j]
                # the loss weight reaches backward as the top diff, as in Caffe
                blob.diff[...] = weight
                if self.loss_terms is not None:  # the reader (the solver) sums them later: no host read here
                    self.loss_terms.append((weight, blob.data.sum()))
                else:
                    loss += weight * float(blob.data.sum())
            if self.debug_info:
                self._debug_forward(i)
            for hook in after:
                hook(i)
        return loss

    def backward_from_to(self, start=None, end=None):
        """Backpropagate from layer start down to end (inclusive; default all)."""
        first = len(self.layers) - 1 if start is None else self.layer_index(start)
        last = 0 if end is None else self.layer_index(end)
        before, after = self.before_backward_hooks, self.after_backward_hooks
        fuse = self._fusing(before, after)
        i = first + 1
        while i > last:
            i -= 1
            chain = self._chain_of.get(i)
            if chain is not None and i == chain.end:
                if fuse and chain.start >= last and chain.backward():
                    i = chain.start
                    continue
                chain.prepare_unfused_backward()
            for hook in before:
                hook(i)
            if self.layer_need_backward[i]:
                self.layers[i].backward(self.top_vecs[i], self.bottom_need_backward[i], self.bottom_vecs[i])
                if self.debug_info:
                    self._debug_backward(i)
            for hook in after:
                hook(i)

    def forward(self, start=None, end=None):
        """forward_from_to: the weighted loss of layers start..end."""
        return self.forward_from_to(start, end)

    def backward(self, start=None, end=None):
        """backward_from_to."""
        self.backward_from_to(start, end)

    def forward_backward(self):
        loss = self.forward_from_to()
        self.backward_from_to()
        return loss

    def reshape(self):
        for layer, bottom, top in zip(self.layers, self.bottom_vecs, self.top_vecs):
            layer.reshape(bottom, top)

    def clear_param_diffs(self, lazy=False):
        """Zero every learnable parameter's diff. The solver clears lazily (written when a
        diff is next read, see Blob.clear_diff); by default arrays taken from ``.diff``
        before the call read zeros after it, as in Caffe."""
        for blob in self.learnable_params:
            blob.clear_diff(lazy)

    def update(self):
        """data -= diff for every learnable parameter (Caffe's Net::Update)."""
        for blob in self.learnable_params:
            blob.data -= blob.diff

    def first_nonfinite(self):
        """(layer name, top blob name) of the first layer whose output holds a
        NaN or inf after the last forward, or None."""
        for i, tops in enumerate(self.top_vecs):
            for t, blob in zip(self.top_ids[i], tops):
                if blob.count and not bool(self.xp.isfinite(blob.data).all()):
                    return self.layer_names[i], self.blob_names[t]
        return None

    def nonfinite_note(self):
        """"; the first non-finite output is layer 'L' (top 'T')" for an error message, or ""."""
        first = self.first_nonfinite()
        return f"; the first non-finite output is layer '{first[0]}' (top '{first[1]}')" if first else ""

    def _debug_forward(self, i):
        for t, blob in zip(self.top_ids[i], self.top_vecs[i]):
            logger.info("    [Forward] Layer %s, top blob %s data: %g", self.layer_names[i], self.blob_names[t],
                        float(abs(blob.data).mean()) if blob.count else 0.0)

    def _debug_backward(self, i):
        for j, (b, blob) in enumerate(zip(self.bottom_ids[i], self.bottom_vecs[i])):
            if self.bottom_need_backward[i][j] and blob.count:
                logger.info("    [Backward] Layer %s, bottom blob %s diff: %g", self.layer_names[i],
                            self.blob_names[b], float(abs(blob.diff).mean()))

    # -- exact resume ------------------------------------------------------------------
    def resume_state(self):
        """{layer name: state} of the layers whose next forward depends on more
        than their blobs (data positions, random generators, carried state)."""
        states = {}
        for name, layer in zip(self.layer_names, self.layers):
            get = getattr(layer, "resume_state", None)  # Python layers may lack it
            state = get() if get is not None else None
            if state is not None:
                states[name] = state
        return states

    def restore_resume_state(self, states):
        """Apply what ``resume_state`` returned; returns the names of saved
        layers this net lacks (their state is dropped)."""
        missing = []
        for name, state in states.items():
            index = self._layer_index.get(name)
            restore = getattr(self.layers[index], "restore_resume_state", None) if index is not None else None
            if restore is None:
                missing.append(name)
            else:
                restore(state)
        return missing

    # -- weights -------------------------------------------------------------------
    def copy_trained_layers_from(self, weights):
        """Copy parameters from a weights file (binary or HDF5) or NetParameter,
        matching layers by name. Source layers absent here are ignored (listed
        in ``ignored_source_layers``)."""
        from brewnet import netdef

        path = None
        if isinstance(weights, (str, os.PathLike)):
            path = str(weights)
            weights = netdef.read_weights(path)
        self.ignored_source_layers = []
        for source_layer in weights.layer:
            name = source_layer.name
            target_id = self._layer_index.get(name)
            if target_id is None:
                self.ignored_source_layers.append(name)
                logger.info("Ignoring source layer %s", name)
                continue
            target = self.layers[target_id].blobs
            n_src, n_tgt = len(source_layer.blobs), len(target)
            # HDF5 weights omit params shared from another layer: those may be missing
            missing_ok = n_src < n_tgt and all(
                self._param_owner[self.param_id_vecs[target_id][k]] != -1 for k in range(n_src, n_tgt))
            if n_src != n_tgt and not missing_ok:
                raise DefinitionError(f"incompatible number of blobs for layer '{name}': the weights have "
                                      f"{n_src}, the net expects {n_tgt}", path=path)
            for k, proto in enumerate(source_layer.blobs):
                blob = target[k]
                if not _proto_matches(blob.shape, proto):
                    raise DefinitionError(
                        f"cannot copy param {k} weights from layer '{name}': shape mismatch; source param shape "
                        f"is {_shape_str(_proto_shape(proto))}, target param shape is {_shape_str(blob.shape)}. "
                        f"To learn this layer's parameters from scratch rather than copying from a saved net, "
                        f"rename the layer.", path=path)
                array = netdef.blob_to_array(proto, dtype=self.dtype).reshape(blob.shape)
                blob.data[...] = self.xp.asarray(array, dtype=self.dtype)
        copied = len(weights.layer) - len(self.ignored_source_layers)
        if not copied and any(layer.blobs for layer in self.layers):
            logger.warning("No layer of %s has a name of this net's layers: nothing was copied (is it a weights "
                           "file for this net, not a mean .binaryproto or a solver state?)", path or "the weights")
        return self.ignored_source_layers

    def nonfinite_params(self):
        """Names of the layers whose parameters hold a NaN or inf."""
        return [name for name, layer in zip(self.layer_names, self.layers)
                if any(blob.count and not bool(self.xp.isfinite(blob.data).all()) for blob in layer.blobs)]

    copy_from = copy_trained_layers_from

    def share_trained_layers_with(self, other):
        """Use another net's parameter blobs (the same objects) for the layers
        of the same name: test nets follow the training net's weights."""
        replaced = {}
        for source_layer, name in zip(other.layers, other.layer_names):
            target_id = self._layer_index.get(name)
            if target_id is None:
                logger.debug("Ignoring source layer %s", name)
                continue
            target = self.layers[target_id].blobs
            if len(target) != len(source_layer.blobs):
                raise DefinitionError(f"incompatible number of blobs for layer '{name}': source net has "
                                      f"{len(source_layer.blobs)}, target net has {len(target)}", path=self.source)
            for k, src in enumerate(source_layer.blobs):
                if target[k].shape != src.shape:
                    raise DefinitionError(
                        f"cannot share param {k} weights from layer '{name}': shape mismatch; source param "
                        f"shape is {_shape_str(src.shape)}, target param shape is {_shape_str(target[k].shape)}",
                        path=self.source)
                replaced[id(target[k])] = src
                target[k] = src
        self.learnable_params = [replaced.get(id(b), b) for b in self.learnable_params]
        self._net_params = [replaced.get(id(b), b) for b in self._net_params]

    def to_proto(self, write_diff=False):
        from brewnet import netdef

        out = caffe_pb2.NetParameter()
        out.name = self.name
        for layer in self.layers:
            lp = out.layer.add()
            lp.CopyFrom(layer.param)
            lp.ClearField("blobs")
            for blob in layer.blobs:
                diff = backend.to_numpy(blob.diff) if write_diff else None
                lp.blobs.add().CopyFrom(netdef.array_to_blob(backend.to_numpy(blob.data), diff=diff))
        return out

    def save(self, path, write_diff=False):
        """Write the weights as a .caffemodel (or HDF5 when path ends in .h5)."""
        from brewnet import netdef

        netdef.write_weights(self.to_proto(write_diff=write_diff), str(path))

    # -- timing ----------------------------------------------------------------------
    def synchronize(self):
        """Wait for queued device work (a no-op on numpy) so timings are honest."""
        cuda = getattr(self.xp, "cuda", None)
        if cuda is not None:
            cuda.get_current_stream().synchronize()

    def run_units(self):
        """(first, last) layer ranges that a whole pass runs as one step each: a fused chain
        (layers/fusion.py) is one unit while fusion is on, every other layer its own."""
        fuse = self._fusing(self.before_forward_hooks, self.after_forward_hooks)
        units, i = [], 0
        while i < len(self.layers):
            chain = self._chains.get(i) if fuse else None
            end = chain.end if chain is not None else i
            units.append((i, end))
            i = end + 1
        return units

    def time_layers(self, iterations=1):
        """Per-layer mean forward/backward milliseconds over ``iterations``
        forward+backward passes: two lists indexed like ``layers``. A fused chain is timed
        as the unit it runs as: its time is on its first layer, 0 on the others."""
        n = len(self.layers)
        fwd, bwd = numpy.zeros(n), numpy.zeros(n)
        units = self.run_units()
        for _ in range(iterations):
            for first, last in units:
                t0 = time.perf_counter()
                self.forward_from_to(first, last)
                self.synchronize()
                fwd[first] += time.perf_counter() - t0
            for first, last in reversed(units):
                t0 = time.perf_counter()
                self.backward_from_to(last, first)
                self.synchronize()
                bwd[first] += time.perf_counter() - t0
        scale = 1000.0 / max(iterations, 1)
        return list(fwd * scale), list(bwd * scale)

    def __repr__(self):
        return f"<Net '{self.name}' {len(self.layers)} layers>"
