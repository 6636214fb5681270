"""Checkpoints converted from `--hf DIR` / `--gguf FILE`, kept between runs.

The first start converts the source into `<cache>/converted/<name>-<key>`; later starts
with the same source load that directly. The key hashes the source's absolute path, the
size and mtime of each of its files, the stored dtype and the conversion format, so an
edited or replaced source converts again. Publishing is atomic (the checkpoint writer
renames a finished temporary directory into place) and processes converting the same
source take turns on a lock file: the second finds the first one's result and uses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator

from meshserve.models.checkpoint import FORMAT_VERSION, MANIFEST, CheckpointError, read_manifest
from meshserve.models.demo import cache_base

# Bump when conversion writes something different for the same source.
CONVERSION_VERSION = 1
KINDS = ("hf", "gguf")


def converted_root() -> str:
    return os.path.join(cache_base(), "converted")


def _source_files(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(os.path.join(path, n) for n in os.listdir(path)
                      if os.path.isfile(os.path.join(path, n)))
    if os.path.isfile(path):
        return [path]
    raise FileNotFoundError(f"{path}: no such file or directory")


def cache_key(source: str, kind: str, dtype: str | None = None) -> str:
    """Hex digest naming the conversion of `source` (an HF directory or a GGUF file)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    path = os.path.abspath(source)
    files = []
    for name in _source_files(path):
        st = os.stat(name)
        files.append([os.path.relpath(name, path) if name != path else "", st.st_size,
                      st.st_mtime_ns])
    payload = {"kind": kind, "path": path, "files": files, "dtype": dtype or "auto",
               "conversion": CONVERSION_VERSION, "checkpoint_format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_entry(source: str, kind: str, dtype: str | None = None) -> str:
    """The directory the conversion of `source` is (or will be) kept in."""
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.normpath(
        os.path.abspath(source))))[:60] or "model"
    return os.path.join(converted_root(), f"{label}-{cache_key(source, kind, dtype)[:24]}")


def _complete(entry: str) -> bool:
    if not os.path.exists(os.path.join(entry, MANIFEST)):
        return False
    try:
        read_manifest(entry)
    except (CheckpointError, ValueError, OSError):
        return False
    return True


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cached_checkpoint(
    source: str,
    kind: str,
    dtype: str | None = None,
    note: Callable[[str], None] = _note,
) -> str:
    """The converted checkpoint of `source`: from the cache, or converted into it now."""
    entry = cache_entry(source, kind, dtype)
    if _complete(entry):
        note(f"using the converted checkpoint of {source} cached in {entry}")
        return entry
    os.makedirs(converted_root(), exist_ok=True)
    with _locked(entry + ".lock"):
        if _complete(entry):  # another process converted it while we waited
            note(f"using the converted checkpoint of {source} cached in {entry}")
            return entry
        from meshserve.tools.convert import convert, convert_gguf

        note(f"converting {source} once into {entry} (later starts load it from there) ...")
        started = time.monotonic()
        run = convert_gguf if kind == "gguf" else convert
        # Whatever stands there without a readable manifest is a broken leftover.
        run(source, entry, dtype=dtype, overwrite=os.path.exists(entry), progress=False)
        note(f"converted {source} in {time.monotonic() - started:.1f} s")
    return entry


def main(argv: list[str]) -> int:
    """`python -m meshserve.tools.converted_cache KIND SOURCE`: convert into the cache
    (what a multi-host process runs before it joins its group)."""
    if len(argv) != 2 or argv[0] not in KINDS:
        print(f"usage: converted_cache {{{','.join(KINDS)}}} SOURCE", file=sys.stderr)
        return 2
    from meshserve.models.hf_weights import ConversionError

    try:
        cached_checkpoint(argv[1], argv[0])
    except (ConversionError, CheckpointError, OSError, ValueError) as e:
        print(f"meshserve: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
