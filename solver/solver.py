"""Caffe's Solver: builds the train and test nets a SolverParameter names,
runs the iteration loop (test, forward/backward, display, update, snapshot)
and restores from solver states, with Caffe's exact order of operations and
its log lines (so Caffe's log parsers read brewnet logs).

The solver computes on the array module that is current when it is built
(pycaffe semantics: call ``brewnet.set_mode_gpu()`` first for GPU); the
``brewnet train`` command applies solver_mode/device_id from the file.
"""

import contextlib
import logging
import math
import os
import signal
import threading
import time

import numpy

import brewnet.netdef.upgrade  # noqa: F401  (netdef.upgrade below)
from brewnet import netdef
from brewnet.layers.kernels import backend
from brewnet.layers.kernels.cuda import ops as cuda_ops
from brewnet.netdef import caffe_pb2
from brewnet.netdef.errors import DefinitionError
from brewnet.solver import lr_policy, updates
from brewnet.solver import snapshot as snapshots
from brewnet.solver.log import RecentRate, fmt, format_eta

log = logging.getLogger("brewnet.solver")

NONE, STOP, SNAPSHOT = "none", "stop", "snapshot"
ACTIONS = (STOP, SNAPSHOT, NONE)

class SnapshotError(DefinitionError):
    """Training finished, but its final state could not be saved."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the message is one line naming the
    iteration, the first layer whose output went non-finite and the snapshot."""


# -- reading the solver file ---------------------------------------------------

def upgrade_solver_param(param, source=None):
    """Legacy ``solver_type`` enum -> ``type`` string, in place (for hand-built parameters)."""
    if netdef.upgrade.solver_needs_upgrade(param):
        netdef.upgrade_solver(param, source or "<SolverParameter>")
    return param


def read_solver_param(path):
    """The SolverParameter of a solver prototxt, upgraded like Caffe's
    ReadSolverParamsFromTextFileOrDie (including its snapshot_prefix defaults:
    unset -> the solver file's path without extension; a folder -> that
    folder plus the solver file's stem)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DefinitionError("solver file not found", path)
    return netdef.apply_default_snapshot_prefix(netdef.read_solver(path), path)


# -- signals ---------------------------------------------------------------------

class SignalHandler:
    """Caffe's SignalHandler: SIGINT/SIGHUP only set flags; the solver asks
    ``check()`` once per iteration and gets stop/snapshot/none.

    Use as a context manager around training. A second SIGINT arriving before
    the first was acted on raises KeyboardInterrupt (a way out of a stuck pass).
    """

    def __init__(self, sigint_effect=STOP, sighup_effect=SNAPSHOT):
        for name, effect in (("sigint_effect", sigint_effect), ("sighup_effect", sighup_effect)):
            if effect not in ACTIONS:
                raise DefinitionError(f"{name}: invalid signal effect '{effect}' (one of stop, snapshot, none)")
        self.effects = {signal.SIGINT: sigint_effect}
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = sighup_effect
        self.pending = {sig: False for sig in self.effects}
        self._previous = {}

    def handle(self, signum, frame=None):
        if signum == signal.SIGINT and self.pending[signum] and self.effects[signum] != NONE:
            raise KeyboardInterrupt
        self.pending[signum] = True

    def check(self):
        """The requested action since the last call (SIGHUP first, as Caffe)."""
        for sig in (getattr(signal, "SIGHUP", None), signal.SIGINT):
            if sig in self.pending and self.pending[sig]:
                self.pending[sig] = False
                return self.effects[sig]
        return NONE

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.effects:
                self._previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        return False


def local_weights_file(name):
    """One entry of a weights list as a file path. Where weights may come from
    beyond files is not the solver's business: brewnet's front door (brewnet.api)
    gives its solvers a resolver that knows the zoo's ``zoo:NAME`` too."""
    if not os.path.isfile(name):
        raise DefinitionError("weights file not found", name)
    return name


# -- the nets a solver names -----------------------------------------------------

class NetSpec:
    """One net a solver file names: its NetParameter (state set: the phase, the net file's own
    state, then the solver's train_state/test_state), where it comes from, and for test nets
    the test_iter."""

    def __init__(self, param, source, field, test_iter=None):
        self.param, self.source, self.field, self.test_iter = param, source, field, test_iter


def _read_net_file(path, field, solver_source):
    if not os.path.isfile(path):
        raise DefinitionError(f"{field}: net file '{path}' not found (relative paths are read from the "
                              f"current folder, {os.getcwd()})", solver_source)
    return netdef.read_net(path)


def _embedded_net(message):
    copy = caffe_pb2.NetParameter()
    copy.CopyFrom(message)
    return copy


