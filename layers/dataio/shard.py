"""Which share of every training batch this process reads (data-parallel training).

Under ``mpiexec -n N`` rank r of N reads records r, r+N, r+2N, ... of the order
one process would read, so N ranks at batch B together see exactly the records
of one process at batch N*B. The data layers of TRAIN-phase nets ask
``current()``; a single process is rank 0 of 1 and reads everything. The
readers keep their positions in that global order, so a saved data position
(the resume sidecar rank 0 writes) is the same for every rank.
"""

_SHARD = (0, 1)


def set_shard(rank, size):
    """Read share ``rank`` of ``size`` in the TRAIN-phase data layers built from now on."""
    rank, size = int(rank), int(size)
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"bad data shard {rank} of {size}")
    global _SHARD
    _SHARD = (rank, size)


def current():
    """(rank, size) of the share the data layers built now read."""
    return _SHARD
