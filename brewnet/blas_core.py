"""OpenBLAS's kernel choice on CPUs newer than the OpenBLAS at hand.

numpy's wheels (and Debian's OpenBLAS) pick their GEMM kernels from the CPU's model number at load
time. A model the library does not know yet (Emerald Rapids, family 6 model 207, to OpenBLAS 0.3.23)
gets its oldest kernels, "Prescott" (SSE3): a float32 GEMM there ran at 37 GFLOP/s instead of 196,
and every convolution with it. The library honours OPENBLAS_CORETYPE, read once when it loads, so
brewnet names the kernel family that the CPU's instruction-set flags allow before numpy is first
imported. For float32 and float64 GEMM the kernels named here are the ones OpenBLAS picks itself on
the CPUs it knows (Skylake-X, Cooper Lake and Sapphire Rapids share the AVX-512 kernels; Haswell's
serve AVX2), so naming them costs nothing where detection works. A user's own OPENBLAS_CORETYPE
always wins; BREWNET_OPENBLAS_CORETYPE=0 turns the choice off.

No numpy here: the point is to run before it loads.
"""

import os
import sys

# kernel families too old for a CPU with AVX2: seeing one of these means detection failed
PRE_AVX2_CORES = frozenset({"prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "katmai",
                            "coppermine", "northwood", "banias", "opteron", "opteron_sse3", "barcelona",
                            "bobcat", "sandybridge", "bulldozer", "piledriver", "steamroller", "generic"})


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The instruction-set flags of the first CPU in ``cpuinfo`` (empty where there is none:
    not Linux, or not x86)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def core_for_flags(flags):
    """The OpenBLAS kernel family for an x86 CPU with these flags, or None (no AVX2: leave it
    to OpenBLAS)."""
    if "avx512f" in flags and "avx512bw" in flags and "avx512vl" in flags:
        return "SkylakeX"
    if "avx2" in flags and "fma" in flags:
        return "Haswell"
    return None


def choose_openblas_core(environ=None, flags=None):
    """Set OPENBLAS_CORETYPE in ``environ`` (os.environ by default) from the CPU's flags unless it
    is set already or the choice is turned off. Returns the value set, or None."""
    environ = os.environ if environ is None else environ
    if environ.get("OPENBLAS_CORETYPE") or environ.get("BREWNET_OPENBLAS_CORETYPE") == "0":
        return None
    core = core_for_flags(cpu_flags() if flags is None else flags)
    if core:
        environ["OPENBLAS_CORETYPE"] = core
    return core


def choose_before_numpy():
    """choose_openblas_core while numpy (and with it its OpenBLAS) is not loaded yet. Once it
    is, the variable no longer matters: then warn if OpenBLAS took old kernels."""
    if "numpy" not in sys.modules:
        choose_openblas_core()
    elif not os.environ.get("OPENBLAS_CORETYPE") and core_for_flags(cpu_flags()):
        warn_if_misdetected()


def warn_if_misdetected():
    """Log a warning for each loaded OpenBLAS that runs kernels older than this CPU, saying how
    to get the fast ones (threadpoolctl reads which kernels each library chose)."""
    try:
        import threadpoolctl

        infos = threadpoolctl.threadpool_info()
    except Exception:  # threadpoolctl missing or failing: nothing to say
        return
    import logging

    for path, core in misdetected(infos):
        logging.getLogger("brewnet").warning(
            "OpenBLAS (%s) did not recognize this CPU and runs its %s kernels, several times slower; "
            "import brewnet before numpy, or start Python with OPENBLAS_CORETYPE=%s",
            path, core, core_for_flags(cpu_flags()))


def misdetected(libraries, flags=None):
    """The OpenBLAS libraries among threadpoolctl's ``libraries`` (dicts) that run kernels older
    than this CPU allows, as (path, kernel family) pairs."""
    if core_for_flags(cpu_flags() if flags is None else flags) is None:
        return []
    return [(lib.get("filepath"), lib.get("architecture")) for lib in libraries
            if lib.get("internal_api") == "openblas"
            and str(lib.get("architecture", "")).lower() in PRE_AVX2_CORES]
