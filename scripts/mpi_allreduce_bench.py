"""Allreduce latency and bandwidth between MPI ranks (float32 SUM, in place), as
brewnet's data-parallel training uses it once per iteration (docs/PARALLEL.md).

    mpiexec -n 2 python scripts/mpi_allreduce_bench.py [--max-mb 256] [--repeat 20]

Prints, per message size: the median time of one Allreduce, the algorithm
bandwidth (message bytes / time) and the bus bandwidth (algorithm bandwidth x
2(N-1)/N, the bytes each rank sends and receives in a ring Allreduce, as
nccl-tests reports it). Rank 0 prints; needs mpi4py (pip install 'brewnet[mpi]').
"""

import argparse
import time

import numpy
from mpi4py import MPI


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-mb", type=float, default=256, help="largest message, MB (default 256)")
    parser.add_argument("--repeat", type=int, default=20, help="timed Allreduces per size (default 20)")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank == 0:
        print(f"# {size} ranks, {MPI.Get_library_version().splitlines()[0].strip()}")
        print(f"{'bytes':>12} {'time_us':>10} {'algbw_GB/s':>11} {'busbw_GB/s':>11}")
    nbytes = 4
    while nbytes <= args.max_mb * 1e6:
        buf = numpy.ones(nbytes // 4, dtype=numpy.float32)
        repeat = args.repeat if nbytes > 1 << 20 else args.repeat * 20
        for _ in range(3):  # warm up (page faults, connection setup)
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        times = []
        for _ in range(repeat):
            comm.Barrier()
            start = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            times.append(time.perf_counter() - start)
        worst = comm.reduce(numpy.median(times), op=MPI.MAX, root=0)
        if rank == 0:
            algbw = nbytes / worst / 1e9
            print(f"{nbytes:>12d} {worst * 1e6:>10.1f} {algbw:>11.3f} {algbw * 2 * (size - 1) / size:>11.3f}",
                  flush=True)
        nbytes *= 4


if __name__ == "__main__":
    main()
