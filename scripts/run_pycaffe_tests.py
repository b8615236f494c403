"""Run pycaffe's own unit tests (BVLC Caffe's python/caffe/test, unchanged) against
brewnet, with `import caffe` giving brewnet.pycaffe, and print a table per file.

    python scripts/run_pycaffe_tests.py FOLDER [--json OUT.json] [-k test_net]

FOLDER holds pycaffe's test_*.py files. test_draw.py walks ../../../models and
../../../examples from its own folder, so give the folder inside a Caffe tree
(a checkout, or an extract of one):

    git -C caffe archive HEAD python/caffe/test models examples | tar -x -C /tmp/caffe-src
    python scripts/run_pycaffe_tests.py /tmp/caffe-src/python/caffe/test

Each file runs in its own process (`python -m brewnet.pycaffe -m unittest`) from
a fresh temporary folder (test_solver writes snapshots to the working folder).
Exits non-zero when a file has failures or errors. brewnet's test suite runs this
when BREWNET_PYCAFFE_TESTS names such a folder (tests/brewnet/test_pycaffe_upstream.py).
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

_RAN = re.compile(r"^Ran (\d+) tests? in ", re.M)
_COUNTS = re.compile(r"(failures|errors|skipped|expected failures|unexpected successes)=(\d+)")
_PROBLEM = re.compile(r"^(FAIL|ERROR): (\S+) \(([^)]*)\)", re.M)
_SKIP = re.compile(r"^(\S+) \(([^)]*)\).*\.\.\. skipped '(.*)'$", re.M)


def environment():
    """The environment for a test process: brewnet importable from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    return env


def run_file(folder, path, timeout=600):
    """Run one pycaffe test file; returns a dict of its counts and problems."""
    with tempfile.TemporaryDirectory(prefix="pycaffe-tests-") as cwd:
        command = [sys.executable, "-m", "brewnet.pycaffe", "-m", "unittest", "discover", "-v",
                   "-s", str(folder), "-t", str(folder), "-p", path.name]
        proc = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    ran = _RAN.search(output)
    counts = {key: int(value) for key, value in _COUNTS.findall(output.rsplit("Ran ", 1)[-1])}
    total = int(ran.group(1)) if ran else 0
    failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpected successes", 0)
    skipped = counts.get("skipped", 0) + counts.get("expected failures", 0)
    if proc.returncode and not failed:  # the file did not load, or the process died
        failed = max(1, total - skipped)
    return {
        "file": path.name, "ran": total, "passed": total - failed - skipped, "failed": failed, "skipped": skipped,
        "problems": [f"{kind} {name} ({where})" for kind, name, where in _PROBLEM.findall(output)],
        "skips": [f"{name}: {why}" for name, _, why in _SKIP.findall(output)],
        "returncode": proc.returncode, "output": output,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=pathlib.Path, help="the folder of pycaffe's test_*.py files")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    parser.add_argument("-k", dest="only", action="append", help="run only these files (stem, repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each file's unittest output")
    args = parser.parse_args(argv)
    folder = args.folder.resolve()
    files = sorted(folder.glob("test_*.py"))
    if args.only:
        files = [f for f in files if f.stem in args.only]
    if not files:
        parser.error(f"{folder}: no test_*.py files")
    results = []
    print(f"{'file':<38} {'ran':>4} {'passed':>7} {'failed':>7} {'skipped':>8}")
    for path in files:
        result = run_file(folder, path)
        results.append(result)
        print(f"{result['file']:<38} {result['ran']:>4} {result['passed']:>7} {result['failed']:>7} "
              f"{result['skipped']:>8}", flush=True)
        for line in result["problems"] + [f"skipped {s}" for s in result["skips"]]:
            print(f"    {line}")
        if args.verbose or (result["failed"] and not result["problems"]):
            print(result["output"])
    totals = {key: sum(r[key] for r in results) for key in ("ran", "passed", "failed", "skipped")}
    print(f"{'total':<38} {totals['ran']:>4} {totals['passed']:>7} {totals['failed']:>7} {totals['skipped']:>8}")
    if args.json:
        args.json.write_text(json.dumps({"results": [{k: v for k, v in r.items() if k != "output"} for r in results],
                                         "totals": totals}, indent=2))
    return 1 if totals["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
