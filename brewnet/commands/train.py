"""`brewnet train`, `brewnet test` and `brewnet device`: Caffe's `caffe train`,
`caffe test` and `caffe device_query`, with Caffe's log lines on stderr."""

import contextlib
import io
import logging
import os
import platform
import sys

import click

from brewnet.netdef.errors import DefinitionError

log = logging.getLogger("brewnet.train")

EFFECTS = ("stop", "snapshot", "none")


def _stages(values):
    """--stage may repeat and may hold a comma-separated list (Caffe's form)."""
    return [s.strip() for value in values for s in value.split(",") if s.strip()]


def _gpu_ids(flag):
    """Device ids from --gpu: one id, a comma list, or 'all'."""
    from brewnet.layers.kernels import backend

    if flag == "all":
        cupy = backend.get_array_module("gpu")  # DeviceError when there is no GPU
        return list(range(cupy.cuda.runtime.getDeviceCount()))
    try:
        ids = [int(part) for part in flag.split(",") if part.strip()]
    except ValueError:
        raise DefinitionError(f"--gpu: expected a device id, a comma-separated list of ids or 'all', got '{flag}'")
    if not ids:
        raise DefinitionError("--gpu: no device id given")
    return ids


def _use_gpu(flag, local_rank=None):
    """Switch to GPU mode on the device --gpu names (fails with DeviceError when impossible).
    Under MPI (``local_rank`` given) each rank of a node takes the next id of the list:
    `--gpu 0,1` gives two ranks a GPU each, `--gpu 0` has them share GPU 0."""
    from brewnet.layers.kernels import backend

    ids = _gpu_ids(flag)
    if local_rank is not None:
        backend.set_mode_gpu()
        backend.set_device(ids[local_rank % len(ids)])
        log.info("Using GPU %d (local rank %d)", ids[local_rank % len(ids)], local_rank)
        return
    if len(ids) > 1:
        if flag != "all":
            raise DefinitionError(f"--gpu {flag} with --ranks 1: one process trains on one GPU")
        log.warning("brewnet trains on one GPU: using GPU %d of %d", ids[0], len(ids))
    backend.set_mode_gpu()
    backend.set_device(ids[0])
    log.info("Using GPU %d", ids[0])


def select_device(gpu_flag, solver_param=None, local_rank=None):
    """Caffe's rule: --gpu wins; otherwise a solver file that says solver_mode: GPU
    (explicitly) trains on its device_id; otherwise CPU. Unlike Caffe, a GPU asked
    for only by the file falls back to CPU with a warning when none is usable."""
    from brewnet.layers.kernels import backend
    from brewnet.netdef import caffe_pb2

    if gpu_flag:
        _use_gpu(gpu_flag, local_rank)
        return
    if (solver_param is not None and solver_param.HasField("solver_mode")
            and solver_param.solver_mode == caffe_pb2.SolverParameter.GPU):
        try:
            backend.set_mode_gpu()
            backend.set_device(solver_param.device_id)
            log.info("Using GPU %d (solver_mode: GPU)", solver_param.device_id)
            return
        except backend.DeviceError as exc:
            log.warning("solver_mode GPU requested but no GPU is available; running on CPU (%s)", exc)
    backend.set_mode_cpu()
    log.info("Use CPU.")


def _fail(message):
    click.echo(f"brewnet: error: {message}", err=True)
    sys.exit(1)


@click.command("train")
@click.option("--solver", "solver_path", required=True, metavar="SOLVER.prototxt",
              help="The solver definition (Caffe's SolverParameter text format).")
@click.option("--weights", metavar="W[,W2...]",
              help="Weights to finetune from (.caffemodel, .caffemodel.h5 or zoo:NAME); comma-separated files "
                   "are copied in order. Not with --snapshot.")
@click.option("--snapshot", metavar="S.solverstate", help="Resume training from a solver state. Not with --weights.")
@click.option("--gpu", metavar="ID[,ID...]|all",
              help="Train on this GPU (needs cupy: pip install 'brewnet[gpu]'); fails when it cannot. Several ids "
                   "or 'all' (Caffe's -gpu 0,1 / -gpu all) start one rank per GPU under mpiexec (needs "
                   "pip install 'brewnet[mpi]'; batch_size is per GPU). Without it, "
                   "solver_mode: GPU in the solver file selects device_id, falling back to CPU with a warning "
                   "when no GPU is usable; an unset solver_mode trains on CPU, as `caffe train` does.")