def _with_state(net_param, phase, extra_state):
    state = caffe_pb2.NetState()
    state.phase = phase
    state.MergeFrom(net_param.state)
    if extra_state is not None:
        state.MergeFrom(extra_state)
    net_param.state.CopyFrom(state)
    return net_param


def train_net_spec(param, source="<SolverParameter>"):
    """The train net of a SolverParameter (Caffe's Solver::InitTrainNet), as a NetSpec."""
    fields = [f for f in ("net", "net_param", "train_net", "train_net_param") if param.HasField(f)]
    if len(fields) != 1:
        how = "none" if not fields else ", ".join(fields)
        raise DefinitionError(f"give exactly one train net with one of net, net_param, train_net, "
                              f"train_net_param (got {how})", source)
    field = fields[0]
    if field.endswith("_param"):
        net_param, net_source = _embedded_net(getattr(param, field)), f"{source} ({field})"
    else:
        path = getattr(param, field)
        net_param, net_source = _read_net_file(path, field, source), path
    return NetSpec(_with_state(net_param, caffe_pb2.TRAIN, param.train_state), net_source, field)


def test_net_specs(param, source="<SolverParameter>"):
    """The test nets of a SolverParameter (Caffe's Solver::InitTestNets), as NetSpecs."""
    p = param
    if p.HasField("net") and p.HasField("net_param"):
        raise DefinitionError("give net or net_param, not both", source)
    generic = p.HasField("net") or p.HasField("net_param")
    explicit = len(p.test_net_param) + len(p.test_net)
    if (generic and len(p.test_iter) < explicit) or (not generic and len(p.test_iter) != explicit):
        raise DefinitionError(f"test_iter must be given once per test net ({explicit} test net(s), "
                              f"{len(p.test_iter)} test_iter)", source)
    count = max(explicit, len(p.test_iter)) if generic else explicit
    if len(p.test_state) and len(p.test_state) != count:
        raise DefinitionError(f"test_state must be left out or given once per test net ({count} test net(s), "
                              f"{len(p.test_state)} test_state)", source)
    if count and p.test_interval <= 0:
        raise DefinitionError(f"test_interval must be > 0 when there are test nets (got {p.test_interval}; "
                              f"remove test_iter to train without testing)", source)
    found = []  # (net_param, source, field)
    for i, message in enumerate(p.test_net_param):
        found.append((_embedded_net(message), f"{source} (test_net_param #{i})", "test_net_param"))
    for path in p.test_net:
        found.append((_read_net_file(path, "test_net", source), path, "test_net"))
    for _ in range(count - explicit):
        if p.HasField("net_param"):
            found.append((_embedded_net(p.net_param), f"{source} (net_param)", "net_param"))
        else:
            found.append((_read_net_file(p.net, "net", source), p.net, "net"))
    specs = []
    for i, (net_param, net_source, field) in enumerate(found):
        state = p.test_state[i] if len(p.test_state) else None
        specs.append(NetSpec(_with_state(net_param, caffe_pb2.TEST, state), net_source, field, p.test_iter[i]))
    return specs


# -- the solver ------------------------------------------------------------------

