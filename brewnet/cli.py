"""The `brewnet` command. Each subcommand lives in brewnet/commands/<name>.py
and exposes ``COMMANDS`` (a list of click commands); they are found here.

Mistakes in the user's files or flags end with one line on stderr and a
non-zero exit; tracebacks are for brewnet's own bugs only.

Names are spelled as in Caffe or as click does: a command or a long flag may use
'_' or '-' (convert_imageset / convert-imageset, --resize_height / --resize-height),
and a top-level command's long flags also take gflags' single dash and boolean
values (-resize_height 256, -backend=lmdb, -shuffle, --shuffle=false).
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
    from brewnet.netdef.errors import DefinitionError

    # every error about a user's files is a DefinitionError (layers' LayerError, the zoo's
    # ZooError, unknown layer types ...); DeviceError: no GPU where one was asked for
    return (DefinitionError, DeviceError, FileNotFoundError, FileExistsError, IsADirectoryError,
            NotADirectoryError, PermissionError)


def normalize_name(token):
    """The one spelling of a command or flag name: Caffe's '_' for click's '-'."""
    return token.replace("-", "_")


_GFLAGS_TRUE = {"true", "t", "yes", "y", "1"}
_GFLAGS_FALSE = {"false", "f", "no", "n", "0"}


def _gflags_token(arg, longs, shorts, ctx):
    """The click spelling of one argument, as a list of 0 or 1 tokens."""
    if len(arg) < 3 or not arg.startswith("-") or arg in shorts:
        return [arg]
    dashes = 2 if arg.startswith("--") else 1
    name, eq, value = arg[dashes:].partition("=")
    option = longs.get(normalize_name(name))
    if option is None:
        return [arg]
    if not (eq and option.is_bool_flag):
        return [arg] if dashes == 2 else [f"-{arg}"]
    # gflags gives booleans a value: --shuffle=true, -shuffle=false (--no-x=true for a --x/--no-x flag)
    value = value.lower()
    if value not in _GFLAGS_TRUE | _GFLAGS_FALSE:
        return [arg]  # click says what is wrong
    negative = any(normalize_name(opt) == normalize_name(f"--{name}") for opt in option.secondary_opts)
    if (value in _GFLAGS_TRUE) != negative:
        return [option.opts[0]]
    if option.secondary_opts:
        return [option.secondary_opts[0]]
    return [] if not option.get_default(ctx) else [arg]


def gflags_args(command, ctx, args):
    """``args`` for ``command`` with Caffe's gflags spellings of its long options in
    click's: -name VALUE, -name=VALUE and -flag become --name..., and a boolean flag
    given a value (--flag=true, -flag=false) becomes the flag or nothing. Tokens that
    are no long option of the command (values, paths, short options) and everything
    after "--" are left alone."""
    longs, shorts = {}, set()
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            for opt in param.opts + param.secondary_opts:
                if opt.startswith("--"):
                    longs[normalize_name(opt[2:])] = param
                else:
                    shorts.add(opt)
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + list(args[i:])
        out.extend(_gflags_token(arg, longs, shorts, ctx))
    return out


# Caffe's names for commands brewnet calls otherwise
ALIASES = {"device_query": "device"}


class BrewnetGroup(click.Group):
    """brewnet's command group: Caffe's spellings of command and flag names (see the
    module docstring), Caffe's command names (ALIASES) and one-line errors for the
    user's mistakes."""

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is None:
            wanted = normalize_name(cmd_name)
            for name in (wanted, ALIASES.get(wanted)):
                command = next((c for key, c in self.commands.items() if normalize_name(key) == name), None)
                if command is not None:
                    break
        return command

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not isinstance(command, click.Group):
            rest = gflags_args(command, ctx, rest)
        return name, command, rest

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _user_error_types() as exc:
            message = str(exc)
            if isinstance(exc, OSError) and exc.filename and exc.strerror:
                message = f"{exc.filename}: {exc.strerror}"
            click.echo(f"brewnet: error: {message}", err=True)
            sys.exit(1)


@click.group(cls=BrewnetGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                  "token_normalize_func": normalize_name})
@click.version_option(package_name="brewnet")
def main():
    """brewnet: train Caffe nets from prototxt files, on numpy or cupy.

    Commands and flags take Caffe's spellings as well as click's: convert_imageset
    or convert-imageset; --resize_height, --resize-height or -resize_height.
    """


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
