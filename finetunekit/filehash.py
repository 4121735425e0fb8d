"""SHA-256 of files, each hashed once per process while unchanged (torch-free).

`sha256_file` is what the run's content hash (checkpoint.content_hash: resume's drift guard, the leakage
check, the decoded-image and feature cache keys) and the cache keys of weights files read. The start-up scan
(data.images.scan_images) reads each image's bytes once anyway, to check its header; it hashes those bytes
and hands the digest over with `remember`, so the content hash reads no file a second time. A remembered
digest is keyed by the file's path, size and modification time, as the computed ones are: a file changed
since is hashed again. Paths are compared as given (the data readers hand over normalized ones, str(Path)):
a path spelled differently is hashed again, never given another file's digest.
"""

from __future__ import annotations

import functools
import hashlib
import os

_known: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> digest, from the start-up scan


def remember(path: str, size: int, mtime_ns: int, digest: str) -> None:
    """Record the SHA-256 of `path`'s bytes as read when it had this size and modification time."""
    _known[(os.fspath(path), size, mtime_ns)] = digest


def sha256_file(path) -> str:
    st = os.stat(path)
    key = (os.fspath(path), st.st_size, st.st_mtime_ns)
    return _known.get(key) or _sha256_file(*key)


@functools.lru_cache(maxsize=1 << 17)
def _sha256_file(path: str, size: int, mtime_ns: int) -> str:  # a file hashed once per process while unchanged
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
