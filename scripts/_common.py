"""Shared bits of the conversion scripts: one-line errors, progress bars, DB output."""

import functools
import sys

import click

from brewnet.netdef import DefinitionError


def one_line_errors(func):
    """Turn user-facing failures into click's one-line "Error: ..." (exit status 1)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except DefinitionError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None

    return wrapper


def progress(iterable=None, length=None, label=""):
    """click's progress bar on stderr (shown only on a terminal)."""
    return click.progressbar(iterable, length=length, label=label, file=sys.stderr)


def warn(message):
    click.echo(f"warning: {message}", err=True)


def info(message):
    click.echo(message, err=True)


backend_option = click.option("--backend", type=click.Choice(["lmdb", "leveldb"]), default="lmdb",
                              show_default=True, help="Database format to write.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing database.")
