"""The `brewnet` command. Each subcommand lives in brewnet/commands/<name>.py
and exposes ``COMMANDS`` (a list of click commands); they are found here.

Mistakes in the user's files or flags end with one line on stderr and a
non-zero exit; tracebacks are for brewnet's own bugs only.
"""

import atexit
import gc
import importlib
import pkgutil
import sys

import click

from . import commands as _commands_pkg


def _user_error_types():
    from brewnet.layers.kernels.backend import DeviceError
    from brewnet.layers.registry import UnknownLayerTypeError
    from brewnet.netdef.errors import DefinitionError

    return (DefinitionError, DeviceError, UnknownLayerTypeError, FileNotFoundError, IsADirectoryError,
            PermissionError)


class BrewnetGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _user_error_types() as exc:
            message = str(exc)
            if isinstance(exc, OSError) and exc.filename and exc.strerror:
                message = f"{exc.filename}: {exc.strerror}"
            click.echo(f"brewnet: error: {message}", err=True)
            sys.exit(1)


@click.group(cls=BrewnetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="brewnet")
def main():
    """brewnet: train Caffe nets from prototxt files, on numpy or cupy."""


def _register_commands():
    for info in sorted(pkgutil.iter_modules(_commands_pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{_commands_pkg.__name__}.{info.name}")
        for command in getattr(module, "COMMANDS", []):
            main.add_command(command)


_register_commands()

# At exit Python runs full garbage collections over every object still alive; with numba
# loaded (some 140,000 objects: its types, templates and registries, five times as many as
# without it) they take 0.2-0.3 s, as long as a whole small run. gc.freeze() takes the objects
# alive then out of those collections; the exit handlers (logging's flush among them) and module
# teardown run as before, only cycles still alive at exit go uncollected (their memory returns
# with the process).
atexit.register(gc.freeze)
