"""Finding zoo models: Caffe model-zoo folders (readme.md with YAML front matter).

Search order for ``zoo:NAME``: the folders in $BREWNET_ZOO (colon-separated),
the user's zoo cache ($XDG_CACHE_HOME/brewnet/zoo, where fetched weights and
`zoo add` imports go), then the zoo bundled with brewnet.
"""

import dataclasses
import difflib
import os
import pathlib

import yaml

from brewnet.netdef.errors import DefinitionError
from brewnet.netdef.io import sha1_of_file as sha1_of

BUNDLED = pathlib.Path(__file__).resolve().parent / "models"
REQUIRED_FIELDS = ("name", "caffemodel", "caffemodel_url", "sha1", "license")
PREFIX = "zoo:"


class ZooError(DefinitionError):
    """A zoo name, readme or weights file that cannot be used."""


def file_inside(folder, name, field, source=None):
    """``folder / name`` for a file name taken from a readme or a URL, refused unless it
    stays inside ``folder``: relative, without '..', no backslash or NUL tricks."""
    text = str(name)
    parts = pathlib.PurePosixPath(text).parts
    if not parts or text.startswith("/") or ".." in parts or "\\" in text or "\x00" in text or ":" in parts[0]:
        raise ZooError(f"{field}: must name a file inside the model folder, got {text!r}", source)
    return pathlib.Path(folder, *parts)


def check_model_name(name):
    """A zoo name is one folder name: nothing that reaches outside the zoo's roots."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
        raise ZooError(f"invalid zoo model name {name!r}: a model is named by its folder (letters, digits, '_', '-')")
    return name


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "brewnet" / "zoo"


def search_path():
    folders = [pathlib.Path(p) for p in os.environ.get("BREWNET_ZOO", "").split(os.pathsep) if p]
    return folders + [cache_dir(), BUNDLED]


def read_front_matter(readme):
    """The YAML front matter of a model-zoo readme.md, checked for Caffe's fields."""
    readme = pathlib.Path(readme)
    try:
        lines = readme.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ZooError(f"cannot read the model readme: {exc.strerror}", readme) from None
    stripped = [line.strip() for line in lines]
    if not stripped or stripped[0] != "---" or "---" not in stripped[1:]:
        raise ZooError("no YAML front matter (a block between '---' lines at the top)", readme)
    end = stripped.index("---", 1)
    try:
        meta = yaml.safe_load("\n".join(lines[1:end])) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 2 if mark is not None else None
        raise ZooError(f"front matter is not valid YAML ({getattr(exc, 'problem', exc)})", readme, line) from None
    if not isinstance(meta, dict):
        raise ZooError("front matter must be a mapping of fields", readme, 2)
    for field in REQUIRED_FIELDS:
        if field not in meta or meta[field] in (None, ""):
            raise ZooError(f"front matter lacks the required field '{field}'", readme)
    for field in ("caffemodel", "deploy"):
        if field in meta:
            file_inside(readme.parent, meta[field], field, readme)
    size = meta.get("caffemodel_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ZooError(f"caffemodel_size: must be a positive number of bytes, got {size!r}", readme)
    return meta


@dataclasses.dataclass
class ZooModel:
    """One model folder: its metadata and where its files are."""

    key: str  # the folder name, used as zoo:KEY
    folder: pathlib.Path
    meta: dict

    @property
    def deploy(self):
        return file_inside(self.folder, self.meta.get("deploy", "deploy.prototxt"), "deploy")

    @property
    def cached_weights(self):
        return file_inside(cache_dir() / check_model_name(self.key), self.meta["caffemodel"], "caffemodel")

    def weights_path(self):
        """The weights file if present (in the model folder or the cache), else None."""
        for candidate in (file_inside(self.folder, self.meta["caffemodel"], "caffemodel"), self.cached_weights):
            if candidate.is_file():
                return candidate
        return None

    def sha1_ok(self, path=None):
        path = path or self.weights_path()
        return path is not None and sha1_of(path) == str(self.meta["sha1"]).lower()


def _candidate_folders():
    for root in search_path():
        if root.is_dir():
            for folder in sorted(root.iterdir()):
                if (folder / "readme.md").is_file():
                    yield folder


def list_models():
    """Every model on the search path (the first folder of each name wins)."""
    seen = {}
    for folder in _candidate_folders():
        if folder.name not in seen:
            seen[folder.name] = ZooModel(folder.name, folder, read_front_matter(folder / "readme.md"))
    return list(seen.values())


def find_model(name):
    name = check_model_name(name[len(PREFIX):] if name.startswith(PREFIX) else name)
    for root in search_path():
        folder = root / name
        if (folder / "readme.md").is_file():
            return ZooModel(name, folder, read_front_matter(folder / "readme.md"))
    known = sorted({f.name for f in _candidate_folders()})
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ZooError(f"unknown zoo model '{name}'{hint}; known models: {', '.join(known) or 'none'}")


def is_zoo_spec(value):
    return isinstance(value, str) and value.startswith(PREFIX)


def resolve_weights(spec):
    """Path of the weights for ``zoo:NAME`` (verified by sha1); other values pass through."""
    if not is_zoo_spec(spec):
        return spec
    model = find_model(spec)
    path = model.weights_path()
    if path is None:
        raise ZooError(f"weights of zoo model '{model.key}' are not fetched yet: run `brewnet zoo fetch {model.key}`")
    if not model.sha1_ok(path):
        raise ZooError(f"{path}: sha1 does not match the readme of '{model.key}' "
                       f"(run `brewnet zoo fetch {model.key}` to download it again)")
    return str(path)


def resolve_model(spec):
    """Path of the deploy prototxt for ``zoo:NAME``; other values pass through."""
    if not is_zoo_spec(spec):
        return spec
    model = find_model(spec)
    if not model.deploy.is_file():
        raise ZooError(f"zoo model '{model.key}' has no {model.deploy.name} in {model.folder}")
    return str(model.deploy)