class Solver:
    """Base of the Caffe solvers; subclasses give ``rule`` (see updates.py)
    and ``history_parts`` (blobs of history per learnable parameter)."""

    type = None
    history_parts = 1
    rule = None
    # one entry of a weights list -> a file (brewnet.api's solvers resolve zoo:NAME too)
    resolve_weights = staticmethod(local_weights_file)
    # the class of the nets built (None: layers.net.Net); brewnet.api's solvers build its
    # pycaffe Net, a subclass, so solver.net is the Net users construct
    net_class = None

    def __init__(self, param_or_path, source=None, xp=None, dtype=numpy.float32):
        if isinstance(param_or_path, caffe_pb2.SolverParameter):
            param = caffe_pb2.SolverParameter()
            param.CopyFrom(param_or_path)
            self.source = source or "<SolverParameter>"
            upgrade_solver_param(param, self.source)
        else:
            self.source = os.fspath(param_or_path)
            param = read_solver_param(self.source)
        self.param = param
        self.xp = xp if xp is not None else backend.get_array_module()
        self.dtype = numpy.dtype(dtype)
        self._check_param()
        self.sanity_check()
        self._check_snapshot_prefix()
        if param.random_seed >= 0:
            from brewnet.layers.net import set_random_seed

            set_random_seed(param.random_seed)
        self.net = self._init_train_net()
        self.test_nets = self._init_test_nets()
        for spec in param.weights:
            self.load_weights(spec)
        self.iter = 0
        self.current_step = 0
        self._init_history()
        self.requested_early_exit = False
        self._action_function = None
        self._losses = []
        self.smoothed_loss = 0.0
        self._loss_origin = 0  # iteration whose loss went into slot 0 of the window
        self._resume_window = None  # (losses, smoothed_loss, origin) from a resume file, for the next step()
        self.loss = None
        # On a GPU the loss stays on the device and is read at display iterations (and snapshots,
        # every max_pending_losses iterations and the end of step), all pending ones in one
        # transfer: reading it every iteration would make the host wait for the device.
        self.defer_loss = self.xp is not numpy
        self._pending_losses = []  # (iteration, [[(loss weight, device sum) per loss top] per pass])
        # Caffe's root_solver: False on MPI ranks other than 0, which neither test nor snapshot
        self.root_solver = True
        self.snapshot_failure = None  # why the last snapshot the loop asked for failed, if it did
        self.last_snapshot = None
        self._callbacks = []
        self.iteration_hooks = []  # called with the solver after each finished iteration
        log.info("Solver scaffolding done.")

    # -- parameter checks -----------------------------------------------------
    @classmethod
    def check_param(cls, param, source="<SolverParameter>"):
        """The checks a solver of this type makes of its parameters before it builds its nets
        (a DefinitionError naming ``source`` for the first problem); nothing is built or made."""
        bare = cls.__new__(cls)
        bare.param, bare.source = param, source
        bare._check_param()
        bare.sanity_check()

    def _check_param(self):
        p = self.param
        if p.average_loss < 1:
            raise DefinitionError(f"average_loss must be at least 1, got {p.average_loss}", self.source)
        if p.iter_size < 1:
            raise DefinitionError(f"iter_size must be at least 1, got {p.iter_size}", self.source)
        if p.regularization_type not in updates.REGULARIZATION_TYPES:
            raise DefinitionError(f"unknown regularization_type '{p.regularization_type}' (one of L2, L1)",
                                  self.source)
        for field, ok, expected in self._field_rules():
            value = getattr(p, field)
            if not (math.isfinite(value) and ok(value)):
                raise DefinitionError(f"{field} must be {expected}, got {fmt(value)}", self.source)
        for i, n in enumerate(p.test_iter):
            if n < 0:
                raise DefinitionError(f"test_iter #{i} must be >= 0, got {n}", self.source)
        lr_policy.check_policy(p, self.source)

    def _field_rules(self):
        """(field, check, what it must be): values that would give NaN, a math error or a run
        that cannot end (Caffe CHECKs some of them, others it computes with)."""
        rules = [("max_iter", lambda v: v >= 0, ">= 0"), ("base_lr", lambda v: v >= 0, ">= 0"),
                 ("weight_decay", lambda v: v >= 0, ">= 0"), ("display", lambda v: v >= 0, ">= 0"),
                 ("test_interval", lambda v: v >= 0, ">= 0"), ("momentum", lambda v: 0 <= v < 1, "in [0, 1)")]
        if self.type in ("AdaGrad", "RMSProp", "AdaDelta", "Adam"):
            rules.append(("delta", lambda v: v > 0, "> 0 (it keeps the update's division away from zero)"))
        if self.type == "RMSProp":
            rules.append(("rms_decay", lambda v: 0 <= v < 1, "in [0, 1)"))
        if self.type == "Adam":
            rules.append(("momentum2", lambda v: 0 <= v < 1, "in [0, 1)"))
        return rules

    def sanity_check(self):
        """Per-type restrictions (Caffe's constructor_sanity_check)."""

    def _check_snapshot_prefix(self):
        p = self.param
        if p.snapshot < 0:
            raise DefinitionError(f"snapshot must be >= 0, got {p.snapshot}", self.source)
        if not (p.snapshot or p.snapshot_after_train):
            return
        folder = os.path.dirname(p.snapshot_prefix) or "."
        if not os.path.exists(folder):
            # unlike Caffe, make the snapshot folder rather than fail on it
            try:
                os.makedirs(folder, exist_ok=True)
                log.info("Created snapshot folder %s", folder)
            except OSError:
                pass
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise DefinitionError(f"snapshot_prefix '{p.snapshot_prefix}': cannot write there; make sure the "
                                  f"folder {folder} exists and is writable", self.source)
        snapshots.check_prefix_writable(p, self.source)

    # -- building nets --------------------------------------------------------
    def _build_net(self, spec):
        from brewnet.layers.net import Net

        state = spec.param.state
        return (self.net_class or Net)(spec.param, phase=state.phase, level=state.level, stages=list(state.stage),
                                       xp=self.xp, dtype=self.dtype, source=spec.source)

    def _init_train_net(self):
        spec = train_net_spec(self.param, self.source)
        if spec.field.endswith("_param"):
            log.info("Creating training net specified in %s.", spec.field)
        else:
            log.info("Creating training net from %s file: %s", spec.field, spec.source)
        return self._build_net(spec)

    def _init_test_nets(self):
        nets = []
        for i, spec in enumerate(test_net_specs(self.param, self.source)):
            log.info("Creating test net (#%d) specified by %s", i, spec.source)
            nets.append(self._build_net(spec))
        return nets

    def load_weights(self, spec):
        """Copy trained layers from a comma-separated list of weight files
        (or ``zoo:NAME``) into the train net and every test net, logging
        which layers were copied, left to their fillers, or ignored.
        Returns {"copied", "fresh", "ignored"} (layer names) for the train net."""
        report = {"copied": [], "fresh": [], "ignored": []}
        for name in (part.strip() for part in spec.split(",")):
            if not name:
                continue
            path = self.resolve_weights(name)
            log.info("Finetuning from %s", name)
            weights = netdef.read_weights(path)  # read once, copied into every net
            for net in [self.net, *self.test_nets]:
                net.copy_trained_layers_from(weights)
            report = describe_copy(self.net, weights)
            if report["copied"]:
                log.info("Copied weights for layers: %s", ", ".join(report["copied"]))
            if report["fresh"]:
                log.info("Not in %s, so initialized by their fillers: %s", name, ", ".join(report["fresh"]))
            if report["ignored"]:
                log.info("Ignored layers of %s that this net lacks: %s", name, ", ".join(report["ignored"]))
        return report

    def _init_history(self):
        params = self.net.learnable_params
        self.history = [self.xp.zeros(p.shape, dtype=p.data.dtype)
                        for _ in range(self.history_parts) for p in params]

    # -- actions (signals) ----------------------------------------------------
    def set_action_function(self, function):
        """``function()`` -> 'stop' | 'snapshot' | 'none', asked once per iteration."""
        self._action_function = function

    def requested_action(self):
        return self._action_function() if self._action_function is not None else NONE

    def add_callback(self, on_start=None, on_gradients_ready=None):
        """pycaffe's add_callback: called before each iteration's passes and before each update."""
        self._callbacks.append((on_start, on_gradients_ready))

    # -- the loop -------------------------------------------------------------
    def _update_smoothed_loss(self, loss, iteration=None):
        average = self.param.average_loss
        if len(self._losses) < average:
            self._losses.append(loss)
            size = len(self._losses)
            self.smoothed_loss = (self.smoothed_loss * (size - 1) + loss) / size
        else:
            slot = ((self.iter if iteration is None else iteration) - self._loss_origin) % average
            self.smoothed_loss += (loss - self._losses[slot]) / average
            self._losses[slot] = loss

    def step(self, iters):
        """Run ``iters`` iterations (Caffe's Solver::Step)."""
        p = self.param
        start_iter = self.iter
        stop_iter = self.iter + int(iters)
        self._losses, self.smoothed_loss, self._loss_origin = [], 0.0, start_iter
        if self._resume_window is not None:  # a restored run: its window goes on
            self._losses, self.smoothed_loss, self._loss_origin = self._resume_window
            self._resume_window = None
        timer = time.monotonic()
        last_iter = self.iter
        recent = RecentRate(window=60.0)  # the ETA's rate: display points of the last minute
        recent.add(self.iter, timer)
        while self.iter < stop_iter:
            self.net.clear_param_diffs(lazy=True)
            if p.test_interval and self.iter % p.test_interval == 0 and (self.iter > 0 or p.test_initialization):
                self.test_all()
                if self.requested_early_exit:
                    break
            for on_start, _ in self._callbacks:
                if on_start is not None:
                    on_start()
            display = bool(p.display) and self.iter % p.display == 0
            if self.defer_loss:
                self._pending_losses.append((self.iter, self._passes_on_device()))
                if display or len(self._pending_losses) >= self.max_pending_losses:
                    self.read_losses()
            else:
                loss = 0.0
                for _ in range(p.iter_size):
                    pass_loss = self.net.forward_backward()
                    if not math.isfinite(pass_loss):
                        self._diverged(pass_loss)
                    loss += pass_loss
                loss /= p.iter_size
                self.loss = loss  # this iteration's loss (mean over iter_size passes)
                self._update_smoothed_loss(loss)
            if display:
                now = time.monotonic()
                lapse = now - timer
                per_s = (self.iter - last_iter) / (lapse if lapse else 1)
                log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s", self.iter, fmt(per_s), fmt(lapse),
                         p.display, fmt(self.smoothed_loss))
                timer, last_iter = now, self.iter
                self._log_outputs(self.net, "Train")
                recent.add(self.iter, now)
                eta = recent.eta(stop_iter - self.iter)
                if eta is not None:
                    # a line of its own: Caffe's log parsers read the display line by its fields
                    log.info("    ETA %s: %d iterations to go at %s iter/s", format_eta(eta), stop_iter - self.iter,
                             fmt(recent.rate()))
            for _, on_gradients_ready in self._callbacks:
                if on_gradients_ready is not None:
                    on_gradients_ready()
            self.apply_update()
            request = self.requested_action()
            if (p.snapshot and self.iter % p.snapshot == 0) or request == SNAPSHOT:
                self.read_losses()  # the snapshot's resume file holds the loss window
                self._snapshot_or_carry_on()
            for hook in self.iteration_hooks:
                hook(self)
            if request == STOP:
                self.requested_early_exit = True
                break
        self.read_losses()

    # iterations whose losses may wait on the device when display is off or far apart
    max_pending_losses = 100

    def _passes_on_device(self):
        """One iteration's forward/backward passes, their losses left on the device."""
        passes = []
        try:
            for _ in range(self.param.iter_size):
                self.net.loss_terms = []
                self.net.forward_backward()
                passes.append(self.net.loss_terms)
        finally:
            self.net.loss_terms = None
        return passes

    def read_losses(self):
        """Bring the pending iterations' losses to the host (one transfer) and account for them
        as the per-iteration path does: divergence check, self.loss, the smoothed window."""
        pending, self._pending_losses = self._pending_losses, []
        cuda_ops.run_deferred_checks()  # bad labels the kernels flagged meanwhile
        sums = [value for _, passes in pending for terms in passes for _, value in terms]
        values = iter(backend.to_numpy(self.xp.stack(sums)).tolist() if sums else [])
        for iteration, passes in pending:
            loss = 0.0
            for terms in passes:
                pass_loss = 0.0
                for weight, _ in terms:
                    pass_loss += weight * float(next(values))
                if not math.isfinite(pass_loss):
                    self._diverged(pass_loss, iteration)
                loss += pass_loss
            loss /= self.param.iter_size
            self.loss = loss
            self._update_smoothed_loss(loss, iteration)

    def _log_outputs(self, net, kind):
        index = 0
        for name in net.outputs:
            weight = float(net.blob_loss_weights.get(name, 0.0))
            for value in backend.to_numpy(net.blobs[name].data).ravel():
                note = f" (* {fmt(weight)} = {fmt(weight * value)} loss)" if weight else ""
                log.info("    %s net output #%d: %s = %s%s", kind, index, name, fmt(value), note)
                index += 1

    def _diverged(self, loss, iteration=None):
        where, at = "", self.iter
        if iteration is not None:
            # read late (deferred): the weights have taken later steps since, so no snapshot of them
            where, at = f" (read at iteration {self.iter}; no snapshot saved)", iteration
        first = self.net.first_nonfinite() if hasattr(self.net, "first_nonfinite") and iteration is None else None
        if first:
            layer, blob = first
            where = f"; first non-finite output: layer '{layer}' (top '{blob}')"
        saved = ""
        if self.param.snapshot_prefix and self.root_solver and iteration is None:
            try:
                model_path, _ = self.snapshot()
                saved = f"; state before this iteration saved as {model_path}"
            except OSError as exc:
                saved = f"; could not save a snapshot: {exc}"
        raise TrainingDivergedError(f"training diverged: loss = {fmt(loss)} at iteration {at} of "
                                    f"{self.net.name or 'the train net'}{where}{saved} (try a lower base_lr or "
                                    f"clip_gradients)")

    def apply_update(self):
        """Learning rate, clipping, then per parameter normalize/regularize/rule; net.update(); ++iter."""
        p, xp = self.param, self.xp
        rate, self.current_step = lr_policy.learning_rate(p, self.iter, self.current_step)
        rate = float(numpy.float32(rate))
        if p.display and self.iter % p.display == 0:
            log.info("Iteration %d, lr = %s", self.iter, fmt(rate))
        params = self.net.learnable_params
        clipped = updates.clip_gradients([b.diff for b in params], p.clip_gradients, xp)
        if clipped:
            norm, scale = clipped
            log.info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale factor %s", fmt(norm),
                     fmt(p.clip_gradients), fmt(scale))
        count = len(params)
        lrs, decays = self.net.params_lr, self.net.params_weight_decay
        from brewnet.layers.net import Net

        if self._cuda_rule(params, Net):  # BREWNET_CUDA_KERNELS: one kernel per parameter does it all
            for i, blob in enumerate(params):
                cuda_ops.apply_step(xp, self._cuda_rule_name, blob.data, blob.diff, self.history[i::count],
                                    p.iter_size, p.weight_decay * decays[i], p.regularization_type, rate * lrs[i],
                                    p, self.iter)
            self.iter += 1
            return

        # plain SGD with L2 on host arrays: regularize, rule and update in one cache-blocked sweep
        # per parameter instead of eight passes over memory (parameters never alias: unique owners)
        fused = (type(self).rule is updates.sgd and p.regularization_type == "L2"
                 and type(self.net).update is Net.update
                 and all(type(b.data) is numpy.ndarray and b.data.flags.c_contiguous for b in params))
        for i, blob in enumerate(params):
            diff = blob.diff
            updates.normalize(diff, p.iter_size)
            decay = p.weight_decay * decays[i]
            if fused and updates.sgd_l2_fused(diff, blob.data, self.history[i], decay, rate * lrs[i],
                                              p.momentum, self._fused_scratch(), apply=True):
                continue
            updates.regularize(diff, blob.data, decay, p.regularization_type, xp)
            type(self).rule(diff, self.history[i::count], rate * lrs[i], p, self.iter, xp)
            if fused:
                blob.data -= diff  # Net.update for this one: the fused ones applied theirs
        if not fused:
            self.net.update()
        self.iter += 1

    @property
    def _cuda_rule_name(self):
        """The name of this solver's rule in solver/updates.py (None for a rule of a user's own)."""
        name = getattr(type(self).rule, "__name__", None)
        return name if getattr(updates, name or "", None) is type(self).rule else None

    def _cuda_rule(self, params, net_class):
        """Whether this step runs as CUDA kernels (switch on, a known rule, float32, Net's own update)."""
        arrays = [a for b in params for a in (b.data, b.diff)] + list(self.history)
        return (cuda_ops.active(self.xp, *arrays) and type(self.net).update is net_class.update
                and self._cuda_rule_name in cuda_ops.RULES and self.param.regularization_type in ("L1", "L2"))

    def _fused_scratch(self):
        scratch = getattr(self, "_scratch", None)
        if scratch is None:
            scratch = self._scratch = numpy.empty(updates.FUSED_BLOCK, dtype=self.dtype)
        return scratch

    def solve(self, resume_file=None):
        """Train to max_iter (Caffe's Solver::Solve)."""
        p = self.param
        log.info("Solving %s", self.net.name)
        log.info("Learning Rate Policy: %s", p.lr_policy)
        self.requested_early_exit = False
        writes = self.root_solver and (p.snapshot or p.snapshot_after_train)
        guard = snapshots.prefix_lock(p) if writes else contextlib.nullcontext()
        with guard:
            self._solve(resume_file)

    def _solve(self, resume_file):
        p = self.param
        if resume_file:
            log.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        self.step(p.max_iter - self.iter)
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self._snapshot_or_carry_on()
        if self.snapshot_failure:
            raise SnapshotError(f"training ended but its last snapshot could not be written "
                                f"({self.snapshot_failure}); the last one saved is "
                                f"{self.last_snapshot or 'none'}")
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            loss = self.net.forward_from_to()
            self._update_smoothed_loss(loss)
            log.info("Iteration %d, loss = %s", self.iter, fmt(self.smoothed_loss))
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.")

    # -- testing --------------------------------------------------------------
    def test_all(self):
        if not self.root_solver:
            return
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            self.test(i)

    def test(self, test_net_id=0):
        """Average each test-net output over test_iter batches and log them; returns {name: [values]}."""
        p = self.param
        log.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        net = self.test_nets[test_net_id]
        net.share_trained_layers_with(self.net)
        batches = p.test_iter[test_net_id]
        totals = None
        loss = 0.0
        for _ in range(batches):
            request = self.requested_action()
            while request != NONE:
                if request == SNAPSHOT:
                    self._snapshot_or_carry_on()
                elif request == STOP:
                    self.requested_early_exit = True
                request = self.requested_action()
            if self.requested_early_exit:
                break
            batch_loss = net.forward_from_to()
            if p.test_compute_loss:
                loss += batch_loss
            values = [backend.to_numpy(net.blobs[name].data).astype(numpy.float64).ravel() for name in net.outputs]
            self._check_test_outputs(net, test_net_id, values)
            totals = values if totals is None else [t + v for t, v in zip(totals, values)]
        if self.requested_early_exit:
            log.info("Test interrupted.")
            return None
        if p.test_compute_loss:
            log.info("Test loss: %s", fmt(loss / batches))
        results = {}
        index = 0
        for name, total in zip(net.outputs, totals or []):
            weight = float(net.blob_loss_weights.get(name, 0.0))
            means = total / batches
            results[name] = means
            for mean in means:
                note = f" (* {fmt(weight)} = {fmt(weight * mean)} loss)" if weight else ""
                log.info("    Test net output #%d: %s = %s%s", index, name, fmt(mean), note)
                index += 1
        return results

    def _check_test_outputs(self, net, test_net_id, values):
        """A NaN or inf in a test output ends the run: averaging it would only print 'nan'."""
        bad = [name for name, vals in zip(net.outputs, values) if not numpy.isfinite(vals).all()]
        if not bad:
            return
        broken = self.net.nonfinite_params()
        cause = f"the weights of {', '.join(broken)} are not finite" if broken else "NaN or inf in the test data?"
        raise TrainingDivergedError(f"test net #{test_net_id} output {bad[0]} is not finite at iteration "
                                    f"{self.iter} ({cause}){net.nonfinite_note()}")

    # -- snapshots ------------------------------------------------------------
    def _snapshot_or_carry_on(self):
        """A snapshot the loop asked for: when it cannot be written (disk full, folder
        gone), training goes on with its state in memory and the next snapshot tries again."""
        if not self.root_solver:
            return
        try:
            model_path, _ = self.snapshot()
        except OSError as exc:
            self.snapshot_failure = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
            log.error("Snapshot at iteration %d failed (%s); training goes on and the next snapshot tries again",
                      self.iter, self.snapshot_failure)
            return
        self.snapshot_failure, self.last_snapshot = None, model_path

    def snapshot(self):
        """Write PREFIX_iter_N.caffemodel and .solverstate (or .h5); returns both paths."""
        p = self.param
        with snapshots.prefix_lock(p):
            return self._write_snapshot(p)

    def _write_snapshot(self, p):
        model_path, state_path = snapshots.filenames(p, self.iter)
        hdf5 = p.snapshot_format == caffe_pb2.SolverParameter.HDF5
        log.info("Snapshotting to %s %s", "HDF5 file" if hdf5 else "binary proto file", model_path)
        netdef.write_weights(self.net.to_proto(write_diff=p.snapshot_diff), model_path)
        state = snapshots.build_state(self.iter, model_path, self.current_step, self.history)
        log.info("Snapshotting solver state to %s %s", "HDF5 file" if hdf5 else "binary proto file", state_path)
        snapshots.write_state_with_resume(state, state_path, self.resume_state())
        return model_path, state_path

    def resume_state(self):
        """What a snapshot needs beyond Caffe's files to continue exactly (JSON-able)."""
        return {"iter": int(self.iter),
                "train_net": self.net.resume_state(),
                "test_nets": [net.resume_state() for net in self.test_nets],
                "smoothed_loss": {"losses": [float(v) for v in self._losses], "value": float(self.smoothed_loss),
                                  "origin": int(self._loss_origin)}}

    def restore_resume_state(self, saved, source="<resume state>"):
        """Apply ``resume_state()``'s result: data positions, random states, loss window."""
        if len(saved["test_nets"]) != len(self.test_nets):
            log.warning("%s: saved %d test net(s), this solver has %d: restoring those present",
                        source, len(saved["test_nets"]), len(self.test_nets))
        missing = self.net.restore_resume_state(saved["train_net"])
        for net, states in zip(self.test_nets, saved["test_nets"]):
            missing += net.restore_resume_state(states)
        if missing:
            log.warning("%s: no layer named %s in this net: its saved state is dropped", source,
                        ", ".join(sorted(set(missing))))
        window = saved["smoothed_loss"]
        losses = [float(v) for v in window["losses"]]
        if len(losses) <= self.param.average_loss:  # else average_loss shrank: start a new window, as Caffe
            self._resume_window = (losses, float(window["value"]), int(window["origin"]))

    def restore(self, state_file):
        """Load iter, current_step, history and the learned_net weights of a
        .solverstate (binary or .h5), ours or real Caffe's."""
        state_file = os.fspath(state_file)
        state = snapshots.read_state(state_file)
        self.iter = state.iter
        if state.HasField("learned_net") and state.learned_net:
            self.net.copy_trained_layers_from(snapshots.resolve_learned_net(state.learned_net, state_file))
        self.current_step = state.current_step
        if len(state.history) != len(self.history):
            raise DefinitionError(f"holds {len(state.history)} history blobs but this {self.type} solver on this net "
                                  f"needs {len(self.history)} (written by another solver type or net?)", state_file)
        log.info("%sSolver: restoring history", self.type)
        for i, (target, blob) in enumerate(zip(self.history, state.history)):
            array = netdef.blob_to_array(blob)
            if array.size != target.size:
                raise DefinitionError(f"history blob #{i} has shape {tuple(array.shape)}, the parameter has "
                                      f"{tuple(target.shape)}", state_file)
            target[...] = self.xp.asarray(array.reshape(target.shape), dtype=target.dtype)
        self._resume_window = None
        saved = snapshots.read_resume(state_file)
        sidecar = snapshots.resume_filename(state_file)
        inexact = "resuming inexactly: data layers start from the beginning, as in Caffe, and random draws " \
                  "differ from the uninterrupted run"
        if saved is None:
            log.warning("No %s beside %s (a Caffe solver state, or a run killed while snapshotting): %s",
                        snapshots.RESUME_SUFFIX, state_file, inexact)
            return
        if saved.get("iter") != state.iter:
            log.warning("%s is for iteration %s, the state for %d: %s", sidecar, saved.get("iter"), state.iter,
                        inexact)
            return
        if not snapshots.resume_matches(state_file, saved):
            log.warning("%s was written with another %s (another run, or a kill while snapshotting): %s", sidecar,
                        os.path.basename(state_file), inexact)
            return
        log.info("Restoring data positions and random states from %s", sidecar)
        try:
            self.restore_resume_state(saved, sidecar)
        except DefinitionError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise DefinitionError(f"malformed resume file ({type(exc).__name__}: {exc}); delete it to resume as "
                                  "Caffe does", sidecar) from None


