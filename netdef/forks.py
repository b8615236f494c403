"""The fork superset of Caffe's schema.

BVLC's ``caffe.proto`` stays as it is, field for field. Each Caffe fork whose layers
brewnet runs has a fragment in ``netdef/forks/<name>.proto``: proto2 message blocks whose
fields are added, at that fork's own field numbers, to the BVLC message of the same name
(new messages are added whole). A fragment starts with header comments::

    // fork: SSD
    // repo: weiliu89/caffe (branch ssd)
    // layers: Permute PriorBox Normalize DetectionOutput

``superset_text()`` is caffe.proto with every fragment merged in; ``scripts/make_schema.py``
compiles it into ``netdef/caffe_pb2.py`` (still file "caffe.proto", package "caffe"), so
text and binary files written by those forks parse, and protoc itself refuses two forks
claiming one field number. ``fork_of_layer`` tells which fork a layer type comes from.
"""

import functools
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
BVLC_PROTO = os.path.join(HERE, "caffe.proto")
FRAGMENTS = os.path.join(HERE, "forks")

_HEADER = re.compile(r"^//\s*(fork|repo|layers):\s*(.*?)\s*$", re.M)
_MESSAGE = re.compile(r"^message\s+(\w+)\s*\{", re.M)


class Fork:
    """One fragment: its fork's name, repository, layer types and proto text."""

    def __init__(self, path):
        self.path = path
        with open(path, encoding="utf-8") as f:
            self.text = f.read()
        header = {key: value for key, value in _HEADER.findall(self.text)}
        base = os.path.basename(path)
        if "fork" not in header:
            raise ValueError(f"{path}: a fork fragment starts with a '// fork: NAME' line")
        self.name = header["fork"]
        self.repo = header.get("repo", "")
        self.layers = header.get("layers", "").split()
        self.key = os.path.splitext(base)[0]

    def describe(self):
        return f"{self.name} ({self.repo})" if self.repo else self.name


@functools.lru_cache(maxsize=None)
def forks():
    """Every fragment in netdef/forks, in file-name order."""
    if not os.path.isdir(FRAGMENTS):
        return ()
    names = sorted(n for n in os.listdir(FRAGMENTS) if n.endswith(".proto"))
    return tuple(Fork(os.path.join(FRAGMENTS, n)) for n in names)


def fork_of_layer(layer_type):
    """The Fork whose fragment lists ``layer_type``, or None for BVLC's own layers."""
    for fork in forks():
        if layer_type in fork.layers:
            return fork
    return None


def _top_level_blocks(text):
    """{message name: (start of body, index of its closing brace)} for top-level messages."""
    blocks = {}
    for match in _MESSAGE.finditer(text):
        depth, i = 1, match.end()
        while depth:
            ch = text[i]
            if ch == "/" and text.startswith("//", i):  # braces inside comments do not count
                i = text.index("\n", i)
                continue
            depth += {"{": 1, "}": -1}.get(ch, 0)
            i += 1
        blocks[match.group(1)] = (match.end(), i - 1)
    return blocks


def superset_text(bvlc_text=None, fragments=None):
    """caffe.proto with every fork fragment merged in (see the module docstring)."""
    if bvlc_text is None:
        with open(BVLC_PROTO, encoding="utf-8") as f:
            bvlc_text = f.read()
    fragments = forks() if fragments is None else fragments
    insertions = {}  # closing-brace index in bvlc_text -> text to put before it
    appended = []
    for fork in fragments:
        base_blocks = _top_level_blocks(bvlc_text)
        for name, (start, end) in _top_level_blocks(fork.text).items():
            body = fork.text[start:end].strip("\n")
            if name in base_blocks:
                where = base_blocks[name][1]
                insertions[where] = insertions.get(where, "") + f"  // {fork.name}\n{body}\n"
            else:
                message_start = fork.text.rfind("message", 0, start)
                appended.append(f"// {fork.name}\n{fork.text[message_start:end + 1]}\n")
    out, last = [], 0
    for where in sorted(insertions):
        out.append(bvlc_text[last:where])
        out.append(insertions[where])
        last = where
    out.append(bvlc_text[last:])
    if appended:
        out.append("\n// Messages the forks added\n\n" + "\n".join(appended))
    return "".join(out)
