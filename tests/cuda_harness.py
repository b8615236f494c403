"""Runs brewnet's CUDA C kernels (layers/kernels/cuda/*.cu) on the CPU, for tests without a GPU.

A small C++ shim stands in for CUDA's launch model: blockIdx/threadIdx/blockDim/gridDim are
plain variables, __global__/__device__ mean nothing, atomicAdd is a plain add. g++ compiles
each .cu file (shim + common.cuh + the file) into a shared library; a launch calls the
kernel once per (block, thread) of a small made-up grid, one after the other. The kernels
are grid-stride loops without __syncthreads, so this visits every element exactly as a real
launch would, and a kernel that strays outside its own elements (or misuses the stride)
gives wrong numbers here too.

``HostKernels`` has the interface of ops.CupyKernels: ``kernels(name, count, *args)`` with
numpy arrays for pointers and numpy.int32 / numpy.float32 scalars, so ops.py's glue runs on
numpy arrays unchanged (ops.use_host_kernels). No pytest import here: this module is plain code.
"""

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import numpy

from brewnet.layers.kernels.cuda import sources

SHIM = r"""
#include <math.h>
#include <algorithm>
using std::max;
using std::min;
struct bn_dim3 { unsigned int x, y, z; };
static bn_dim3 blockIdx, threadIdx, blockDim, gridDim;
extern "C" void bn_set_launch(unsigned int grid, unsigned int block, unsigned int b, unsigned int t) {
  gridDim.x = grid; blockDim.x = block; blockIdx.x = b; threadIdx.x = t;
  gridDim.y = gridDim.z = blockDim.y = blockDim.z = 1;
  blockIdx.y = blockIdx.z = threadIdx.y = threadIdx.z = 0;
}
static inline float atomicAdd(float* a, float v) { float old = *a; *a += v; return old; }
static inline int atomicAdd(int* a, int v) { int old = *a; *a += v; return old; }
#define __global__
#define __device__
#define __forceinline__ inline
"""

# the shim's counterpart of nvcc --fmad=false: no contraction of a*b+c into an FMA
GXX_FLAGS = ("-O1", "-shared", "-fPIC", "-x", "c++", "-std=c++14", "-ffp-contract=off")

_CTYPES = {"int": ctypes.c_int, "float": ctypes.c_float, "float*": ctypes.c_void_p, "int*": ctypes.c_void_p}
_DTYPES = {"float*": numpy.float32, "int*": numpy.int32}
_SCALARS = {"int": numpy.int32, "float": numpy.float32}


def have_compiler():
    return shutil.which("g++") is not None


def shared_folder():
    """A folder for compiled kernels that later runs reuse (file names carry a hash of the source)."""
    folder = pathlib.Path(tempfile.gettempdir()) / f"brewnet-cuda-harness-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    return folder


class HostKernels:
    """The .cu kernels as CPU functions; each launch runs a grid of ``grid`` x ``block`` calls."""

    def __init__(self, workdir=None, grid=3, block=4):
        self.workdir = pathlib.Path(workdir or shared_folder())
        self.grid, self.block = grid, block
        self._libs = {}
        self.launches = []  # kernel names in launch order (tests check what ran)

    def library(self, file):
        lib = self._libs.get(file)
        if lib is None:
            text = SHIM + sources.source_text(file)
            tag = hashlib.sha1(text.encode()).hexdigest()[:12]
            src = self.workdir / f"{pathlib.Path(file).stem}-{tag}.cpp"
            out = src.with_suffix(".so")
            if not out.exists():  # named by content: a shared folder serves every run
                unique = f"{os.getpid()}-{threading.get_ident()}"
                src = src.with_name(f"{src.stem}.{unique}.cpp")
                src.write_text(text)
                tmp = out.with_name(f"{out.stem}.{unique}.so")
                done = subprocess.run(["g++", *GXX_FLAGS, str(src), "-o", str(tmp)], capture_output=True, text=True)
                src.unlink()
                if done.returncode:
                    raise RuntimeError(f"g++ could not compile {file}:\n{done.stderr}")
                os.replace(tmp, out)  # whole or not at all, for a run loading it at the same time
            lib = self._libs[file] = ctypes.CDLL(str(out))
            lib.bn_set_launch.argtypes = [ctypes.c_uint] * 4
        return lib

    def function(self, name):
        kernel = sources.kernel_table()[name]
        fn = getattr(self.library(kernel.file), name)
        fn.argtypes = [_CTYPES[p.kind] for p in kernel.params]
        fn.restype = None
        return fn, kernel.params

    def __call__(self, name, count, *args):
        self.launches.append(name)
        fn, params = self.function(name)
        args = (numpy.int32(count),) + args
        if len(args) != len(params):
            raise TypeError(f"{name} takes {len(params)} arguments, got {len(args)}")
        converted = []
        for value, param in zip(args, params):
            if param.kind in _DTYPES:
                if not isinstance(value, numpy.ndarray):
                    raise TypeError(f"{name}: {param.name} must be an array, got {type(value).__name__}")
                if value.dtype != _DTYPES[param.kind] or not value.flags.c_contiguous:
                    raise TypeError(f"{name}: {param.name} must be a C-contiguous {param.kind[:-1]} array "
                                    f"(got {value.dtype}, contiguous={value.flags.c_contiguous})")
                converted.append(value.ctypes.data)
            else:
                if type(value) is not _SCALARS[param.kind]:
                    raise TypeError(f"{name}: {param.name} must be numpy.{_SCALARS[param.kind].__name__}, "
                                    f"got {type(value).__name__}")
                converted.append(value.item())
        if count <= 0:
            return
        lib = self.library(sources.kernel_table()[name].file)
        for b in range(self.grid):
            for t in range(self.block):
                lib.bn_set_launch(self.grid, self.block, b, t)
                fn(*converted)
