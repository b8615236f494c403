"""Run a pycaffe program unchanged on brewnet: ``import caffe`` inside it gives brewnet.pycaffe.

    python -m brewnet.pycaffe script.py [ARGS...]
    python -m brewnet.pycaffe -m module [ARGS...]      (e.g. -m unittest discover)
    python -m brewnet.pycaffe -c "import caffe; ..." [ARGS...]

A real Caffe importable beside brewnet is not shadowed: the program then runs
with it, after a warning.
"""

import os
import runpy
import sys

USAGE = ("usage: python -m brewnet.pycaffe SCRIPT [ARGS...]\n"
         "       python -m brewnet.pycaffe -m MODULE [ARGS...]\n"
         "       python -m brewnet.pycaffe -c CODE [ARGS...]\n"
         "Runs a program written for pycaffe with `import caffe` giving brewnet.pycaffe.")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    asked = bool(argv) and argv[0] in ("-h", "--help")
    if not argv or asked or (argv[0] in ("-m", "-c") and len(argv) < 2):
        print(USAGE, file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2

    from brewnet import pycaffe

    pycaffe.install(reason="python -m brewnet.pycaffe")
    if argv[0] == "-m":
        module = argv[1]
        sys.argv = [module, *argv[2:]]  # runpy puts the module's file in argv[0]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    if argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        return 0
    script = argv[0]
    if not os.path.exists(script):
        print(f"python -m brewnet.pycaffe: error: {script}: no such file", file=sys.stderr)
        return 2
    sys.argv = argv
    # as `python script.py` does: the script's folder comes first on the path
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