def describe_copy(net, weights):
    """Which layers of ``net`` with parameters a NetParameter of weights covers."""
    source = {layer.name for layer in weights.layer if len(layer.blobs)}
    with_params = [name for name, layer in zip(net.layer_names, net.layers) if layer.blobs]
    return {"copied": [n for n in with_params if n in source],
            "fresh": [n for n in with_params if n not in source],
            "ignored": [layer.name for layer in weights.layer
                        if len(layer.blobs) and layer.name not in set(net.layer_names)]}


# -- the solver types ------------------------------------------------------------

class SGDSolver(Solver):
    type = "SGD"
    rule = staticmethod(updates.sgd)


class NesterovSolver(SGDSolver):
    type = "Nesterov"
    rule = staticmethod(updates.nesterov)


class AdaGradSolver(SGDSolver):
    type = "AdaGrad"
    rule = staticmethod(updates.adagrad)

    def sanity_check(self):
        if self.param.momentum != 0:
            raise DefinitionError("momentum cannot be used with AdaGrad (remove it)", self.source)


class RMSPropSolver(SGDSolver):
    type = "RMSProp"
    rule = staticmethod(updates.rmsprop)

    def sanity_check(self):
        if self.param.momentum != 0:
            raise DefinitionError("momentum cannot be used with RMSProp (remove it; rms_decay is its decay)",
                                  self.source)
        if not 0 <= self.param.rms_decay < 1:
            raise DefinitionError(f"rms_decay must be in [0, 1), got {self.param.rms_decay:g}", self.source)