@click.option("--ranks", type=int, default=None, metavar="N",
              help="Start N data-parallel ranks under mpiexec (CPU ranks, or ranks sharing the --gpu list: "
                   "--ranks 2 --gpu 0 puts two ranks on GPU 0); batch_size is per rank. See docs/PARALLEL.md.")
@click.option("--stage", "stages", multiple=True, metavar="STAGE",
              help="Add a stage to the train net's state (repeatable, or comma-separated).")
@click.option("--level", type=int, default=None, help="The train net's level.")
@click.option("--sigint-effect", type=click.Choice(EFFECTS), default="stop", show_default=True,
              help="What Ctrl-C does: stop after the current iteration (writing the final snapshot when "
                   "snapshot_after_train), snapshot and continue, or nothing. A second Ctrl-C aborts.")
@click.option("--sighup-effect", type=click.Choice(EFFECTS), default="snapshot", show_default=True,
              help="What SIGHUP does.")
@click.option("--log", "log_path", metavar="FILE",
              help="Also write the log to FILE (appended). Default: PREFIX.<date>-<time>.<pid>.log beside the "
                   "snapshots (snapshot_prefix), with the link PREFIX.INFO to the newest; 'none': no file.")
@click.option("--tensorboard", "tensorboard_dir", metavar="DIR",
              help="Write the losses, outputs and learning rate as TensorBoard scalars to DIR as they are logged "
                   "(needs tensorboardX: pip install 'brewnet[tensorboard]').")
@click.option("--mpi", "use_mpi", is_flag=True,
              help="Data-parallel training over MPI (needs pip install 'brewnet[mpi]'); implied when an MPI "
                   "launcher (mpiexec, srun) started this process. Each of N ranks reads every N-th record of "
                   "each global batch, so batch_size is per rank. See docs/PARALLEL.md.")
def train(solver_path, weights, snapshot, gpu, ranks, stages, level, sigint_effect, sighup_effect, log_path,
          tensorboard_dir, use_mpi):
    """Train or finetune a net from a solver prototxt (like `caffe train`).

    Log lines match Caffe's (Iteration N, loss = ...; Train/Test net output #k: ...),
    so Caffe's log parsers and `brewnet parse-log`/`brewnet plot` read them; the same
    lines go to a log file (--log). A progress line shows on terminals.
    """
    from brewnet.solver import mpi

    if not (use_mpi or mpi.launched()):
        args = dict(solver=solver_path, weights=weights, snapshot=snapshot, stage=list(stages), level=level,
                    sigint_effect=sigint_effect, sighup_effect=sighup_effect, log=log_path,
                    tensorboard=tensorboard_dir)
        _launch_ranks_if_asked(gpu, ranks, args)
        _train_command(solver_path, weights, snapshot, gpu, stages, level, sigint_effect, sighup_effect, log_path,
                       tensorboard_dir, None)
        return
    world = mpi.init()
    try:
        if ranks is not None and ranks != world.size and world.root:  # one line, from rank 0
            raise DefinitionError(f"--ranks {ranks}, but the MPI launcher started {world.size} rank(s)")
        _train_command(solver_path, weights, snapshot, gpu, stages, level, sigint_effect, sighup_effect, log_path,
                       tensorboard_dir, world)
    except SystemExit as exc:
        if exc.code not in (None, 0):  # its message is out already
            world.abort(1)
        raise
    except BaseException as exc:  # any rank's failure ends every rank now, not at the next Allreduce (a hang)
        message = str(exc) if isinstance(exc, DefinitionError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, OSError) and exc.filename and exc.strerror:
            message = f"{exc.filename}: {exc.strerror}"
        click.echo(f"brewnet: error: rank {world.rank}: {message}", err=True)
        world.abort(1)


