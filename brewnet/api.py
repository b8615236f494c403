"""pycaffe's ``caffe.Net`` interface over brewnet's Net.

    net = brewnet.Net("deploy.prototxt", "weights.caffemodel", brewnet.TEST)
    out = net.forward(data=batch)            # {output name: array}
    grads = net.backward(prob=top_diff)      # {input name: array}
    net.blobs["conv1"].data, net.params["conv1"][0].data

Model and weights may also be ``zoo:NAME`` (resolved by the zoo package).
The Net from layers.net (``.net``) holds everything; this class only
translates pycaffe's calling conventions.
"""

import collections
import os

import numpy

from brewnet.layers.net import Net as _CoreNet
from brewnet.netdef import caffe_pb2


def resolve_model(spec):
    """A net definition's path: ``zoo:NAME`` is the zoo model's deploy prototxt."""
    from brewnet import zoo

    return zoo.resolve_model(spec)


def resolve_weights(spec):
    """A weights file's path: ``zoo:NAME`` is the zoo model's verified weights."""
    from brewnet import zoo

    if zoo.is_zoo_spec(spec):
        return zoo.resolve_weights(spec)
    from brewnet.solver.solver import local_weights_file

    return local_weights_file(spec)


def _parse_args(args, weights, phase):
    """pycaffe's forms: (model, phase), (model, weights, phase), keywords."""
    args = list(args)
    if args and isinstance(args[0], (str, os.PathLike)) and not isinstance(args[0], bool):
        if weights is not None:
            raise TypeError("Net(): weights given twice (positionally and as a keyword)")
        weights = args.pop(0)
    if args:
        if phase is not None:
            raise TypeError("Net(): phase given twice (positionally and as a keyword)")
        phase = args.pop(0)
    if args:
        raise TypeError("Net(model, [weights], [phase]): too many positional arguments")
    if phase is None:
        phase = caffe_pb2.TEST
    if phase not in (caffe_pb2.TRAIN, caffe_pb2.TEST):
        raise ValueError(f"Net(): phase must be brewnet.TRAIN or brewnet.TEST, got {phase!r}")
    return weights, phase