class AdaDeltaSolver(SGDSolver):
    type = "AdaDelta"
    history_parts = 2  # gradient and update averages; Caffe stores the second after the first
    rule = staticmethod(updates.adadelta)


class AdamSolver(SGDSolver):
    type = "Adam"
    history_parts = 2  # first and second moments, in that order
    rule = staticmethod(updates.adam)


SOLVER_TYPES = {cls.type: cls for cls in (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver,
                                          AdaDeltaSolver, AdamSolver)}


def get_solver(path_or_param, solver_types=None, **kwargs):
    """The solver the ``type`` field names (default SGD), like caffe.get_solver;
    ``solver_types`` maps type names to the classes to build (SOLVER_TYPES)."""
    if isinstance(path_or_param, caffe_pb2.SolverParameter):
        param = upgrade_solver_param(_copy(path_or_param), kwargs.get("source"))
        source = kwargs.pop("source", None) or "<SolverParameter>"
    else:
        source = os.fspath(path_or_param)
        param = read_solver_param(source)
    cls = (solver_types or SOLVER_TYPES).get(param.type)
    if cls is None:
        raise DefinitionError(f"type: unknown solver type '{param.type}' (one of {', '.join(SOLVER_TYPES)})", source)
    return cls(param, source=source, **kwargs)


def _copy(param):
    copy = caffe_pb2.SolverParameter()
    copy.CopyFrom(param)
    return copy
