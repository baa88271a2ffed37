"""The one filesystem layer: files in a sweep's storage, local or cloud (s3://, gs://), through pyarrow.fs as Ray
does, and the atomic publication of folders built in local caches.

Writes are atomic: a local file is written under a temporary name and renamed; a cloud object appears whole or
not at all. So a reader sees either no `summary.json` or a complete one, even if the writer dies half-way.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if "://" in root else str(Path(root, *parts))


def absolute(path: str) -> str:
    """Ray wants an absolute path or a URI."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _fs(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(absolute(path))


def _missing(err: OSError) -> bool:
    """pyarrow reports a missing local file as FileNotFoundError and a missing object as a plain OSError."""
    text = str(err).lower()
    return isinstance(err, FileNotFoundError) or "not found" in text or "does not exist" in text


class StorageError(OSError):
    """A write to the sweep's storage failed (a full disk, no permission, an object store refusing): the message
    names the path, the reason and, for a local folder, the free space."""


def free_space(path: str) -> str:
    """ "N MiB free on MOUNT" for a local path (its nearest existing folder); "" for a cloud URI."""
    if "://" in path:
        return ""
    folder = Path(path).resolve()
    while not folder.exists():
        folder = folder.parent
    usage = shutil.disk_usage(folder)
    return f"{usage.free / 2 ** 20:.1f} MiB free of {usage.total / 2 ** 20:.0f} MiB"


def _failed(path: str, err: OSError) -> StorageError:
    reason = os.strerror(err.errno) if err.errno else str(err.strerror or err)  # pyarrow's own text is long
    free = free_space(path)
    return StorageError(f"{reason}{f' ({free})' if free else ''}: cannot write {path}")


def write_bytes(path: str, data: bytes) -> None:
    """Write a file whole, or raise StorageError and leave nothing behind (not even a partial temporary file)."""
    fs, key = _fs(path)
    parent = key.rsplit("/", 1)[0]
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    try:
        fs.create_dir(parent, recursive=True)
        if "://" in path:  # an object store publishes an object whole
            with fs.open_output_stream(key) as f:
                f.write(data)
            return
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, key)  # a rename: atomic on one filesystem
    except OSError as err:
        if "://" not in path and os.path.exists(tmp):
            os.remove(tmp)
        raise _failed(path, err) from None


def read_bytes(path: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    fs, key = _fs(path)
    try:
        with fs.open_input_stream(key) as f:
            return f.read()
    except OSError as err:
        if _missing(err):
            return None
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def read_text(path: str) -> str | None:
    data = read_bytes(path)
    return None if data is None else data.decode()


def strict_json(obj) -> str:
    """JSON that every parser reads: a non-finite float (a NaN loss of an epoch without training) becomes null."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=2, default=str, allow_nan=False)


def write_json(path: str, obj) -> None:
    write_text(path, strict_json(obj))


def read_json(path: str):
    """The object in `path`, or None when it does not exist (or is not valid JSON: a partial foreign write)."""
    text = read_text(path)
    try:
        return None if text is None else json.loads(text)
    except json.JSONDecodeError:
        return None


def append_line(path: str, obj) -> None:
    """One JSON line appended. The file is rewritten whole: cloud objects cannot be appended to, and the files
    appended to (attempts.jsonl) hold a line per attempt."""
    write_text(path, "".join(json.dumps(x, default=str) + "\n" for x in read_lines(path) + [obj]))


def read_lines(path: str) -> list:
    """The JSON lines of `path` ([] when missing); a torn line (a writer killed mid-write) is left out."""
    lines = []
    for line in (read_text(path) or "").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return lines


def delete_dir(path: str) -> None:
    """Remove a folder and everything in it; nothing happens when it is not there."""
    fs, key = _fs(path)
    try:
        fs.delete_dir(key)
    except OSError as err:
        if not _missing(err):
            raise


def list_files(folder: str) -> list[str]:
    """Names of the files directly in `folder`."""
    import pyarrow.fs

    fs, key = _fs(folder)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(key, allow_not_found=True))
    return [i.base_name for i in infos if i.type == pyarrow.fs.FileType.File]


def list_dirs(folder: str) -> list[str]:
    """Names of the folders directly in `folder`."""
    import pyarrow.fs

    fs, key = _fs(folder)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(key, allow_not_found=True))
    return [i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory]


def local_dir(root: str) -> Path:
    """The local side of a sweep folder: the folder itself, or, for a cloud one, a local folder named after its
    URI (results/cloud/s3/BUCKET/PREFIX/SWEEP). W&B's offline runs and the report's figures are written there:
    both libraries write local files."""
    if "://" not in root:
        return Path(root)
    scheme, rest = root.split("://", 1)
    return Path("results", "cloud", scheme, *rest.strip("/").split("/"))


def local_copy(uri: str) -> str:
    """A cloud file or folder copied to this machine once (under $FLATRAY_CACHE/remote/, named after the URI), for
    the libraries that read only local paths (from_pretrained, safetensors); a local path is returned as it is.
    Workers of one node that copy the same URI at once race safely (publish_folder)."""
    if "://" not in uri:
        return uri
    import tempfile

    import pyarrow.fs

    scheme, rest = uri.split("://", 1)
    cache = Path(os.environ.get("FLATRAY_CACHE", Path.home() / ".cache" / "flatray"))
    target = cache.joinpath("remote", scheme, *rest.strip("/").split("/"))
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fs, key = _fs(uri)
    info = fs.get_file_info(key)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such file or folder")
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".copy-"))
    if info.type == pyarrow.fs.FileType.File:
        (tmp / "file").write_bytes(read_bytes(uri))
        os.replace(tmp / "file", target)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        pyarrow.fs.copy_files(key, str(tmp), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        publish_folder(tmp, target)
    return str(target)


def publish_folder(tmp: Path, target: Path) -> bool:
    """Move a folder built in full at `tmp` (same filesystem) to `target` in one rename, so that concurrent
    builders race safely: False when another process published `target` first (`tmp` is then removed)."""
    try:
        os.rename(tmp, target)
        return True
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def delete(path: str) -> None:
    """Remove a file; nothing happens when it is not there."""
    fs, key = _fs(path)
    try:
        fs.delete_file(key)
    except OSError as err:
        if not _missing(err):
            raise
