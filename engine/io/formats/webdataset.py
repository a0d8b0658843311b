"""Webdataset (img2dataset) tars, streamed: member headers counted, samples grouped and read as the tar streams
by, nothing extracted to disk. The rules every format follows are in engine/io/readers.py; a tar's own:

  * Grouping: consecutive members with the same key form one sample; the key is the member path up to the
    first dot of its basename (`a/b/000123.jpg` -> `a/b/000123`). Directories and members whose basename has
    no dot or starts with a dot are not samples (webdataset skips them too). A key that comes back later, not
    next to its first run, is a second sample (webdataset does the same).
  * Image member: first of jpg/jpeg/png/webp/gif/bmp/tif/tiff (case-insensitive). Caption: `KEY.txt` wins over
    the `caption` field of `KEY.json`; the other json fields go to `meta` (a differing json caption is kept
    as `meta.json_caption`). Non-UTF-8 caption bytes are decoded with errors="replace" and
    `meta.caption_invalid_utf8 = true`. A member over MAX_MEMBER_BYTES -> "member_too_large" row.
  * Unsafe members (symlinks, hard links, devices, fifos): the whole sample becomes a rejected row
    ("read", "unsafe_member"), image None; the member's data is never read.
  * Corrupt tar: a sample is planned from its first member header. When the stream breaks (ReadError,
    truncated data, bad gzip), the sample in progress (possibly incomplete) and every remaining planned
    position are yielded as "corrupt_input" rows. tarfile ends silently on a bad header mid-file; planning
    and reading then see the same samples. Member data is read right after its header, never seeking back,
    so a .tar.gz is decompressed once.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from engine.io.formats.common import (
    Options,
    decode_text,
    derived_key,
    dump_meta,
    fill_corrupt,
    open_input,
    sanitize_key,
    source_stem,
)
from engine.io.inputs import Unit
from engine.records import Record

log = logging.getLogger(__name__)

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
MAX_MEMBER_BYTES = 512 * 1024 * 1024  # a larger tar member makes its sample a "member_too_large" row
# Errors that mean "the tar stream is broken" rather than a bug.
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def _split_name(name: str) -> tuple[str, str] | None:
    """Member name -> (raw key, extension) webdataset style, or None when it is not part of a sample."""
    name = name.replace("\\", "/")
    dirname, base = posixpath.split(name)
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{dirname}/{stem}" if dirname else stem), ext


@contextmanager
def _open_tar(path: str, options: Options = None):
    with open_input(path, options) as f, tarfile.open(fileobj=f, mode="r:*") as tf:
        yield tf


def _iter_members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Iterate member headers without keeping them all (TarFile otherwise remembers every TarInfo)."""
    while True:
        member = tf.next()
        if member is None:
            return
        tf.members.clear()  # bounded memory for tars with millions of members; we never look back
        yield member


def count_tar(path: str, options: Options = None) -> int:
    """Number of samples in a tar, reading member headers only; -1 when it cannot be read at all."""
    n = 0
    key: str | None = None
    try:
        with _open_tar(path, options) as tf:
            for member in _iter_members(tf):
                split = None if member.isdir() else _split_name(member.name)
                if split is not None and split[0] != key:
                    key = split[0]
                    n += 1  # counted at its first header: a sample cut by corruption still gets a row
    except _TAR_ERRORS as exc:
        log.warning("%s: tar breaks after %d samples (%s); planning what was readable", path, n, exc)
        return n if n else -1
    return n


def _unsafe(member: tarfile.TarInfo) -> bool:
    return not member.isfile()  # symlinks, hard links, devices, fifos, ... (directories are filtered earlier)


class _Group:
    """Members of one tar sample, with the data of the members we use read as they stream by."""

    __slots__ = ("raw_key", "members", "data")

    def __init__(self, raw_key: str) -> None:
        self.raw_key = raw_key
        self.members: list[tarfile.TarInfo] = []
        self.data: dict[str, bytes] = {}  # lower-case extension -> bytes (first member of each ext)


def _wanted_ext(ext: str) -> bool:
    return ext in IMAGE_EXTS or ext in ("txt", "json")