def _launch_ranks_if_asked(gpu, ranks, args):
    """With several GPUs (--gpu 0,1 / all) or --ranks N > 1: run this training as N ranks under
    mpiexec (brewnet/launch.py), one per GPU of the list, and exit with its status."""
    from brewnet import launch

    ids = _gpu_ids(gpu) if gpu else None
    count = launch.rank_count(ids, ranks)
    if count == 1:
        return
    if ids:  # say it here, once, rather than from every rank
        from brewnet.layers.kernels import backend

        visible = backend.get_array_module("gpu").cuda.runtime.getDeviceCount()  # DeviceError without a GPU
        missing = [i for i in ids if not 0 <= i < visible]
        if missing:
            raise DefinitionError(f"--gpu {gpu}: GPU {missing[0]} does not exist: {visible} CUDA device(s) visible")
    launch.check_mpi4py()
    mpiexec = launch.find_mpiexec()
    forwarded = []
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            if item is not None:
                forwarded += [flag, str(item)]
    if ids:
        forwarded += ["--gpu", ",".join(str(i) for i in ids)]
    argv = launch.command(mpiexec, count, forwarded)
    click.echo(f"brewnet: starting {count} ranks: {' '.join(argv)}", err=True)
    sys.exit(launch.run(argv, env=launch.rank_environment(count)))


def _train_command(solver_path, weights, snapshot, gpu, stages, level, sigint_effect, sighup_effect, log_path,
                   tensorboard_dir, world):
    from brewnet.solver import TrainingDivergedError, read_solver_param
    from brewnet.solver.log import setup_logging

    log_level = logging.INFO if world is None or world.root else logging.WARNING
    setup_logging(level=log_level, stream=sys.stderr)
    if weights and snapshot:
        raise DefinitionError("give --snapshot to resume training or --weights to finetune, not both")
    param = read_solver_param(solver_path)
    if world is not None and not world.root:  # rank 0 alone writes snapshots, logs and scalars
        param.snapshot, param.snapshot_after_train = 0, False
        log_path, tensorboard_dir = "none", None
    try:
        with _log_outputs(param, log_path, tensorboard_dir):
            _train(solver_path, param, weights, snapshot, gpu, stages, level, sigint_effect, sighup_effect, world,
                   log_level)
    except TrainingDivergedError as exc:
        _fail(str(exc))


@contextlib.contextmanager
def _log_outputs(param, log_path, tensorboard_dir):
    """The log file and TensorBoard writer of a training, for its duration."""
    from brewnet.solver.log import add_log_file, default_log_path, link_latest_log, remove_log_file

    handlers = []
    logger = logging.getLogger("brewnet")
    try:
        if tensorboard_dir:
            from brewnet.commands.logs import LiveScalars

            live = LiveScalars(tensorboard_dir)
            logger.addHandler(live)
            handlers.append(live)
        if log_path is None:
            path = default_log_path(param.snapshot_prefix)
            try:
                handlers.append(add_log_file(path))
            except (OSError, ValueError) as exc:
                if not (param.snapshot or param.snapshot_after_train):  # else the snapshot check says why, in one line
                    log.warning("no log file (%s: %s)", path, getattr(exc, "strerror", None) or exc)
            else:
                link_latest_log(path, f"{param.snapshot_prefix}.INFO")
        elif log_path.lower() != "none":
            try:
                handlers.append(add_log_file(log_path))
            except (OSError, ValueError) as exc:
                raise DefinitionError(f"--log: cannot write the log file "
                                      f"({getattr(exc, 'strerror', None) or exc})", log_path) from None
        yield
    except Exception as exc:
        # the console gets the one-line error from the command; the log file gets it too
        record = logging.LogRecord("brewnet.train", logging.ERROR, __file__, 0, "%s", (exc,), None)
        for handler in handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        raise
    finally:
        for handler in reversed(handlers):
            if isinstance(handler, logging.FileHandler):
                remove_log_file(handler)
            else:
                logger.removeHandler(handler)
                handler.close()


