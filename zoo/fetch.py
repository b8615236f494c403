"""Downloading zoo weights: http(s) or file URLs, resumable, sha1-verified, atomic."""

import os
import pathlib
import shutil
import urllib.error
import urllib.request

from brewnet.zoo.registry import ZooError, sha1_of

CHUNK = 1 << 16


def _open(url, offset, timeout):
    request = urllib.request.Request(url)
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(request, timeout=timeout)


def download(url, dest, sha1, timeout=30.0, progress=None):
    """Fetch ``url`` to ``dest`` via ``dest.part``; a partial .part is resumed.

    The file only takes its final name once its sha1 matches; on a mismatch
    the partial file is removed and ZooError raised. ``progress(done, total)``
    is called as bytes arrive (total None when the server does not say).
    """
    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ZooError(f"cannot download {url}: {reason}") from None
    with response:
        status = getattr(response, "status", 200)
        if offset and status != 206:
            offset = 0  # the server ignored the range: start again
        total = response.headers.get("Content-Length")
        total = int(total) + offset if total is not None else None
        done = offset
        with open(part, "ab" if offset else "wb") as out:
            while True:
                if progress:
                    progress(done, total)
                try:
                    block = response.read(CHUNK)
                except OSError as exc:
                    raise ZooError(f"download of {url} broke off: {exc} (run the fetch again to resume)") from None
                if not block:
                    break
                out.write(block)
                done += len(block)
    got = sha1_of(part)
    if got != str(sha1).lower():
        part.unlink()
        raise ZooError(f"{url}: sha1 {got} does not match the expected {sha1}; the download was discarded")
    os.replace(part, dest)
    return dest


def import_folder(src, dest_root):
    """Copy a checked model folder into a zoo root (used by `zoo add`)."""
    src = pathlib.Path(src)
    dest = pathlib.Path(dest_root) / src.name
    if dest.exists():
        raise ZooError(f"a zoo model named '{src.name}' already exists at {dest}")
    tmp = dest.with_name(dest.name + ".adding")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, dest)
    return dest
