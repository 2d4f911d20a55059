"""Writes that leave either the complete old artifact or the complete new one, never a mix.

A file is written under a temporary name in its folder, fsynced, given the umask's mode and
renamed over the target. A folder is built complete in a hidden sibling
(``.<name>.lowbit-tmp-<pid>``) and then exchanged with the old folder in one atomic step
(Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames); the old folder is then removed.
Temporary files and folders of a failed save are removed, and stale ones left by a killed process
are cleaned at the next save.
"""
from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path
from typing import Callable

from ..errors import FormatError

TMP_TAG = ".lowbit-tmp-"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def umask_mode(base: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(target: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary file that then replaces ``target`` atomically."""
    if target.is_dir():
        raise FormatError(f"{target}: is a folder; give a *.safetensors file name or the folder itself")
    tmp = target.with_name(f".{target.name}{TMP_TAG}{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def replace_folder(target: Path, build: Callable[[Path], None], replaceable: Callable[[Path], bool]) -> None:
    """``build(tmp)`` writes the new folder's files; it then replaces ``target`` as a whole.
    An existing ``target`` is replaced only when ``replaceable(target)`` says it holds nothing
    but a previous artifact (so a user's folder is never swept away)."""
    if target.exists() and not target.is_dir():
        raise FormatError(f"{target}: exists and is not a folder; refusing to overwrite it")
    if target.exists() and not replaceable(target):
        raise FormatError(f"{target}: holds files that lowbit did not write; refusing to replace "
                          "it (save into a new or empty folder)")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = target.with_name(f".{target.name}{TMP_TAG}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        build(tmp)
        for f in sorted(tmp.rglob("*"), reverse=True):  # files before their folders
            os.chmod(f, umask_mode(0o777 if f.is_dir() else 0o666))
            fsync_path(f)
        os.chmod(tmp, umask_mode(0o777))
        fsync_path(tmp)
        _swap_in(tmp, target)
        fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the old folder


def _swap_in(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        return
    old = target.with_name(f".{target.name}{TMP_TAG}old-{os.getpid()}")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def clean_stale(target: Path) -> None:
    """Remove temporary siblings of ``target`` whose writing process is gone."""
    prefix = f".{target.name}{TMP_TAG}"
    if not target.parent.is_dir():
        return
    for p in target.parent.iterdir():
        if p.name.startswith(prefix):
            pid = p.name[len(prefix):].removeprefix("old-")
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of this process's own earlier, failed save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