def _train(solver_path, param, weights, snapshot, gpu, stages, level, sigint_effect, sighup_effect, world=None,
           log_level=logging.INFO):
    import numpy

    from brewnet.api import get_solver
    from brewnet.solver import SignalHandler
    from brewnet.solver.log import Progress, setup_logging

    handler = setup_logging(level=log_level, stream=sys.stderr)
    if level is not None:
        param.train_state.level = level
    param.train_state.stage.extend(_stages(stages))
    select_device(gpu, param, world.local_rank if world is not None else None)
    if snapshot:
        if not os.path.isfile(snapshot):
            raise DefinitionError("--snapshot: solver state file not found", snapshot)
        param.ClearField("weights")
    elif weights:
        param.ClearField("weights")
        param.weights.append(weights)

    if world is not None:
        if param.random_seed < 0:  # every rank must draw the same shuffles and fillers
            param.random_seed = world.comm.bcast(int(numpy.random.SeedSequence().entropy % 2**31)
                                                 if world.root else None, root=0)
    with SignalHandler(sigint_effect, sighup_effect) as signals, _usr1_as_sighup(signals, world):
        solver = get_solver(param, source=solver_path)
        solver.set_action_function(signals.check)
        parallel = None
        if world is not None:
            from brewnet.solver.mpi import DataParallel

            parallel = DataParallel(world, solver)
        progress = Progress(sys.stderr if world is None or world.root else io.StringIO())  # not a terminal: silent
        handler.progress = progress
        solver.iteration_hooks.append(lambda s: progress.update(s.iter))
        try:
            if snapshot:
                log.info("Resuming from %s", snapshot)
                solver.restore(snapshot)
            if parallel is not None:
                parallel.broadcast_parameters()
            progress.start(solver.iter, param.max_iter)
            log.info("Starting Optimization")
            # numpy's overflow warnings would only precede our own divergence message
            with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
                solver.solve()
        finally:
            progress.close()
            handler.progress = None


@contextlib.contextmanager
def _usr1_as_sighup(signals, world):
    """Under MPI, SIGUSR1 acts as SIGHUP: MPICH's mpiexec passes SIGUSR1 on to the ranks but ends
    itself on SIGHUP (brewnet's own launcher turns its SIGHUP into SIGUSR1)."""
    import signal
    import threading

    usable = (world is not None and hasattr(signal, "SIGUSR1") and hasattr(signal, "SIGHUP")
              and threading.current_thread() is threading.main_thread())
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: signals.handle(signal.SIGHUP)) if usable else None
    try:
        yield
    finally:
        if usable:
            signal.signal(signal.SIGUSR1, previous)


@click.command("test")
@click.option("--model", required=True, metavar="NET.prototxt", help="The net to score (built in the TEST phase).")
@click.option("--weights", required=True, metavar="W.caffemodel", help="Its weights (.caffemodel, .h5 or zoo:NAME).")
@click.option("--iterations", type=int, default=50, show_default=True, help="Batches to run.")
@click.option("--gpu", metavar="ID", help="Run on this GPU (needs cupy); CPU otherwise.")
@click.option("--stage", "stages", multiple=True, metavar="STAGE", help="Net stage (repeatable or comma-separated).")
@click.option("--level", type=int, default=0, show_default=True, help="Net level.")
def test(model, weights, iterations, gpu, stages, level):
    """Score a trained net over N batches (like `caffe test`): per-batch outputs,
    then each output averaged."""
    import numpy

    from brewnet.api import resolve_model, resolve_weights
    from brewnet.layers.kernels.backend import to_numpy
    from brewnet.layers.net import Net
    from brewnet.netdef import caffe_pb2
    from brewnet.solver.log import fmt, setup_logging

    setup_logging(stream=sys.stderr)
    if iterations < 1:
        raise DefinitionError(f"--iterations must be at least 1, got {iterations}")
    select_device(gpu)
    model = resolve_model(model)
    if not os.path.isfile(model):
        raise DefinitionError("--model: net file not found", model)
    net = Net(model, phase=caffe_pb2.TEST, level=level, stages=_stages(stages), source=model)
    weights = resolve_weights(weights)
    net.copy_trained_layers_from(weights)
    broken = net.nonfinite_params()
    if broken:  # a score from them means nothing (NaN weights can even give accuracy 1)
        raise DefinitionError(f"the weights of layer(s) {', '.join(broken)} hold NaN or inf values", weights)
    _warn_repeated_data(net, iterations)
    log.info("Running for %d iterations.", iterations)
    totals = None
    loss = 0.0
    for i in range(iterations):
        loss += net.forward()
        values = [to_numpy(net.blobs[name].data).astype("float64").ravel() for name in net.outputs]
        for name, vals in zip(net.outputs, values):
            for v in vals:
                log.info("Batch %d, %s = %s", i, name, fmt(v))
        bad = [name for name, vals in zip(net.outputs, values) if not numpy.isfinite(vals).all()]
        if bad:
            raise DefinitionError(f"batch {i}: output {bad[0]} is not finite (NaN or inf in the test data?)"
                                  f"{net.nonfinite_note()}", model)
        totals = values if totals is None else [t + v for t, v in zip(totals, values)]
    log.info("Loss: %s", fmt(loss / iterations))
    for name, total in zip(net.outputs, totals or []):
        weight = float(net.blob_loss_weights.get(name, 0.0))
        for mean in total / iterations:
            note = f" (* {fmt(weight)} = {fmt(weight * mean)} loss)" if weight else ""
            log.info("%s = %s%s", name, fmt(mean), note)


