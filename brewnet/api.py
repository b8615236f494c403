"""pycaffe's ``caffe.Net`` and solvers over brewnet's.

    net = brewnet.Net("deploy.prototxt", "weights.caffemodel", brewnet.TEST)
    out = net.forward(data=batch)            # {output name: array}
    grads = net.backward(prob=top_diff)      # {input name: array}
    net.blobs["conv1"].data, net.params["conv1"][0].data

Model and weights may also be ``zoo:NAME`` (resolved by the zoo package).
Net is a subclass of layers.net.Net that gives it pycaffe's calling
conventions; the solvers here build it, so a solver's nets are the same
class (brewnet.pycaffe, the ``import caffe`` drop-in, exposes both).
"""

import collections
import itertools
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


class Net(_CoreNet):
    """pycaffe's Net: brewnet's Net (layers.net.Net) with pycaffe's calling conventions.
    It is the class solvers build too, so ``solver.net`` and ``solver.test_nets[i]`` are
    of it. ``forward``/``backward`` take and return {blob name: array}; the core's
    loss-returning passes are ``forward_from_to``/``backward_from_to``."""

    def __init__(self, model, *args, weights=None, phase=None, level=None, stages=None, xp=None,
                 dtype=numpy.float32, rng=None, source=None):
        from brewnet import netdef

        weights, phase = _parse_args(args, weights, phase)
        if isinstance(model, caffe_pb2.NetParameter):
            param = model
        else:
            source = str(resolve_model(os.fspath(model) if isinstance(model, os.PathLike) else model))
            param = netdef.read_net(source)
        super().__init__(param, phase=phase, level=level, stages=stages, xp=xp, dtype=dtype, rng=rng,
                         source=source)
        if weights is not None:
            self.copy_from(weights)

    @classmethod
    def wrap(cls, core_net):
        """An existing layers.net.Net, given this class (in place) and returned."""
        if not isinstance(core_net, cls):
            if not isinstance(core_net, _CoreNet):
                raise TypeError(f"Net.wrap: expected a brewnet.layers.net.Net, got {type(core_net).__name__}")
            core_net.__class__ = cls
        return core_net

    @property
    def net(self):
        """The net itself (it is a layers.net.Net; kept for code written for the old wrapper)."""
        return self

    # -- pycaffe's views of the graph ------------------------------------------------
    @property
    def _layer_names(self):
        return list(self.layer_names)

    @property
    def layer_dict(self):
        """{layer name: layer}, bottom to top."""
        return collections.OrderedDict(zip(self.layer_names, self.layers))

    @property
    def top_names(self):
        """{layer name: [its top blob names]}, bottom to top."""
        return collections.OrderedDict((n, [self.blob_names[t] for t in ids])
                                       for n, ids in zip(self.layer_names, self.top_ids))

    @property
    def bottom_names(self):
        """{layer name: [its bottom blob names]}, bottom to top."""
        return collections.OrderedDict((n, [self.blob_names[b] for b in ids])
                                       for n, ids in zip(self.layer_names, self.bottom_ids))

    # -- running -----------------------------------------------------------------------
    def _set_arrays(self, arrays, allowed, what, attr):
        unknown = sorted(set(arrays) - set(allowed))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not {what} of net '{self.name}' "
                             f"({what}: {', '.join(allowed) or 'none'})")
        from brewnet.layers.kernels.backend import to_numpy

        xp, dtype = self.xp, self.dtype
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
        layer's tops) plus ``blobs``. An input of another shape than its
        blob reshapes the net (pycaffe only takes the blob's own shape)."""
        self._set_arrays(kwargs, self.inputs, "inputs", "data")
        if end is not None:
            wanted = [self.blob_names[t] for t in self.top_ids[self.layer_index(end)]]
        else:
            wanted = self.outputs
        self.forward_from_to(start, end)
        return {name: self.blobs[name].data for name in dict.fromkeys([*wanted, *(blobs or [])])}

    def backward(self, diffs=None, start=None, end=None, **kwargs):
        """Set output diffs from keyword arrays, backpropagate from start down
        to end (layer names, inclusive) and return {name: diff} for the inputs
        (or the end layer's bottoms) plus ``diffs``."""
        self._set_arrays(kwargs, self.outputs, "outputs", "diff")
        if end is not None:
            wanted = [self.blob_names[b] for b in self.bottom_ids[self.layer_index(end)]]
        else:
            wanted = self.inputs
        self.backward_from_to(start, end)
        return {name: self.blobs[name].diff for name in dict.fromkeys([*wanted, *(diffs or [])])}

    def _forward(self, start, end):
        return self.forward_from_to(start, end)

    def _backward(self, start, end):
        self.backward_from_to(start, end)

    def _batch(self, arrays):
        """Yield {name: array slice} batches of the net's batch size (the first
        array's blob's first axis), the last one padded with zeros, and the
        number of real rows in each."""
        from brewnet.layers.kernels.backend import to_numpy

        total = len(next(iter(arrays.values())))
        batch = self.blobs[next(iter(arrays))].shape[0] or total or 1
        for begin in range(0, total, batch):
            part = {k: to_numpy(v[begin:begin + batch]) for k, v in arrays.items()}
            n = len(next(iter(part.values())))
            if n < batch:  # pad the last batch to the net's size, dropped afterwards
                part = {k: numpy.concatenate([v, numpy.zeros((batch - n,) + v.shape[1:], v.dtype)])
                        for k, v in part.items()}
            yield part, n

    def forward_all(self, blobs=None, **kwargs):
        """Forward arrays of any length in batches of the net's batch size;
        returns {name: stacked numpy array}."""
        from brewnet.layers.kernels.backend import to_numpy

        if not kwargs:
            return {k: to_numpy(v).copy() for k, v in self.forward(blobs=blobs).items()}
        chunks = collections.defaultdict(list)
        for part, n in self._batch(kwargs):
            for name, value in self.forward(blobs=blobs, **part).items():
                chunks[name].append(to_numpy(value)[:n].copy())
        return {name: numpy.concatenate(parts) for name, parts in chunks.items()}

    def forward_backward_all(self, blobs=None, diffs=None, **kwargs):
        """forward_all and backward together, batch by batch: keyword arrays
        named after inputs feed the forward passes, those named after outputs
        the backward passes. Returns ({name: data}, {name: diff}), stacked."""
        from brewnet.layers.kernels.backend import to_numpy

        forward_in = {k: v for k, v in kwargs.items() if k in self.inputs}
        backward_in = {k: v for k, v in kwargs.items() if k in self.outputs}
        unknown = sorted(set(kwargs) - set(forward_in) - set(backward_in))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: neither inputs nor outputs of net '{self.name}'")
        forward_batches = self._batch(forward_in) if forward_in else iter([({}, None)])
        backward_batches = self._batch(backward_in) if backward_in else iter([({}, None)])
        outs, grads = collections.defaultdict(list), collections.defaultdict(list)
        for (fb, n_f), (bb, n_b) in itertools.zip_longest(forward_batches, backward_batches,
                                                          fillvalue=({}, None)):
            n = n_f if n_f is not None else n_b
            for name, value in self.forward(blobs=blobs, **fb).items():
                outs[name].append(to_numpy(value)[:n].copy())
            for name, value in self.backward(diffs=diffs, **bb).items():
                grads[name].append(to_numpy(value)[:n].copy())
        return ({name: numpy.concatenate(parts) for name, parts in outs.items()},
                {name: numpy.concatenate(parts) for name, parts in grads.items()})

    def set_input_arrays(self, data, labels):
        """Feed a MemoryData first layer (pycaffe's set_input_arrays)."""
        layer = self.layers[0] if self.layers else None
        if layer is None or layer.type != "MemoryData":
            raise ValueError(f"net '{self.name}': set_input_arrays needs a MemoryData layer first")
        labels = labels if hasattr(labels, "device") else numpy.asarray(labels)  # cupy labels stay on the GPU
        if labels.ndim == 1:
            labels = labels.reshape(-1, 1, 1, 1)
        return layer.set_input_arrays(data, labels)

    # -- callbacks around each layer (pycaffe's net.before_forward(f) ...: f(layer index)) --
    def before_forward(self, callback):
        self.before_forward_hooks.append(callback)

    def after_forward(self, callback):
        self.after_forward_hooks.append(callback)

    def before_backward(self, callback):
        self.before_backward_hooks.append(callback)

    def after_backward(self, callback):
        self.after_backward_hooks.append(callback)

    # -- weights -----------------------------------------------------------------------
    def copy_from(self, weights):
        """Copy trained layers, by name, from a .caffemodel, .caffemodel.h5 or zoo:NAME."""
        return self.copy_trained_layers_from(str(resolve_weights(os.fspath(weights))))

    def share_with(self, other):
        """Use ``other``'s parameter blobs (the same objects) for the layers of the same name."""
        self.share_trained_layers_with(other)

    def save_hdf5(self, path):
        """Write the weights in Caffe's HDF5 layout, whatever the file's name."""
        from brewnet.netdef.hdf5 import write_weights_hdf5

        write_weights_hdf5(self.to_proto(), os.fspath(path))

    def load_hdf5(self, path):
        """Copy trained layers from an HDF5 weights file."""
        from brewnet.netdef.hdf5 import read_weights_hdf5

        return self.copy_trained_layers_from(read_weights_hdf5(os.fspath(path)))

    def __repr__(self):
        return f"<brewnet.Net '{self.name}' {len(self.layers)} layers, inputs {self.inputs}, outputs {self.outputs}>"


# -- solvers -----------------------------------------------------------------------

class PycaffeSolver:
    """What the front door's solvers add to brewnet.solver's: they build pycaffe's Net
    (``solver.net``, ``solver.test_nets``), resolve ``zoo:NAME`` weights, and have
    pycaffe's ``lr`` and ``share_weights``."""

    net_class = Net
    resolve_weights = staticmethod(resolve_weights)

    @property
    def lr(self):
        """The learning rate of the current iteration (pycaffe's SGDSolver.lr)."""
        from brewnet.solver import lr_policy

        rate, _ = lr_policy.learning_rate(self.param, self.iter, self.current_step)
        return float(numpy.float32(rate))

    def share_weights(self, net):
        """Make ``net`` use this solver's training weights (pycaffe's share_weights)."""
        net.share_trained_layers_with(self.net)


def _front_door_solver(core_class):
    """brewnet.solver's class with PycaffeSolver's additions."""
    return type(core_class.__name__, (PycaffeSolver, core_class), {
        "__module__": __name__, "__doc__": core_class.__doc__})


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
