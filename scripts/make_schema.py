#!/usr/bin/env python
"""Regenerate netdef/caffe_pb2.py from caffe.proto plus the fork fragments (netdef/forks.py).

The superset is written to a temporary folder as "caffe.proto" (so the module's descriptor keeps
Caffe's file name), compiled with grpc_tools' protoc, and the module copied into netdef/. Also
writes netdef/caffe_superset.proto, the merged text, for readers. tests/test_schema.py checks
that both are up to date.

  pip install grpcio-tools==1.85.1 && python scripts/make_schema.py
"""

import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(out_dir):
    """Write caffe_pb2.py and caffe_superset.proto into out_dir."""
    from brewnet.netdef.forks import superset_text

    out_dir = pathlib.Path(out_dir)
    text = superset_text()
    with tempfile.TemporaryDirectory() as tmp:
        (pathlib.Path(tmp) / "caffe.proto").write_text(text, encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp}", f"--python_out={tmp}",
                               "caffe.proto"], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"protoc refused the superset schema:\n{done.stderr}")
        shutil.copyfile(pathlib.Path(tmp) / "caffe_pb2.py", out_dir / "caffe_pb2.py")
    (out_dir / "caffe_superset.proto").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    build(ROOT / "netdef")
    print("wrote netdef/caffe_pb2.py and netdef/caffe_superset.proto")
