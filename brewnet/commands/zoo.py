"""`brewnet zoo ...`: list, inspect, fetch, verify and import model-zoo entries."""

import pathlib

import click

from brewnet import zoo as zoo_lib


@click.group("zoo")
def zoo_group():
    """The local model zoo (Caffe model-zoo folders; see `brewnet zoo list`)."""


@zoo_group.command("list")
def list_cmd():
    """Every model on the zoo path, with license and weights status."""
    models = zoo_lib.list_models()
    if not models:
        click.echo("no zoo models found (search path: %s)" % ", ".join(map(str, zoo_lib.search_path())))
        return
    rows = [("NAME", "LICENSE", "WEIGHTS", "SHA1", "TITLE")]
    for model in models:
        path = model.weights_path()
        verified = "-" if path is None else ("ok" if model.sha1_ok(path) else "MISMATCH")
        rows.append((model.key, str(model.meta["license"]), "present" if path else "not fetched", verified,
                     str(model.meta["name"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])


@zoo_group.command("info")
@click.argument("name")
def info_cmd(name):
    """Front matter, files and weights status of one model."""
    model = zoo_lib.find_model(name)
    for key, value in model.meta.items():
        click.echo(f"{key}: {value}")
    click.echo(f"folder: {model.folder}")
    for proto in sorted(model.folder.glob("*.prototxt")):
        click.echo(f"prototxt: {proto.name}")
    path = model.weights_path()
    click.echo(f"weights: {path if path else 'not fetched (brewnet zoo fetch ' + model.key + ')'}")
    if path:
        click.echo(f"sha1: {'verified' if model.sha1_ok(path) else 'MISMATCH'}")


def _readme_url(model):
    """The readme's caffemodel_url: http(s), or a file inside the model folder (bundled models)."""
    url = str(model.meta["caffemodel_url"])
    if url.startswith(("http://", "https://")):
        return url
    if "://" in url:
        raise zoo_lib.ZooError(f"caffemodel_url: only http(s) URLs or a file inside the model folder, got {url!r}",
                               model.folder / "readme.md")
    return zoo_lib.file_inside(model.folder, url, "caffemodel_url", model.folder / "readme.md").resolve().as_uri()


class _DownloadBar:
    """click's progress bar (shown on a terminal) fed by zoo.download's progress(done, total)."""

    def __init__(self, label):
        self.label, self.bar, self.shown = label, None, 0

    def __call__(self, done, total):
        if total is None:  # the server gave no length: nothing to measure against
            return
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label)
            self.bar.__enter__()
        self.bar.update(done - self.shown)
        self.shown = done

    def close(self):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@zoo_group.command("fetch")
@click.argument("name")
@click.option("--url", help="Download from this http(s) or file URL instead of the readme's caffemodel_url.")
@click.option("--timeout", default=30.0, show_default=True, help="Network timeout in seconds.")
@click.option("--deadline", default=zoo_lib.DEADLINE, show_default=True,
              help="Seconds the whole download may take (a later fetch resumes it).")
def fetch_cmd(name, url, timeout, deadline):
    """Download a model's weights into the zoo cache, verifying the sha1."""
    model = zoo_lib.find_model(name)
    present = model.weights_path()
    if present and model.sha1_ok(present):
        click.echo(f"{model.key}: weights already present and verified at {present}")
        return
    url = url or _readme_url(model)
    bar = _DownloadBar(f"fetching {model.cached_weights.name}")
    try:
        dest = zoo_lib.download(url, model.cached_weights, model.meta["sha1"], timeout=timeout, progress=bar,
                                max_bytes=model.meta.get("caffemodel_size"), deadline=deadline)
    finally:
        bar.close()
    click.echo(f"{model.key}: fetched {dest} (sha1 verified)")


@zoo_group.command("verify")
@click.argument("name")
def verify_cmd(name):
    """Check a model's weights against the sha1 in its readme."""
    model = zoo_lib.find_model(name)
    path = model.weights_path()
    if path is None:
        raise zoo_lib.ZooError(f"weights of '{model.key}' are not fetched yet: run `brewnet zoo fetch {model.key}`")
    if not model.sha1_ok(path):
        raise zoo_lib.ZooError(f"sha1 of {path} does not match the readme of '{model.key}'")
    click.echo(f"{model.key}: {path} sha1 ok")


@zoo_group.command("path")
@click.argument("name")
@click.option("--weights", is_flag=True, help="Print the weights file instead of the folder.")
def path_cmd(name, weights):
    """Where a model's folder (or weights) is."""
    model = zoo_lib.find_model(name)
    click.echo(zoo_lib.resolve_weights("zoo:" + model.key) if weights else model.folder)


def _check_model_folder(folder):
    """A folder is importable when its readme, prototxts and (present) weights all check out."""
    from brewnet import netdef

    meta = zoo_lib.read_front_matter(folder / "readme.md")
    protos = sorted(folder.glob("*.prototxt"))
    if not protos:
        raise zoo_lib.ZooError("no .prototxt files in the model folder", folder)
    for proto in protos:
        reader = netdef.read_solver if "solver" in proto.name else netdef.read_net
        reader(proto)
    weights = folder / meta["caffemodel"]
    if weights.is_file() and zoo_lib.sha1_of(weights) != str(meta["sha1"]).lower():
        raise zoo_lib.ZooError(f"sha1 does not match the readme's {meta['sha1']}", weights)
    return meta, protos, weights.is_file()


@zoo_group.command("add")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path))
def add_cmd(folder):
    """Import a Caffe model folder (readme.md + prototxts [+ weights]) into the user's zoo."""
    meta, protos, has_weights = _check_model_folder(folder.resolve())
    dest = zoo_lib.import_folder(folder.resolve(), zoo_lib.cache_dir())
    click.echo(f"added '{dest.name}' ({meta['name']}): {len(protos)} prototxt(s), "
               f"weights {'verified' if has_weights else 'not included (brewnet zoo fetch ' + dest.name + ')'}")


COMMANDS = [zoo_group]