def _warn_repeated_data(net, iterations):
    """Say so when the iterations asked for read a data source more than once over."""
    for name, layer, tops in zip(net.layer_names, net.layers, net.top_vecs):
        try:
            size = getattr(layer, "epoch_size", None)
        except (OSError, KeyError):  # an HDF5 file that cannot be read: its own error comes later
            size = None
        if not size or not tops or not tops[0].shape:
            continue
        batch = int(tops[0].shape[0])
        seen = iterations * batch
        if seen > size:
            one_pass = -(-size // batch)
            log.warning("--iterations %d x batch %d = %d samples, but the data of layer '%s' holds %d: the test "
                        "reads it %.3g times over (--iterations %d covers it once)", iterations, batch, seen, name,
                        size, seen / size, one_pass)


def _blas_lines():
    try:
        import threadpoolctl

        infos = threadpoolctl.threadpool_info()
        return [f"BLAS: {i.get('internal_api')} {i.get('version') or ''} ({i.get('num_threads')} threads, "
                + (f"kernels {i['architecture']}, " if i.get("architecture") else "")
                + f"{i.get('filepath')})" for i in infos] or ["BLAS: none loaded"]
    except ImportError:
        pass
    import numpy

    try:
        config = numpy.show_config(mode="dicts")
        blas = config.get("Build Dependencies", {}).get("blas", {})
        return [f"BLAS: {blas.get('name', 'unknown')} {blas.get('version', '')}".rstrip()]
    except TypeError:  # numpy < 1.25 has no mode argument
        return ["BLAS: see numpy.show_config()"]


def _gpu_lines():
    try:
        import cupy
    except ImportError:
        return ["GPU: not available (pip install 'brewnet[gpu]')"]
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cupy's CUDARuntimeError when no driver/device
        return [f"GPU: not available (cupy {cupy.__version__} sees no CUDA device: {exc})"]
    if count == 0:
        return [f"GPU: not available (cupy {cupy.__version__} sees no CUDA device)"]
    lines = [f"cupy: {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}"]
    for i in range(count):
        props = cupy.cuda.runtime.getDeviceProperties(i)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        with cupy.cuda.Device(i):
            free, total = cupy.cuda.runtime.memGetInfo()
        lines.append(f"GPU {i}: {name}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free), "
                     f"compute capability {props['major']}.{props['minor']}")
    return lines


def _onednn_line():
    from brewnet.layers.kernels import onednn

    if not onednn.enabled():
        return "oneDNN convolutions: off (BREWNET_ONEDNN=0)"
    lib = onednn.library()
    if lib is None:
        return "oneDNN convolutions: not installed (brewnet's own kernels run; pip install onednn-cpu-gomp)"
    return f"oneDNN convolutions: {lib.path}"


@click.command("device")
def device():
    """Show the devices brewnet sees: numpy, BLAS, CPU threads and GPUs."""
    import numpy

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    lines = [f"Python: {platform.python_version()}", f"numpy: {numpy.__version__}", *_blas_lines(),
             _onednn_line(), f"CPU threads: {usable} usable of {os.cpu_count()}"]
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            lines.append(f"{var}={os.environ[var]}")
    lines += _gpu_lines()
    for line in lines:
        click.echo(line)


COMMANDS = [train, test, device]
