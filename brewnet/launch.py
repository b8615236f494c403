"""`brewnet train --gpu 0,1` / `--gpu all` / `--ranks N`: brewnet starting its own ranks.

Caffe's `-gpu 0,1` trains on several GPUs of one machine. brewnet does it with
the data-parallel training of ``brewnet.solver.mpi``: this module re-executes
the same `brewnet train` under mpiexec, one rank per GPU (or ``--ranks N``
ranks), and waits for it. The ranks find their GPU by their rank on the node.
While it waits, it passes on SIGINT and SIGTERM to mpiexec, and SIGHUP as
SIGUSR1 (MPICH's mpiexec forwards SIGINT, SIGTERM and SIGUSR1 to the ranks but
ends itself on SIGHUP; the ranks take SIGUSR1 as SIGHUP).
"""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading

from brewnet.netdef.errors import DefinitionError

MPI_HINT = "pip install 'brewnet[mpi]'"

# what the launcher's signals become for mpiexec
FORWARDED = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM}
if hasattr(signal, "SIGHUP"):
    FORWARDED[signal.SIGHUP] = signal.SIGUSR1


def find_mpiexec(environ=None, executable=None):
    """$BREWNET_MPIEXEC, else mpiexec beside the Python running brewnet (a virtualenv's, as
    the mpich wheel installs it), else on PATH; a one-line DefinitionError when none."""
    environ = os.environ if environ is None else environ
    executable = sys.executable if executable is None else executable
    chosen = environ.get("BREWNET_MPIEXEC", "").strip()
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            raise DefinitionError(f"BREWNET_MPIEXEC={chosen}: no such executable")
        return found
    beside = os.path.join(os.path.dirname(os.path.abspath(executable)), "mpiexec")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("mpiexec", path=environ.get("PATH", os.defpath))
    if found is None:
        raise DefinitionError(f"several ranks need mpiexec, found neither beside {executable} nor on PATH "
                              f"(or set BREWNET_MPIEXEC): {MPI_HINT}")
    return found


def check_mpi4py():
    if importlib.util.find_spec("mpi4py") is None:
        raise DefinitionError(f"several ranks need mpi4py: {MPI_HINT}")


def rank_count(gpu_ids, ranks):
    """How many ranks to start: --ranks N, else one per GPU of the list (1: no launcher)."""
    if ranks is not None:
        if ranks < 1:
            raise DefinitionError(f"--ranks must be at least 1, got {ranks}")
        return ranks
    return len(gpu_ids) if gpu_ids else 1


def rank_environment(ranks, environ=None, cpus=None):
    """The ranks' environment: the launcher's, with the CPU threads shared out among the ranks
    unless the user set BREWNET_THREADS."""
    env = dict(os.environ if environ is None else environ)
    if not env.get("BREWNET_THREADS", "").strip():
        if cpus is None:
            try:
                cpus = len(os.sched_getaffinity(0))
            except AttributeError:
                cpus = os.cpu_count() or 1
        env["BREWNET_THREADS"] = str(max(1, cpus // ranks))
    return env


def command(mpiexec, ranks, train_args, executable=None):
    """mpiexec -n N python -m brewnet train ARGS."""
    return [mpiexec, "-n", str(ranks), executable or sys.executable, "-m", "brewnet", "train", *train_args]


def _end_with_parent():
    # in the child before exec: mpiexec has a session of its own, so without this a launcher
    # killed outright (SIGKILL) would leave it and the ranks running; Linux's PR_SET_PDEATHSIG
    # sends it SIGTERM, which it passes on to the ranks
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run(argv, env=None):
    """Run ``argv`` (mpiexec and its ranks) to its end, passing signals on; its exit status
    (128 + signal number when a signal ended it)."""
    # a session of its own: a terminal's Ctrl-C reaches mpiexec once, through us, not twice
    child = subprocess.Popen(argv, env=env, start_new_session=True,
                             preexec_fn=_end_with_parent if sys.platform.startswith("linux") else None)
    previous = {}

    def forward(signum, frame):
        try:
            child.send_signal(FORWARDED[signum])
        except ProcessLookupError:
            pass

    try:
        if threading.current_thread() is threading.main_thread():  # where Python allows handlers
            for sig in FORWARDED:
                previous[sig] = signal.signal(sig, forward)
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # we are leaving on an exception: leave no ranks behind
            child.kill()
            child.wait()
    return 128 - code if code < 0 else code
