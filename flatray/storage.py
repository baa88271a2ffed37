"""Small JSON files in the sweep's storage, local or cloud (s3://, gs://), through pyarrow's filesystems as Ray does.

Writes are atomic: a local file is written to a temporary name and renamed; a cloud object appears whole or not at
all. So a reader sees either no `summary.json` or a complete one, even if the writer dies half-way.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if "://" in root else str(Path(root, *parts))


def absolute(path: str) -> str:
    """Ray wants an absolute path or a URI."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def write_json(path: str, obj) -> None:
    text = json.dumps(obj, indent=2, default=str)
    if "://" in path:
        fs, key = _fs(path)
        with fs.open_output_stream(key) as f:
            f.write(text.encode())
        return
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str):
    """The object in `path`, or None when it does not exist (or is not valid JSON: a partial foreign write)."""
    try:
        if "://" in path:
            fs, key = _fs(path)
            with fs.open_input_stream(key) as f:
                return json.loads(f.read().decode())
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    except OSError as err:  # pyarrow reports a missing object as OSError
        if "not found" in str(err).lower() or "does not exist" in str(err).lower():
            return None
        raise


def append_line(path: str, obj) -> None:
    """One JSON line appended (local) or a whole rewrite (cloud objects cannot be appended to)."""
    if "://" in path:
        lines = read_lines(path) + [obj]
        fs, key = _fs(path)
        with fs.open_output_stream(key) as f:
            f.write("".join(json.dumps(x, default=str) + "\n" for x in lines).encode())
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")


def read_lines(path: str) -> list:
    try:
        if "://" in path:
            fs, key = _fs(path)
            with fs.open_input_stream(key) as f:
                text = f.read().decode()
        else:
            text = Path(path).read_text()
    except (FileNotFoundError, OSError):
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def list_files(folder: str) -> list[str]:
    """Names of the files directly in `folder`."""
    if "://" in folder:
        import pyarrow.fs

        fs, key = _fs(folder)
        infos = fs.get_file_info(pyarrow.fs.FileSelector(key))
        return [Path(i.path).name for i in infos if i.type == pyarrow.fs.FileType.File]
    return [p.name for p in Path(folder).iterdir() if p.is_file()]


def write_text(path: str, text: str) -> None:
    if "://" in path:
        fs, key = _fs(path)
        with fs.open_output_stream(key) as f:
            f.write(text.encode())
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def read_text(path: str) -> str | None:
    try:
        if "://" in path:
            fs, key = _fs(path)
            with fs.open_input_stream(key) as f:
                return f.read().decode()
        return Path(path).read_text()
    except (FileNotFoundError, OSError):
        return None
