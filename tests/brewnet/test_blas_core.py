"""brewnet names OpenBLAS's kernel family from the CPU's flags before numpy loads
(brewnet/blas_core.py), so that a CPU newer than the OpenBLAS at hand does not get its SSE3 kernels."""

import json
import os
import subprocess
import sys

import pytest

from brewnet import blas_core

AVX512 = frozenset("fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512dq".split())
AVX2 = frozenset("fpu sse2 avx avx2 fma".split())
OLD = frozenset("fpu sse2 sse3 ssse3".split())


def test_the_kernel_family_follows_the_flags():
    assert blas_core.core_for_flags(AVX512) == "SkylakeX"
    assert blas_core.core_for_flags(AVX2) == "Haswell"
    assert blas_core.core_for_flags(AVX2 | {"avx512f"}) == "Haswell"  # AVX-512 foundation alone is not enough
    assert blas_core.core_for_flags(OLD) is None
    assert blas_core.core_for_flags(frozenset()) is None


def test_cpu_flags_reads_the_first_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel\t\t: 207\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert blas_core.cpu_flags(str(info)) == {"fpu", "avx2", "fma"}
    assert blas_core.cpu_flags(str(tmp_path / "absent")) == frozenset()


def test_the_choice_respects_the_user():
    env = {}
    assert blas_core.choose_openblas_core(env, AVX512) == "SkylakeX" and env["OPENBLAS_CORETYPE"] == "SkylakeX"
    env = {"OPENBLAS_CORETYPE": "Haswell"}
    assert blas_core.choose_openblas_core(env, AVX512) is None and env["OPENBLAS_CORETYPE"] == "Haswell"
    env = {"BREWNET_OPENBLAS_CORETYPE": "0"}
    assert blas_core.choose_openblas_core(env, AVX512) is None and "OPENBLAS_CORETYPE" not in env
    env = {}
    assert blas_core.choose_openblas_core(env, OLD) is None and env == {}


def test_misdetected_names_openblas_libraries_running_old_kernels():
    libs = [{"internal_api": "openblas", "architecture": "Prescott", "filepath": "/a.so"},
            {"internal_api": "openblas", "architecture": "SkylakeX", "filepath": "/b.so"},
            {"internal_api": "mkl", "architecture": None, "filepath": "/c.so"}]
    assert blas_core.misdetected(libs, AVX512) == [("/a.so", "Prescott")]
    assert blas_core.misdetected(libs, OLD) == []  # an old CPU: old kernels are right


def _python(code, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "BREWNET_OPENBLAS_CORETYPE")}
    env.update(env_changes)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


REPORT = ("import json, os, threadpoolctl\n"
          "libs = [i for i in threadpoolctl.threadpool_info() if i['internal_api'] == 'openblas']\n"
          "print(json.dumps({'env': os.environ.get('OPENBLAS_CORETYPE'),\n"
          "                  'cores': [i.get('architecture') for i in libs]}))\n")


def test_importing_brewnet_first_gives_numpy_kernels_for_this_cpu():
    expected = blas_core.core_for_flags(blas_core.cpu_flags())
    seen = _python("import brewnet, numpy\n" + REPORT)
    assert seen["env"] == expected
    if expected is None or not seen["cores"]:
        pytest.skip("no AVX2 CPU, or numpy's BLAS is not OpenBLAS: nothing to choose")
    # numpy's OpenBLAS took the family named (whether or not it would have found it alone)
    assert all(core.lower() not in blas_core.PRE_AVX2_CORES for core in seen["cores"]), seen


def test_numpy_imported_first_is_left_alone_and_the_user_choice_wins():
    assert _python("import numpy, brewnet\n" + REPORT)["env"] is None
    assert _python("import brewnet, numpy\n" + REPORT, OPENBLAS_CORETYPE="Haswell")["env"] == "Haswell"
    assert _python("import brewnet, numpy\n" + REPORT, BREWNET_OPENBLAS_CORETYPE="0")["env"] is None


def test_a_misdetected_openblas_is_named_in_a_warning(monkeypatch, caplog):
    import threadpoolctl

    monkeypatch.setattr(blas_core, "cpu_flags", lambda cpuinfo=None: AVX512)
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: [
        {"internal_api": "openblas", "architecture": "Prescott", "filepath": "/x/libopenblas.so"},
        {"internal_api": "openblas", "architecture": "SkylakeX", "filepath": "/y/libscipy_openblas.so"}])
    with caplog.at_level("WARNING", logger="brewnet"):
        blas_core.warn_if_misdetected()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "/x/libopenblas.so" in lines[0] and "Prescott" in lines[0]
    assert "OPENBLAS_CORETYPE=SkylakeX" in lines[0]
