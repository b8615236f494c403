"""What the flat gradient buffer saves per iteration: packing the diffs into an
Allreduce buffer and back (brewnet before solver/allreduce.py) against diffs
that are views of the buffer (FlatGradients.gather: only pending lazy zeros).

    python scripts/mpi_pack_bench.py [--repeat 20]

Prints the median time per iteration of both, for LeNet's and CaffeNet's
learnable blobs (float32, on the CPU; no MPI needed).
"""

import argparse
import time

import numpy

from brewnet.layers.blob import Blob
from brewnet.solver.allreduce import FlatGradients

SHAPES = {
    "lenet": [(20, 1, 5, 5), (20,), (50, 20, 5, 5), (50,), (500, 800), (500,), (10, 500), (10,)],
    "caffenet": [(96, 3, 11, 11), (96,), (256, 48, 5, 5), (256,), (384, 256, 3, 3), (384,), (384, 192, 3, 3),
                 (384,), (256, 192, 3, 3), (256,), (4096, 9216), (4096,), (4096, 4096), (4096,), (1000, 4096),
                 (1000,)],
}


def blobs_of(shapes):
    blobs = [Blob(shape) for shape in shapes]
    for blob in blobs:
        blob.diff[...] = 1.0
    return blobs


def copy_in_and_out(blobs, buffer):
    offset = 0
    for blob in blobs:
        n = blob.count
        buffer[offset:offset + n] = blob.diff.ravel()
        offset += n
    offset = 0
    for blob in blobs:
        n = blob.count
        blob.diff[...] = buffer[offset:offset + n].reshape(blob.diff.shape)
        offset += n


def median_ms(function, repeat):
    function()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return numpy.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print(f"{'net':>9} {'MB':>7} {'copy_ms':>9} {'views_ms':>9}")
    for net, shapes in SHAPES.items():
        copied = blobs_of(shapes)
        buffer = numpy.zeros(sum(b.count for b in copied), numpy.float32)
        copy_ms = median_ms(lambda: copy_in_and_out(copied, buffer), args.repeat)
        viewed = blobs_of(shapes)
        flat = FlatGradients(viewed)
        views_ms = median_ms(flat.gather, args.repeat)
        print(f"{net:>9} {buffer.nbytes / 1e6:>7.1f} {copy_ms:>9.3f} {views_ms:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