def _tar_record(unit: Unit, position: int, stem: str, group: _Group) -> Record:
    raw_key = group.raw_key
    row = unit.start + position
    key = sanitize_key(raw_key) or derived_key(stem, row)
    meta: dict[str, Any] = {}
    if key != raw_key:
        meta["original_key"] = raw_key
    record = Record(key=key, source=unit.source or unit.path, unit=unit.index, position=position)
    bad = [m for m in group.members if _unsafe(m)]
    if bad:
        meta["unsafe_members"] = [m.name for m in bad]
        record.meta = dump_meta(meta)
        kinds = ", ".join(f"{m.name} ({_member_type(m)})" for m in bad)
        record.reject("read", "unsafe_member", f"tar member(s) that are not regular files: {kinds}")
        return record
    too_big = [m for m in group.members if m.size > MAX_MEMBER_BYTES]
    if too_big:
        record.meta = dump_meta(meta)
        big = too_big[0]
        record.reject("read", "member_too_large", f"{big.name}: {big.size} bytes > {MAX_MEMBER_BYTES}")
        return record
    data = group.data
    image_ext = next((e for e in IMAGE_EXTS if e in data), None)
    caption: str | None = None
    if "json" in data:
        try:
            extra = json.loads(decode_text(data["json"], meta, "json"))
        except ValueError as exc:
            meta["json_error"] = str(exc)
            extra = None
        if isinstance(extra, dict):
            json_caption = extra.pop("caption", None)
            if json_caption is not None and not isinstance(json_caption, str):
                json_caption = str(json_caption)
            for k, v in extra.items():
                meta.setdefault(k, v)
            caption = json_caption
        elif extra is not None:
            meta["json"] = extra
    if "txt" in data:
        txt = decode_text(data["txt"], meta, "caption")
        if caption is not None and caption != txt:
            meta["json_caption"] = caption
        caption = txt
    record.raw_caption = caption
    if image_ext is not None:
        record.image = data[image_ext]
        meta.setdefault("image_ext", image_ext)
    record.meta = dump_meta(meta)
    if image_ext is None:
        exts = sorted({(_split_name(m.name) or ("", "?"))[1].lower() for m in group.members})
        record.reject("read", "missing_image", f"sample {raw_key!r} has no image member (found: {exts})")
    return record


def _member_type(m: tarfile.TarInfo) -> str:
    if m.issym():
        return "symlink"
    if m.islnk():
        return "hardlink"
    if m.isdev():
        return "device/fifo"
    return f"type {m.type!r}"


def read_tar(unit: Unit, options: Options = None) -> Iterator[Record]:
    # Member data is read as soon as its header is seen (never seeking back: .tar.gz stays a single pass).
    stem = source_stem(unit.path)
    position = 0
    index = -1  # sample index in the file of `group`
    group: _Group | None = None
    try:
        with _open_tar(unit.path, options) as tf:
            for member in _iter_members(tf):
                if member.isdir():
                    continue
                split = _split_name(member.name)
                if split is None:
                    continue
                raw_key, ext = split
                if group is None or raw_key != group.raw_key:
                    if group is not None and index >= unit.start:
                        yield _tar_record(unit, position, stem, group)
                        position += 1
                    group = None
                    index += 1
                    if index >= unit.stop and not unit.to_end:
                        break
                    group = _Group(raw_key)
                group.members.append(member)
                ext = ext.lower()
                if (
                    index >= unit.start
                    and member.isfile()
                    and _wanted_ext(ext)
                    and ext not in group.data
                    and member.size <= MAX_MEMBER_BYTES
                ):
                    f = tf.extractfile(member)
                    assert f is not None
                    group.data[ext] = f.read()
            if group is not None and unit.start <= index and (index < unit.stop or unit.to_end):
                yield _tar_record(unit, position, stem, group)
                position += 1
    except _TAR_ERRORS as exc:
        message = f"{type(exc).__name__}: {exc}"
        log.warning("%s: corrupt input at sample %d (%s)", unit.path, unit.start + position, message)
        pending = group.raw_key if group is not None and index >= unit.start else None
        yield from fill_corrupt(unit, position, stem, message, pending)
        return
    if position < unit.size:
        message = f"input has fewer samples than planned ({unit.start + position} < {unit.stop})"
        log.warning("%s: %s", unit.path, message)
        yield from fill_corrupt(unit, position, stem, message, None)
