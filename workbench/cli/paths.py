"""Output paths of the commands, checked before any work: a file flag must not name a folder, a folder flag must
not name a file (ValueError naming the flag)."""

from __future__ import annotations

from pathlib import Path


def check_output_file(path: str | Path, flag: str) -> Path:
    """``path`` as a Path; ValueError when it is an existing folder or its parent is a file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name such as {path / 'output.png'}")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
    return path


def check_output_folder(path: str | Path, flag: str) -> Path:
    """``path`` as a Path; ValueError when it (or one of its parents) is an existing file."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{flag} {path}: {folder} is a file, not a folder")
    return path
