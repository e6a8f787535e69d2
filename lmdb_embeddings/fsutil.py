"""Filesystem helpers for building a directory beside its target and swapping it in."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import shutil
import uuid

import psutil

_RENAME_EXCHANGE = 2


_NAME_MAX = 255  # bytes in one file name (Linux filesystems)
_TEMP_SUFFIX = 48  # room for ".<purpose>-<pid>-<8 hex>" and the leading dot


def _temp_stem(name: str) -> str:
    """``name`` itself, or, when a temp name built on it would pass NAME_MAX, a short form that
    stays unique to it (a prefix, then a hash of the whole name)."""
    if len(os.fsencode(name)) + _TEMP_SUFFIX <= _NAME_MAX:
        return name
    digest = hashlib.blake2b(os.fsencode(name), digest_size=8).hexdigest()
    return f"{os.fsdecode(os.fsencode(name)[:64])}~{digest}"


def sibling_temp(path: str, purpose: str) -> str:
    """A fresh hidden path next to ``path`` (same filesystem, so rename is atomic)."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path.rstrip(os.sep))
    return os.path.join(parent, f".{_temp_stem(name)}.{purpose}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_stale_temps(path: str, purpose: str) -> list[str]:
    """Remove ``sibling_temp(path, purpose)`` leftovers of processes that died (kill -9).

    Only names of exactly that pattern whose pid no longer runs are touched.
    """
    parent, name = os.path.split(os.path.abspath(path).rstrip(os.sep))
    prefix = f".{_temp_stem(name)}.{purpose}-"
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        pid_text, _, suffix = entry[len(prefix):].partition("-")
        if not pid_text.isdigit() or len(suffix) != 8 or psutil.pid_exists(int(pid_text)):
            continue
        victim = os.path.join(parent, entry)
        if os.path.isdir(victim) and not os.path.islink(victim):
            shutil.rmtree(victim, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(victim)
        removed.append(victim)
    return removed


def fsync_dir(path: str) -> None:
    fsync_file(path, os.O_DIRECTORY)


def fsync_file(path: str, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def replace_dir(new: str, target: str) -> None:
    """Put directory ``new`` at ``target``; an existing ``target`` is replaced atomically.

    With RENAME_EXCHANGE there is no instant at which ``target`` is missing; without it
    the old directory is moved aside first and only deleted once the new one is in place.
    """
    new, target = os.path.abspath(new), os.path.abspath(target)
    parent = os.path.dirname(target)
    if not os.path.exists(target):
        os.rename(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now names the old directory
    else:
        aside = sibling_temp(target, "old")
        os.rename(target, aside)
        os.rename(new, target)
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(parent)


def allocated_bytes(path: str) -> int:
    """Bytes of disk a file really takes (its blocks), not its apparent size (a writemap store is sparse)."""
    return os.stat(path).st_blocks * 512


def dir_size(path: str) -> int:
    """Disk taken (allocated blocks) by the files of a directory."""
    return sum(allocated_bytes(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f)))


def free_bytes(path: str) -> int:
    """Bytes still available to this user on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
