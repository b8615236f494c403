"""Downloading zoo weights: http(s) or file URLs, resumable, sha1-verified, atomic.

A download is bounded: it may not grow past the size the server announced (or the
readme's ``caffemodel_size``), nor past MAX_BYTES, nor last longer than its deadline.
Bytes go to ``NAME.part``; a connection that drops keeps the .part so the next fetch
resumes it, and only a file whose sha1 matches takes the final name.
"""

import http.client
import os
import pathlib
import shutil
import time
import urllib.error
import urllib.request

from brewnet.zoo.registry import ZooError, sha1_of

CHUNK = 1 << 16
# the largest Caffe zoo models are about 0.6 GB; BREWNET_ZOO_MAX_BYTES raises the ceiling
MAX_BYTES = int(os.environ.get("BREWNET_ZOO_MAX_BYTES", 4 << 30))
DEADLINE = 3600.0  # seconds for a whole download


def _open(url, offset, timeout):
    request = urllib.request.Request(url)
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(request, timeout=timeout)


def _announced_length(response, url):
    value = response.headers.get("Content-Length")
    if value is None:
        return None  # chunked, or a server that does not say
    if not value.strip().isdigit():
        raise ZooError(f"{url}: the server sent an invalid Content-Length {value!r}")
    return int(value)


def download(url, dest, sha1, timeout=30.0, progress=None, max_bytes=None, deadline=DEADLINE):
    """Fetch ``url`` to ``dest`` via ``dest.part``; a partial .part is resumed.

    ``max_bytes`` caps the file's size (MAX_BYTES at most); ``deadline`` bounds the
    whole download in seconds. The file only takes its final name once its sha1
    matches; on a mismatch the partial file is removed and ZooError raised.
    ``progress(done, total)`` is called as bytes arrive (total None when unknown).
    """
    dest = pathlib.Path(dest)
    cap = min(max_bytes or MAX_BYTES, MAX_BYTES)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    started = time.monotonic()
    try:
        response = _open(url, offset, timeout)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise ZooError(f"cannot download {url}: {reason}") from None
    with response:
        status = getattr(response, "status", 200)
        if offset and status != 206:
            offset = 0  # the server ignored the range: start again
        length = _announced_length(response, url)
        total = length + offset if length is not None else None
        if total is not None and total > cap:
            raise ZooError(f"{url}: {total} bytes is more than the {cap} allowed for this file")
        done = offset
        with open(part, "ab" if offset else "wb") as out:
            while True:
                if progress:
                    progress(done, total)
                if time.monotonic() - started > deadline:
                    raise ZooError(f"download of {url} took longer than {deadline:g} s "
                                   f"({done} bytes so far; run the fetch again to resume)")
                try:
                    block = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise ZooError(f"download of {url} broke off after {done} bytes: {exc or type(exc).__name__} "
                                   "(run the fetch again to resume)") from None
                if not block:
                    break
                done += len(block)
                if done > cap:
                    out.close()
                    part.unlink()
                    raise ZooError(f"{url}: more than the {cap} bytes allowed for this file; the download was "
                                   "discarded")
                out.write(block)
        if total is not None and done < total:
            raise ZooError(f"download of {url} broke off after {done} of {total} bytes "
                           "(run the fetch again to resume)")
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
    links = [str(path.relative_to(src)) for path in src.rglob("*") if path.is_symlink()]
    if links:
        # a link's target may be any file of the user's: copy what it points to by hand if meant
        raise ZooError(f"the model folder holds symbolic links ({', '.join(sorted(links))}); "
                       "zoo add copies regular files only", src)
    tmp = dest.with_name(dest.name + ".adding")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, symlinks=True)
    os.replace(tmp, dest)
    return dest
