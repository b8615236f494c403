#!/usr/bin/env python
"""kill -9 a short training again and again, resume it from its last snapshot, and check
that every resumed run ends with the uninterrupted run's weights bit for bit, or said at
WARNING level why it could not.

Kills land at random moments and, by a wrapper around os.replace in the killed process,
right before each file of a snapshot takes its name: the weights, the state's temporary
file, the resume sidecar, the state itself. Prints one line per kill and a summary; exits
non-zero if a resume was silently inexact or failed.

    python scripts/kill_resume_check.py                # 24 kills, half of them timed
    python scripts/kill_resume_check.py --kills 40 --seed 3 --keep /tmp/kills
"""

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy

MAX_ITER, SNAPSHOT = 60, 5
NET = """name: "killme"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
        hdf5_data_param { source: "list.txt" batch_size: 6 shuffle: true } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 16 weight_filler { type: "xavier" } } }
layer { name: "drop" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.3 } }
layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""
SOLVER = f"""net: "net.prototxt" type: "Adam" base_lr: 0.01 momentum: 0.9 lr_policy: "fixed"
max_iter: {MAX_ITER} snapshot: {SNAPSHOT} snapshot_prefix: "snaps/run" display: 0 random_seed: 7
snapshot_format: %s
"""
# in the killed process: SIGKILL itself right before the N-th os.replace (N from argv)
KILLED_AT_REPLACE = """
import os, signal, sys
target, calls, real = int(sys.argv.pop(1)), [0], os.replace
def replace(src, dst, *a, **k):
    calls[0] += 1
    if calls[0] == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
from brewnet.cli import main
sys.argv[0] = "brewnet"
main()
"""
REPLACES_PER_SNAPSHOT = 4  # weights, state's temporary file, sidecar, state
FILE_KINDS = ["weights", "state temp", "sidecar", "state"]


def make_run_folder(folder, fmt):
    folder.mkdir(parents=True)
    rng = numpy.random.default_rng(0)
    with h5py.File(folder / "d.h5", "w") as f:
        f["data"] = rng.normal(size=(40, 10)).astype(numpy.float32)
        f["label"] = rng.integers(0, 4, 40).astype(numpy.float32)
    (folder / "list.txt").write_text("d.h5\n")
    (folder / "net.prototxt").write_text(NET)
    (folder / "solver.prototxt").write_text(SOLVER % fmt)


def train(folder, *extra, killed_at=None, env=None):
    args = ["train", "--solver", "solver.prototxt", *extra]
    if killed_at is None:
        command = [sys.executable, "-m", "brewnet", *args]
    else:
        command = [sys.executable, "-c", KILLED_AT_REPLACE, str(killed_at), *args]
    return subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def wait_for_training(proc):
    """Read the run's log until its first iteration starts (the rest is read at the end)."""
    for line in proc.stderr:
        if "Starting Optimization" in line:
            return


def final_weights(folder, fmt):
    if fmt == "HDF5":
        return _hdf5_arrays(folder / "snaps" / f"run_iter_{MAX_ITER}.caffemodel.h5")
    return (folder / "snaps" / f"run_iter_{MAX_ITER}.caffemodel").read_bytes()


def _hdf5_arrays(path):
    # HDF5 files carry timestamps: compare their arrays, not their bytes
    with h5py.File(path, "r") as f:
        return [(name, f[name][()].tobytes()) for name in sorted(_datasets(f))]


def _datasets(group, prefix=""):
    for name, item in group.items():
        if isinstance(item, h5py.Group):
            yield from _datasets(item, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}"


def latest_state(folder, fmt):
    suffix = ".solverstate.h5" if fmt == "HDF5" else ".solverstate"
    states = sorted((folder / "snaps").glob(f"run_iter_*{suffix}"),
                    key=lambda p: int(p.name[len("run_iter_"):-len(suffix)]))
    return states[-1] if states else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", help="work in this folder and keep it")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    base = Path(args.keep or tempfile.mkdtemp(prefix="brewnet-kills-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    reference, durations = {}, {}
    for fmt in ("BINARYPROTO", "HDF5"):
        folder = base / f"reference-{fmt}"
        make_run_folder(folder, fmt)
        proc = train(folder, env=env)
        wait_for_training(proc)
        start = time.monotonic()
        _, err = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"the uninterrupted {fmt} run failed:\n{err}")
        durations[fmt] = time.monotonic() - start  # from its first iteration to its end
        reference[fmt] = final_weights(folder, fmt)
    snapshots = MAX_ITER // SNAPSHOT
    # each of the four files of a snapshot at least once, then other snapshots at random
    plan = [("replace", n) for n in range(1, snapshots * REPLACES_PER_SNAPSHOT + 1)]
    first, rest = plan[:REPLACES_PER_SNAPSHOT], plan[REPLACES_PER_SNAPSHOT:]
    rng.shuffle(rest)
    plan = (first + rest)[:max(args.kills // 2, REPLACES_PER_SNAPSHOT)]
    plan += [("random", None)] * (args.kills - len(plan))
    exact = warned = bad = 0
    for i, (how, n) in enumerate(plan):
        fmt = ("BINARYPROTO", "HDF5")[i % 2]
        folder = base / f"kill-{i:02d}"
        make_run_folder(folder, fmt)
        if how == "replace":
            proc = train(folder, killed_at=n, env=env)
            proc.communicate()
            moment = (f"before snapshot {(n - 1) // REPLACES_PER_SNAPSHOT + 1}'s "
                      f"{FILE_KINDS[(n - 1) % REPLACES_PER_SNAPSHOT]} took its name")
        else:
            proc = train(folder, env=env)
            wait_for_training(proc)
            delay = rng.uniform(0, durations[fmt])  # somewhere in its iterations and snapshots
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            moment = f"{delay:.3f} s into training"
        if proc.returncode == 0:
            print(f"kill {i:2d} ({fmt}, {moment}): the run had already finished")
            exact += final_weights(folder, fmt) == reference[fmt]
            continue
        state = latest_state(folder, fmt)
        extra = ("--snapshot", str(state.relative_to(folder))) if state else ()
        resumed = train(folder, *extra, env=env)
        _, err = resumed.communicate()
        if resumed.returncode != 0:
            bad += 1
            print(f"kill {i:2d} ({fmt}, {moment}): the resume FAILED: {err.strip().splitlines()[-1]}")
            continue
        same = final_weights(folder, fmt) == reference[fmt]
        said = [line for line in err.splitlines() if line.startswith("W") and "resuming inexactly" in line]
        origin = state.name if state else "the start (no snapshot yet)"
        if same:
            exact += 1
            print(f"kill {i:2d} ({fmt}, {moment}): resumed from {origin}: bit for bit the uninterrupted run")
        elif said:
            warned += 1
            print(f"kill {i:2d} ({fmt}, {moment}): resumed from {origin}: inexact, and said so: "
                  f"{said[0].split('] ', 1)[-1][:120]}")
        else:
            bad += 1
            print(f"kill {i:2d} ({fmt}, {moment}): resumed from {origin}: SILENTLY DIFFERENT")
    print(f"{len(plan)} kills: {exact} exact, {warned} inexact with a warning, {bad} silently wrong or failed")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