class Net:
    """A network with pycaffe's names (blobs, params, forward(**inputs), ...)."""

    def __init__(self, model, *args, weights=None, phase=None, level=None, stages=None, xp=None,
                 dtype=numpy.float32):
        from brewnet import netdef

        weights, phase = _parse_args(args, weights, phase)
        if isinstance(model, caffe_pb2.NetParameter):
            param, source = model, None
        else:
            source = str(resolve_model(os.fspath(model) if isinstance(model, os.PathLike) else model))
            param = netdef.read_net(source)
        self._net = _CoreNet(param, phase=phase, level=level, stages=stages, xp=xp, dtype=dtype, source=source)
        if weights is not None:
            self.copy_from(weights)

    @classmethod
    def wrap(cls, core_net):
        """The pycaffe view of an existing layers.net.Net (e.g. a solver's net)."""
        self = cls.__new__(cls)
        self._net = core_net
        return self

    # -- what the net holds -------------------------------------------------------
    @property
    def net(self):
        """The underlying layers.net.Net."""
        return self._net

    @property
    def blobs(self):
        return self._net.blobs

    @property
    def params(self):
        return self._net.params

    @property
    def layers(self):
        return self._net.layers

    @property
    def layer_names(self):
        return list(self._net.layer_names)

    _layer_names = layer_names

    @property
    def layer_dict(self):
        return collections.OrderedDict(zip(self._net.layer_names, self._net.layers))

    @property
    def inputs(self):
        return self._net.inputs

    @property
    def outputs(self):
        return self._net.outputs

    @property
    def blob_loss_weights(self):
        return self._net.blob_loss_weights

    @property
    def top_names(self):
        return collections.OrderedDict((n, self._net.top_names(i)) for i, n in enumerate(self._net.layer_names))

    @property
    def bottom_names(self):
        return collections.OrderedDict(
            (n, self._net.bottom_names(i)) for i, n in enumerate(self._net.layer_names))

    @property
    def name(self):
        return self._net.name

    @property
    def phase(self):
        return self._net.phase

    # -- running -----------------------------------------------------------------------
    def _set_arrays(self, arrays, allowed, what, attr):
        unknown = sorted(set(arrays) - set(allowed))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not {what} of net '{self.name}' "
                             f"({what}: {', '.join(allowed) or 'none'})")
        from brewnet.layers.kernels.backend import to_numpy

        xp, dtype = self._net.xp, self._net.dtype
        for name, value in arrays.items():
            blob = self.blobs[name]
            # numpy or cupy in, the net's device out (a CPU net fed cupy arrays copies them to the host)
            value = xp.asarray(to_numpy(value) if xp is numpy else value, dtype=dtype)
            if attr == "data" and value.shape != blob.shape:
                blob.reshape(value.shape)  # a new batch size or image size: the forward reshapes the rest
            elif value.shape != blob.shape:
                raise ValueError(f"diff for '{name}' has shape {value.shape}, the blob has {blob.shape}")
            getattr(blob, attr)[...] = value

    def forward(self, blobs=None, start=None, end=None, **kwargs):
        """Set inputs from keyword arrays, run start..end (layer names,
        inclusive) and return {name: data} for the outputs (or the end
        layer's tops) plus ``blobs``."""
        self._set_arrays(kwargs, self.inputs, "inputs", "data")
        if end is not None:
            wanted = self._net.top_names(end) + list(blobs or [])
        else:
            wanted = self.outputs + list(blobs or [])
        self._net.forward(start, end)
        return {name: self.blobs[name].data for name in dict.fromkeys(wanted)}

    def backward(self, diffs=None, start=None, end=None, **kwargs):
        """Set output diffs from keyword arrays, backpropagate from start down
        to end (layer names, inclusive) and return {name: diff} for the inputs
        (or the end layer's bottoms) plus ``diffs``."""
        self._set_arrays(kwargs, self.outputs, "outputs", "diff")
        if end is not None:
            wanted = self._net.bottom_names(end) + list(diffs or [])
        else:
            wanted = self.inputs + list(diffs or [])
        self._net.backward(start, end)
        return {name: self.blobs[name].diff for name in dict.fromkeys(wanted)}

    def forward_all(self, blobs=None, **kwargs):
        """Forward arrays of any length in batches of the net's batch size;
        returns {name: stacked numpy array}."""
        from brewnet.layers.kernels.backend import to_numpy

        if not kwargs:
            return {k: to_numpy(v).copy() for k, v in self.forward(blobs=blobs).items()}
        total = len(next(iter(kwargs.values())))
        batch = self.blobs[next(iter(kwargs))].shape[0] or total
        chunks = collections.defaultdict(list)
        for begin in range(0, total, batch):
            part = {k: to_numpy(v[begin:begin + batch]) for k, v in kwargs.items()}
            n = len(next(iter(part.values())))
            if n < batch:  # pad the last batch to the net's size, dropped below
                part = {k: numpy.concatenate([v, numpy.zeros((batch - n,) + v.shape[1:], v.dtype)])
                        for k, v in part.items()}
            for name, value in self.forward(blobs=blobs, **part).items():
                chunks[name].append(to_numpy(value)[:n].copy())
        return {name: numpy.concatenate(parts) for name, parts in chunks.items()}

    def _forward(self, start, end):
        return self._net.forward(start, end)

    def _backward(self, start, end):
        self._net.backward(start, end)

    def reshape(self):
        self._net.reshape()

    def clear_param_diffs(self):
        self._net.clear_param_diffs()

    def set_input_arrays(self, data, labels):
        """Feed a MemoryData first layer (pycaffe's set_input_arrays)."""
        layer = self.layers[0] if self.layers else None
        if layer is None or layer.type != "MemoryData":
            raise ValueError(f"net '{self.name}': set_input_arrays needs a MemoryData layer first")
        labels = labels if hasattr(labels, "device") else numpy.asarray(labels)  # cupy labels stay on the GPU
        if labels.ndim == 1:
            labels = labels.reshape(-1, 1, 1, 1)
        return layer.set_input_arrays(data, labels)

    # -- weights -----------------------------------------------------------------------
    def copy_from(self, weights):
        return self._net.copy_trained_layers_from(str(resolve_weights(os.fspath(weights))))

    def share_with(self, other):
        self._net.share_trained_layers_with(getattr(other, "_net", other))

    def save(self, path):
        self._net.save(os.fspath(path))

    def __repr__(self):
        return f"<brewnet.Net '{self.name}' {len(self.layers)} layers, inputs {self.inputs}, outputs {self.outputs}>"


# -- solvers -----------------------------------------------------------------------

def _front_door_solver(core_class):
    """brewnet.solver's class whose weights lists may also name zoo models."""
    return type(core_class.__name__, (core_class,), {
        "__module__": __name__, "__doc__": core_class.__doc__, "resolve_weights": staticmethod(resolve_weights)})


def _solver_types():
    from brewnet import solver

    return {name: _front_door_solver(cls) for name, cls in solver.SOLVER_TYPES.items()}


SOLVER_TYPES = _solver_types()
SGDSolver = SOLVER_TYPES["SGD"]
NesterovSolver = SOLVER_TYPES["Nesterov"]
AdaGradSolver = SOLVER_TYPES["AdaGrad"]
RMSPropSolver = SOLVER_TYPES["RMSProp"]
AdaDeltaSolver = SOLVER_TYPES["AdaDelta"]
AdamSolver = SOLVER_TYPES["Adam"]


def get_solver(path_or_param, **kwargs):
    """The solver the file's ``type`` names (default SGD), as caffe.get_solver."""
    from brewnet import solver

    return solver.get_solver(path_or_param, solver_types=SOLVER_TYPES, **kwargs)
