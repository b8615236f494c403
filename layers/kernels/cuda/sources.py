"""The CUDA C sources of layers/kernels/cuda: where each kernel lives and what it takes.

Both launchers read this table: cupy's (ops.CupyKernels, NVRTC) and the CPU harness of the
tests (tests/cuda_harness.py, g++), so a kernel's argument list is written once, in its .cu.
"""

import functools
import pathlib
import re
from typing import NamedTuple

FOLDER = pathlib.Path(__file__).resolve().parent
COMMON = "common.cuh"
# NVRTC/nvcc options. --fmad=false: no fused multiply-adds, so a step is the same float
# operations as the numpy twin's (the solver updates stay bit-close to the CPU path).
COMPILE_OPTIONS = ("--std=c++14", "--fmad=false")

_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)


class Param(NamedTuple):
    name: str
    kind: str  # "int", "float" (scalars), "float*", "int*" (device pointers)


class Kernel(NamedTuple):
    file: str
    params: tuple


def source_files():
    return sorted(p.name for p in FOLDER.glob("*.cu"))


def source_text(file):
    """A .cu file with the shared header in front (NVRTC gets one self-contained text)."""
    return (FOLDER / COMMON).read_text() + "\n" + (FOLDER / file).read_text()


def _param(text):
    words = text.replace("*", " * ").split()
    name = words[-1]
    base = "float" if "float" in words else "int"
    return Param(name, base + "*" if "*" in words else base)


@functools.lru_cache(maxsize=None)
def kernel_table():
    """{kernel name: Kernel(file, params)} for every extern "C" kernel of every .cu file."""
    table = {}
    for file in source_files():
        for name, params in _KERNEL.findall((FOLDER / file).read_text()):
            if name in table:
                raise RuntimeError(f"kernel {name} is defined in {table[name].file} and {file}")
            table[name] = Kernel(file, tuple(_param(p) for p in params.split(",")))
    return table
