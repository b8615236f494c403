"""Data-parallel training over MPI (Caffe's P2PSync, with an Allreduce of MPI or NCCL).

Every rank builds the same solver; rank r's TRAIN data layers read records
r, r+N, ... of each global batch (``brewnet.layers.dataio.shard``), so N ranks
at batch B train on exactly the batches one process at batch N*B reads. After
the backward pass(es) of an iteration the learnable diffs are summed over the
ranks by one Allreduce of one flat buffer (``allreduce``) and scaled by 1/N, then every rank
applies the same update. Rank 0 broadcasts its parameters once at the start
(fillers and ``--weights`` agree everywhere), alone logs at INFO, tests and
writes snapshots.

mpi4py is imported only by ``init()``: a plain ``brewnet train`` never loads it.
"""

import logging
import os
import sys
import time

import numpy

from brewnet.layers.dataio import shard
from brewnet.layers.kernels.backend import to_numpy
from brewnet.netdef.errors import DefinitionError
from brewnet.solver import allreduce

log = logging.getLogger("brewnet.solver")

# (rank variable, size variable) of the launchers we know: MPICH/Intel MPI (hydra), Open MPI, PMIx (srun), MVAPICH
LAUNCHER_VARS = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                 ("PMIX_RANK", None), ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"))


def launched(environ=None):
    """True when this process was started by an MPI launcher (its environment says so)."""
    environ = os.environ if environ is None else environ
    return any(rank in environ or (size and size in environ) for rank, size in LAUNCHER_VARS)


# the rank within this node, as the launchers name it (MPICH, Open MPI, MVAPICH, Slurm)
LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")


class World:
    """The communicator, this process's rank, its rank on its node and the number of ranks."""

    def __init__(self, comm, environ=None):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        environ = os.environ if environ is None else environ
        local = next((environ[name] for name in LOCAL_RANK_VARS if environ.get(name, "").isdigit()), None)
        self.local_rank = int(local) if local is not None else self.rank  # which GPU of a node is this rank's

    @property
    def root(self):
        return self.rank == 0

    # seconds between this rank's last words and MPI_Abort: the abort tears down the pipes
    # mpiexec reads the ranks' output from, and CI once lost a failing rank's error line to it
    abort_grace = 0.5

    def abort(self, code=1):
        """End every rank now, after flushing this rank's output and giving mpiexec time to pass it on."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(self.abort_grace)
        self.comm.Abort(code)


def init():
    """The MPI world (MPI initialized now); a one-line DefinitionError without mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DefinitionError(f"data-parallel training under an MPI launcher needs mpi4py and an MPI library: "
                              f"pip install 'brewnet[mpi]' ({exc})") from None
    world = World(MPI.COMM_WORLD)
    shard.set_shard(world.rank, world.size)
    return world


def _unique_blobs(net):
    seen, blobs = set(), []
    for layer in net.layers:
        for blob in layer.blobs:
            if id(blob) not in seen:
                seen.add(id(blob))
                blobs.append(blob)
    return blobs


_NONE, _SNAPSHOT, _STOP = "none", "snapshot", "stop"


class DataParallel:
    """Ties a solver to an MPI world: initial broadcast, gradient Allreduce, agreed signal actions.

    The learnable diffs live in one flat buffer (``allreduce.FlatGradients``); a
    reducer (host MPI or NCCL, ``allreduce.select_reducer``) sums it over the
    ranks. Each rank counts the snapshot and stop requests its signals made, and
    the ranks act when the largest count grows: a signal seen by any rank acts on
    every rank at the same iteration, and once, though mpiexec's copies of it
    reach the ranks an iteration apart.
    """

    def __init__(self, world, solver, reducer=None):
        self.world, self.solver = world, solver
        self.params = solver.net.learnable_params
        self.flat = allreduce.FlatGradients(self.params)
        self.total = self.flat.count
        self.bytes_per_iter = self.flat.nbytes
        self.reducer = reducer if reducer is not None else allreduce.select_reducer(world, solver.xp)
        self._local_action = solver._action_function
        self._agreed = _NONE
        self._requests = numpy.zeros(2, numpy.int64)  # this rank's snapshot and stop requests so far
        self._acted = numpy.zeros(2, numpy.int64)  # the agreed counts already acted on
        solver.set_action_function(self._action)
        solver.add_callback(on_gradients_ready=self.allreduce_gradients)
        solver.root_solver = world.root  # rank 0 alone tests and saves

    def broadcast_parameters(self):
        """Every parameter of the train net (learnable or not) from rank 0 to all ranks; and
        the run-time draws of layers other than data sources (Dropout's masks, stochastic
        pooling) made to differ between ranks. Call it once, after any restore."""
        self._decorrelate_draws()
        blobs = _unique_blobs(self.solver.net)
        flat = numpy.concatenate([to_numpy(b.data).astype(self.solver.dtype).ravel() for b in blobs]) \
            if blobs else numpy.zeros(0, self.solver.dtype)
        self.world.comm.Bcast(flat, root=0)
        offset = 0
        for blob in blobs:
            n = int(blob.count)
            blob.data[...] = blob.xp.asarray(flat[offset:offset + n].reshape(blob.data.shape))
            offset += n
        if self.world.root:
            log.info("Data-parallel training on %d MPI rank%s: %d learnable values (%.1f MB) averaged per "
                     "iteration", self.world.size, "s" if self.world.size > 1 else "", self.total,
                     self.bytes_per_iter / 1e6)

    def _decorrelate_draws(self):
        # every rank seeds alike (the data layers must shuffle alike), so without this rank r's
        # Dropout would drop the same units of its k-th sample as rank 0 of its own k-th sample;
        # rank 0 keeps its generators, so a 1-rank world draws as a plain run
        if self.world.root:
            return
        net = self.solver.net
        for layer, bottoms in zip(net.layers, net.bottom_vecs):
            if bottoms and getattr(layer, "rng_in_forward", False):
                layer.rng = numpy.random.default_rng([self.world.rank, int(layer.rng.integers(0, 2**63))])

    def allreduce_gradients(self):
        self.flat.gather()
        self.reducer.allreduce(self.flat)
        action = self._local_action() if self._local_action is not None else _NONE
        self._requests += (action == _SNAPSHOT, action == _STOP)
        agreed = allreduce.agree_requests(self.world, self._requests)
        snapshot, stop = agreed > self._acted
        self._acted = agreed
        self._agreed = _STOP if stop else _SNAPSHOT if snapshot else _NONE

    def _action(self):
        # asked after each update (and by rank 0's test passes): the action all ranks agreed on
        action, self._agreed = self._agreed, _NONE
        return action
