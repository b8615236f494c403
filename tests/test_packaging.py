"""What `pip install .` ships: every subpackage and the bundled zoo (a non-editable
install only contains what pyproject's package discovery finds)."""

import pathlib
import tomllib

from setuptools import find_packages

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_python_package_folder_is_shipped():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = set(find_packages(str(ROOT), include=config["packages"]["find"]["include"]))
    for top in ("brewnet", "netdef", "layers", "solver", "zoo"):
        for init in (ROOT / top).rglob("__init__.py"):
            package = ".".join(init.parent.relative_to(ROOT).parts)
            assert package in shipped, f"{package} would be missing from an installed brewnet"
    assert not any(name.startswith(("tests", "scripts", "configs")) for name in shipped)


def test_bundled_zoo_models_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["zoo"]
    for readme in (ROOT / "zoo" / "models").glob("*/readme.md"):
        for path in readme.parent.iterdir():
            rel = path.relative_to(ROOT / "zoo")
            assert any(rel.match(p) for p in patterns), f"zoo/{rel} would not be installed"
