"""Caffe's spellings on the `brewnet` command line: '_' or '-' in command and flag
names, and gflags' single-dash long flags and boolean values (brewnet/cli.py)."""

import click
import pytest
from click.testing import CliRunner

from brewnet.cli import BrewnetGroup, gflags_args, main, normalize_name


@click.command("some_tool")
@click.argument("paths", nargs=-1)
@click.option("--resize_height", type=int, default=0)
@click.option("--shuffle", is_flag=True)
@click.option("--color/--no-color", default=True)
@click.option("-v", "--verbose", is_flag=True)
def some_tool(paths, resize_height, shuffle, color, verbose):
    click.echo(f"{list(paths)} {resize_height} {shuffle} {color} {verbose}")


@click.group(cls=BrewnetGroup, context_settings={"token_normalize_func": normalize_name})
def group():
    pass


group.add_command(some_tool)


def rewrite(*args):
    with click.Context(group) as ctx:
        return gflags_args(some_tool, ctx, list(args))


def invoke(*args):
    result = CliRunner().invoke(group, list(args))
    assert result.exit_code == 0, result.output
    return result.output.strip()


def test_gflags_args_rewrites_only_long_options_of_the_command():
    assert rewrite("-resize_height", "2", "-resize-height=3", "-shuffle", "a") == \
        ["--resize_height", "2", "--resize-height=3", "--shuffle", "a"]
    assert rewrite("-shuffle=true", "--shuffle=0", "-color=false", "-color=yes", "-no_color=false") == \
        ["--shuffle", "--no-color", "--color", "--color"]
    # short options, values, unknown names, negative numbers and everything after -- stay as given
    assert rewrite("-v", "-x", "-nope", "-5", "-", "--", "-shuffle") == ["-v", "-x", "-nope", "-5", "-", "--", "-shuffle"]
    assert rewrite("-shuffle=maybe") == ["-shuffle=maybe"]  # left for click to refuse


@pytest.mark.parametrize("args", [
    ["some_tool", "--resize_height", "4", "--shuffle", "x"],
    ["some-tool", "--resize-height", "4", "--shuffle", "x"],
    ["some_tool", "-resize_height", "4", "-shuffle", "x"],
    ["some-tool", "-resize-height=4", "-shuffle=true", "x"],
    ["some_tool", "x", "--resize_height=4", "--shuffle=1"],
])
def test_every_spelling_reaches_the_same_command(args):
    assert invoke(*args) == "['x'] 4 True True False"


def test_flags_after_double_dash_are_arguments():
    assert invoke("some_tool", "-v", "--", "-shuffle") == "['-shuffle'] 0 False True True"


def test_a_command_registered_with_dashes_answers_to_underscores_too():
    @click.command("device-query")
    def device_query():
        click.echo("ok")

    group.add_command(device_query)
    try:
        assert invoke("device_query") == invoke("device-query") == "ok"
    finally:
        del group.commands["device-query"]


def test_brewnet_commands_take_caffe_spellings(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text('name: "n" layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 } } }\n')
    plain = CliRunner().invoke(main, ["check", "--phase", "train", str(net)])
    assert plain.exit_code == 0, plain.output
    for args in (["check", "-phase", "train", str(net)], ["check", "-phase=train", str(net)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and result.output == plain.output, result.output
    result = CliRunner().invoke(main, ["nonsense-command"])
    assert result.exit_code == 2 and "No such command" in result.output
