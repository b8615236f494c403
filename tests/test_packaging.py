"""What `pip install .` ships: one top-level package, brewnet, holding every
subpackage of the checkout (netdef/, layers/, solver/, zoo/ install as
brewnet.netdef, brewnet.layers, ...) and the bundled zoo; and a user's own
modules named like ours do not get in its way."""

import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAPPED = {"brewnet": "brewnet", "netdef": "brewnet.netdef", "layers": "brewnet.layers", "solver": "brewnet.solver",
          "zoo": "brewnet.zoo"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools leaves build/ behind, whose stale files a later build would ship
    src = out / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in MAPPED:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # no build isolation: the build needs only the setuptools already installed (no network)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, cwd=out)
    (path,) = out.glob("brewnet-*.whl")
    with zipfile.ZipFile(path) as zf:
        return zf.namelist()


def test_the_wheel_installs_brewnet_alone(wheel):
    tops = {name.split("/")[0] for name in wheel if ".dist-info/" not in name}
    assert tops == {"brewnet"}


def test_every_package_folder_of_the_checkout_is_in_the_wheel(wheel):
    for folder, package in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            inside = init.relative_to(ROOT / folder).as_posix()
            name = package.replace(".", "/") + "/" + inside
            assert name in wheel, f"{init.relative_to(ROOT)} would be missing from an installed brewnet"
    assert not any(name.startswith(("tests/", "scripts/", "configs/")) for name in wheel)


def test_package_data_is_in_the_wheel(wheel):
    assert "brewnet/netdef/caffe.proto" in wheel
    for readme in (ROOT / "zoo" / "models").glob("*/readme.md"):
        for path in readme.parent.iterdir():
            name = "brewnet/zoo/" + path.relative_to(ROOT / "zoo").as_posix()
            assert name in wheel, f"zoo/{path.relative_to(ROOT / 'zoo')} would not be installed"


def test_a_users_layers_and_solver_modules_do_not_shadow_brewnet(tmp_path):
    # a script folder with modules of ours' old top-level names: they must stay the user's
    for name in ("layers", "solver", "netdef", "zoo"):
        (tmp_path / f"{name}.py").write_text(f"WHO = 'user-{name}'\n")
    (tmp_path / "net.prototxt").write_text(textwrap.dedent("""
        layer { name: "data" type: "DummyData" top: "x" top: "y"
                dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
                                   data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
                inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "y" top: "loss" }
    """))
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 3 '
                                              'snapshot_after_train: false random_seed: 1\n')
    (tmp_path / "train.py").write_text(textwrap.dedent("""
        import layers, solver
        import brewnet
        s = brewnet.get_solver("solver.prototxt")
        s.solve()
        print(s.iter, layers.WHO, solver.WHO)
    """))
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "user-layers", "user-solver"]
