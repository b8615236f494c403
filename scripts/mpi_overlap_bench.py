"""Does overlapping the gradient Allreduce with the backward pass pay on this machine?

    mpiexec -n 2 python scripts/mpi_overlap_bench.py [--nets lenet,caffenet] [--repeat 7]

A backward pass is simulated layer by layer, last layer first, with each layer's
gradient of the real size (LeNet, CaffeNet) and a share of a backward time
taken from measured runs (--lenet-ms, --caffenet-ms: the per-rank backward time
of one iteration). The compute is a fixed number of small float32 GEMMs per
layer, the same on every run. Four ways to reduce, per iteration:

- compute:   backward only (no communication), the floor;
- fused:     backward, then one Allreduce of one flat buffer (what brewnet does);
- overlap:   each layer's gradient (bucketed to --bucket-mb) starts an Iallreduce as
             soon as it is ready, all are awaited after the backward;
- overlap+test: as overlap, and the compute calls MPI_Testall between GEMMs so the
             library can progress the transfers (MPICH has no progress thread by default).

The modes take turns within each repetition. Rank 0 prints the median and best
iteration time of each and the communication left exposed (median - compute's).
Needs mpi4py (pip install 'brewnet[mpi]').
"""

import argparse
import time

import numpy
from mpi4py import MPI

# learnable values per layer, in forward order (weights + biases)
NETS = {
    "lenet": [("conv1", 500 + 20), ("conv2", 25000 + 50), ("ip1", 400000 + 500), ("ip2", 5000 + 10)],
    "caffenet": [("conv1", 34848 + 96), ("conv2", 307200 + 256), ("conv3", 884736 + 384),
                 ("conv4", 663552 + 384), ("conv5", 442368 + 256), ("fc6", 37748736 + 4096),
                 ("fc7", 16777216 + 4096), ("fc8", 4096000 + 1000)],
}
# share of the backward time per layer (rough: convolutions dominate compute, fc layers the bytes)
SHARES = {
    "lenet": {"conv1": 0.25, "conv2": 0.55, "ip1": 0.17, "ip2": 0.03},
    "caffenet": {"conv1": 0.18, "conv2": 0.27, "conv3": 0.17, "conv4": 0.13, "conv5": 0.09, "fc6": 0.11,
                 "fc7": 0.04, "fc8": 0.01},
}

MODES = ("compute", "fused", "overlap", "overlap+test")
GEMM = 48  # side of the small GEMMs that stand for a layer's compute


def calibrate(comm):
    """GEMMs per millisecond on this rank (rank 0's figure, for every rank)."""
    a = numpy.ones((GEMM, GEMM), numpy.float32)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        a @ a
        count += 1
    return comm.bcast(count / 200.0, root=0)


def compute(gemms, requests=None):
    a = numpy.ones((GEMM, GEMM), numpy.float32)
    for i in range(gemms):
        a @ a
        if requests and i % 16 == 0:
            MPI.Request.Testall(requests)


def buckets(layers, bucket_bytes):
    """Backward order (last layer first), consecutive layers merged until a bucket holds
    at least bucket_bytes: [(names, values)]."""
    out, names, values = [], [], 0
    for name, count in reversed(layers):
        names.append(name)
        values += count
        if values * 4 >= bucket_bytes:
            out.append((names, values))
            names, values = [], 0
    if names:
        out.append((names, values))
    return out


def iteration(comm, mode, plan, flat):
    requests, offset = [], 0
    for gemms, values, ready in plan:
        compute(gemms, requests if mode == "overlap+test" else None)
        if ready and mode.startswith("overlap"):
            requests.append(comm.Iallreduce(MPI.IN_PLACE, flat[offset:offset + values], op=MPI.SUM))
        if ready:
            offset += values
    if mode == "fused":
        comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
    elif requests:
        MPI.Request.Waitall(requests)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="lenet,caffenet")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--lenet-ms", type=float, default=6.0, help="backward time per rank and iteration")
    parser.add_argument("--caffenet-ms", type=float, default=1000.0, help="backward time per rank and iteration")
    parser.add_argument("--bucket-mb", type=float, default=4.0, help="smallest bucket of the overlapped runs")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    per_ms = calibrate(comm)
    if comm.rank == 0:
        print(f"# {comm.size} ranks, {MPI.Get_library_version().splitlines()[0].strip()}, "
              f"{per_ms:.0f} GEMMs/ms, buckets >= {args.bucket_mb} MB")
        print(f"{'net':>9} {'mode':>13} {'buckets':>7} {'MB':>7} {'median_ms':>9} {'best_ms':>9} {'exposed_ms':>10}")
    for net in args.nets.split(","):
        layers, total_ms = NETS[net], getattr(args, f"{net}_ms")
        shares = SHARES[net]
        grouped = buckets(layers, args.bucket_mb * 1e6)
        plan = []  # (gemms, values, a bucket ends here)
        for names, values in grouped:
            for i, name in enumerate(names):
                plan.append((int(per_ms * total_ms * shares[name]), values, i == len(names) - 1))
        flat = numpy.ones(sum(count for _, count in layers), numpy.float32)
        times = {mode: [] for mode in MODES}
        for mode in MODES:
            iteration(comm, mode, plan, flat)  # warm up
        for _ in range(args.repeat):  # the modes take turns: a change of load hits them all alike
            for mode in MODES:
                comm.Barrier()
                start = time.perf_counter()
                iteration(comm, mode, plan, flat)
                times[mode].append(time.perf_counter() - start)
        medians = {mode: comm.reduce(float(numpy.median(times[mode])), op=MPI.MAX, root=0) for mode in MODES}
        bests = {mode: comm.reduce(float(numpy.min(times[mode])), op=MPI.MAX, root=0) for mode in MODES}
        if comm.rank == 0:
            for mode in MODES:
                print(f"{net:>9} {mode:>13} {len(grouped) if mode.startswith('overlap') else 1:>7d} "
                      f"{flat.nbytes / 1e6:>7.1f} {medians[mode] * 1e3:>9.2f} {bests[mode] * 1e3:>9.2f} "
                      f"{(medians[mode] - medians['compute']) * 1e3:>10.2f}", flush=True)

if __name__ == "__main__":
    main()
