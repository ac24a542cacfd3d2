"""Listing an archive: every object under a URI that passes the filters, in key order, as
:class:`~melbatch.storage.ObjectRef` s (:func:`list_objects`) or one Arrow table (:func:`list_table`).

Object stores are listed in parallel over prefixes (:func:`find_parallel`); a local folder is walked
one folder at a time, each real file and folder listed once, and what the walk met besides files
(links in loops, repeats, unreadable folders, dangling links, FIFOs and devices) is told in
:class:`ListingNotes`. Reading and writing objects is :mod:`melbatch.storage`'s.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import posixpath
import stat
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from melbatch import URI
from melbatch.config import ConfigError
from melbatch.storage import ObjectRef, StorageError, escape_name, filesystem, translated, unstrip

# Listing: prefixes are expanded (one delimited LIST each) until there are this many, which are
# then listed recursively in parallel, each one a paginated listing of up to 1,000 keys a request.
LIST_PARALLEL = 16
LIST_FANOUT_DEPTH = 3


def _etag(info: dict[str, Any]) -> str:
    for k in ("VersionId", "ETag", "etag", "generation", "md5Hash"):
        if info.get(k):
            return str(info[k]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"mtime-{int(float(mtime or 0) * 1e6)}"


def _matches(rel: str, include: tuple[str, ...], exclude: tuple[str, ...], extensions: tuple[str, ...]) -> bool:
    ext = rel.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(rel) else ""
    if extensions and ext not in extensions:
        return False
    if include and not any(fnmatch.fnmatchcase(rel, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(rel, p) for p in exclude)


def list_objects(src: URI, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                 extensions: tuple[str, ...] = (), skipped: Counter | None = None,
                 notes: ListingNotes | None = None) -> Iterator[ObjectRef]:
    """Every object under ``src`` (recursively) that passes the filters, in key order.

    ``include``/``exclude`` are glob patterns on the key relative to ``src`` (``*`` also crosses
    ``/``); ``extensions`` are lower-case, without dots. The objects the filters leave out are
    counted by extension into ``skipped`` (so a run can say what it did not read). On object stores
    the listing runs in parallel over prefixes (:func:`find_parallel`). A local folder's links,
    loops and unreadable folders are told in ``notes`` (:func:`_walk_local`).
    """
    fs, root = filesystem(src)
    local = isinstance(fs, LocalFileSystem)
    base = root.rstrip("/")
    under, base_uri = base + "/", unstrip(fs, base)
    try:
        with translated(src, "listing"):
            if fs.isfile(root):
                found: Iterator[tuple[str, dict]] = iter([(root, fs.info(root))])
            elif local:
                found = _walk_local(root, notes if notes is not None else ListingNotes(), base_uri)
            else:
                found = _popped_in_order(find_parallel(fs, root))
            for path, info in found:
                if info.get("type") == "directory":
                    continue
                inside = path.startswith(under)  # the usual case, without relpath's and unstrip's work per key
                rel = path[len(under):] if inside else posixpath.relpath(path, base) if path != base else \
                    posixpath.basename(path)
                if _matches(rel, include, exclude, extensions):
                    name = escape_name(path) if local else path
                    uri = f"{base_uri}/{rel}" if inside and name is path else unstrip(fs, name)
                    yield ObjectRef(uri=uri, etag=_etag(info), size=int(info.get("size") or 0))
                elif skipped is not None:
                    name = posixpath.basename(rel)
                    skipped["." + name.rsplit(".", 1)[-1].lower() if "." in name else "(no extension)"] += 1
    except FileNotFoundError:
        raise StorageError(f"{src} does not exist") from None


def _popped_in_order(found: dict[str, dict]) -> Iterator[tuple[str, dict]]:
    """A listing's entries in key order, each let go of as it is passed on."""
    for path in sorted(found):
        yield path, found.pop(path)


class ListingNotes:
    """What a listing of a local folder met besides the files it lists, each kind with its count and
    a few examples (paths relative to the folder), for a run's summary and manifest:

    - ``loop``: a link to a folder that holds it (``loop -> ..``, common on NAS mounts), not followed;
    - ``repeat``: a link to a file or folder that is listed at its own place already (inside the
      folder, or reached through another link), not listed a second time;
    - ``unreadable``: a folder that could not be read (permission denied, a mount gone mid-listing):
      its files are not listed, and a scan does not take them for deleted (:attr:`unreadable_uris`);
    - ``dangling``: a link that leads nowhere;
    - ``special``: a FIFO (reading it would block forever), a device (``/dev/zero`` never ends), a
      socket, or a link into ``/proc``, ``/sys`` or ``/dev``: not files, never read.
    """

    KINDS: ClassVar[dict[str, str]] = {"loop": "links to a folder that holds them: not followed",
                                       "repeat": "links to files or folders listed at their own place: listed once",
                                       "unreadable": "folders that could not be read: their files are not listed "
                                                     "(a scan keeps them)",
                                       "dangling": "links that lead nowhere",
                                       "special": "FIFOs, devices, sockets and links into /proc, /sys or /dev: "
                                                  "not files, not read"}
    EXAMPLES = 3

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.unreadable_uris: list[URI] = []  # every unreadable folder, as a URI prefix ending in "/"

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < self.EXAMPLES:
            shown.append(example)

    def unreadable(self, example: str, uri: URI) -> None:
        """A folder (``uri`` ending in ``/``) or file that could not be read: told, and kept from a scan's deletions."""
        self.add("unreadable", example)
        self.unreadable_uris.append(uri)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """``{kind: {"count": n, "examples": [...]}}`` (JSON: a summary, a manifest)."""
        return {k: {"count": n, "examples": self.examples[k]} for k, n in sorted(self.counts.items())}


def _walk_local(root: str, notes: ListingNotes, root_uri: URI) -> Iterator[tuple[str, dict]]:
    """Every file under a local folder with its size and mtime, in key order, one folder read at a time
    (fsspec's ``find`` holds an info dict per file of the whole tree, ~1 KB each, and stats through
    Python: ~4x slower). A folder sorts as its name plus ``/``, so the order is the keys' order.

    Each real file and folder is listed once, at its own place: a link whose target lies inside the
    folder is left to the walk that reaches the target; a link out of it (``2024 -> /mnt/disk2/2024``)
    is followed, each folder it leads to once; a link to a folder that holds it is a loop. What was
    not listed is told in ``notes``."""
    yield from _LocalWalk(root, notes, root_uri).files()


class _LocalWalk:
    """One walk of a local folder (:func:`_walk_local`): the real folders entered and the files reached
    through links out of it, by (device, inode), so that each is listed once."""

    def __init__(self, root: str, notes: ListingNotes, root_uri: URI) -> None:
        self.root, self.notes, self.root_uri = root, notes, root_uri
        self.real_root = os.path.realpath(root)
        try:
            st = os.stat(root)
        except OSError:
            st = None
        self.walked = {(st.st_dev, st.st_ino)} if st else set()  # every real folder entered
        self.listed: set[tuple[int, int]] = set()  # files reached through links out of the folder

    def files(self) -> Iterator[tuple[str, dict]]:
        return self._walk(self.root, "", tuple(self.walked))

    def _inside(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self.real_root.rstrip("/") + "/")

    def _uri(self, rel: str) -> URI:
        return f"{self.root_uri}/{escape_name(rel)}"

    def _walk(self, path: str, rel: str, chain: tuple[tuple[int, int], ...]) -> Iterator[tuple[str, dict]]:
        try:
            with os.scandir(path) as it:
                entries = sorted(((e.name + "/" if _is_dir(e) else e.name), e) for e in it)
        except OSError as e:
            if not rel:  # the folder itself: list_objects says it does not exist, or cannot be read
                raise
            self.notes.unreadable(f"{rel}/ ({e.strerror or type(e).__name__})", self._uri(rel) + "/")
            return
        for _, e in entries:
            name = f"{rel}/{e.name}" if rel else e.name
            st = self._listable(e, name, chain)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                self.walked.add((st.st_dev, st.st_ino))
                yield from self._walk(e.path, name, (*chain, (st.st_dev, st.st_ino)))
                continue
            if e.is_symlink():
                self.listed.add((st.st_dev, st.st_ino))
            yield e.path, {"type": "file", "size": st.st_size, "mtime": st.st_mtime}

    def _listable(self, e: os.DirEntry, name: str, chain: tuple[tuple[int, int], ...]) -> os.stat_result | None:
        """The entry's stat (its target's, for a link) when it is a file or folder to list here; else
        ``None``, with what it is told in the notes."""
        notes = self.notes
        try:
            link = e.is_symlink()
            st = e.stat()  # follows a link
        except FileNotFoundError:  # a dangling link, or a file or folder gone while we list
            if e.is_symlink():
                notes.add("dangling", f"{name} -> {_readlink(e.path)}")
            elif _is_dir(e):  # a mount that went away: its files may be back tomorrow, not deleted
                notes.unreadable(f"{name}/ (gone while listed)", self._uri(name) + "/")
            return None
        except OSError as err:  # ELOOP: a link to itself; EACCES: a folder that may be read but not entered
            if err.errno == errno.ELOOP:
                notes.add("loop", f"{name} -> {_readlink(e.path)}")
            else:
                notes.unreadable(f"{name} ({err.strerror or type(err).__name__})", self._uri(name))
            return None
        identity = (st.st_dev, st.st_ino)
        is_dir = stat.S_ISDIR(st.st_mode)
        if not (is_dir or stat.S_ISREG(st.st_mode)):  # a FIFO would block a reader forever, /dev/zero never end
            notes.add("special", f"{name} ({_special_kind(st.st_mode)})")
        elif link and os.path.realpath(e.path).startswith(PSEUDO_FILESYSTEMS):
            notes.add("special", f"{name} -> {_readlink(e.path)} (the system's own files)")
        elif link and identity in chain:
            notes.add("loop", f"{name} -> {_readlink(e.path)}")
        elif link and (self._inside(os.path.realpath(e.path)) or identity in (self.walked if is_dir else self.listed)):
            notes.add("repeat", f"{name} -> {_readlink(e.path)}")
        elif is_dir and identity in chain:  # a bind mount of a folder that holds it
            notes.add("loop", f"{name}/")
        else:
            return st
        return None


PSEUDO_FILESYSTEMS = ("/proc/", "/sys/", "/dev/")  # what a link may lead to that is no archive: never followed


def _special_kind(mode: int) -> str:
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else "not a file")


def _is_dir(e: os.DirEntry) -> bool:
    try:
        return e.is_dir()
    except OSError:
        return False


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


# A listing as columns: one row per object, ~100 bytes each instead of a Python object per key.
LISTING_SCHEMA = pa.schema([pa.field("uri", pa.string(), nullable=False), pa.field("etag", pa.string(), nullable=False),
                            pa.field("size", pa.int64(), nullable=False)])
_LISTING_CHUNK = 65536


def list_table(src: URI, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
               extensions: tuple[str, ...] = (), skipped: Counter | None = None,
               notes: ListingNotes | None = None) -> pa.Table:
    """:func:`list_objects` as one table (:data:`LISTING_SCHEMA`), in key order, built a chunk at a time:
    what a driver keeps of an archive of millions of objects."""
    chunks: list[pa.RecordBatch] = []
    cols: tuple[list, list, list] = ([], [], [])

    def flush() -> None:
        arrays = [pa.array(c, f.type) for c, f in zip(cols, LISTING_SCHEMA, strict=True)]
        chunks.append(pa.record_batch(arrays, schema=LISTING_SCHEMA))
        for c in cols:
            c.clear()

    for ref in list_objects(src, include, exclude, extensions, skipped, notes):
        cols[0].append(ref.uri)
        cols[1].append(ref.etag)
        cols[2].append(ref.size)
        if len(cols[0]) == _LISTING_CHUNK:
            flush()
    flush()
    return pa.Table.from_batches(chunks, LISTING_SCHEMA)


def nothing_matches(src: URI, include: tuple[str, ...], exclude: tuple[str, ...],
                    extensions: tuple[str, ...]) -> ConfigError:
    """The error of a run whose filters leave no object of ``src`` to read, naming the filters."""
    return ConfigError(f"no audio objects under {src} match extensions={list(extensions)}, include={list(include)}, "
                       f"exclude={list(exclude)}")


def refs_of(listing: pa.Table) -> list[ObjectRef]:
    """The rows of a listing table as object identities (for the objects a run will read)."""
    columns = (listing.column(n).to_pylist() for n in LISTING_SCHEMA.names)
    return [ObjectRef(u, e, s) for u, e, s in zip(*columns, strict=True)]


def find_parallel(fs: fsspec.AbstractFileSystem, root: str, parallel: int = LIST_PARALLEL) -> dict[str, dict]:
    """Every object under ``root`` with its info, listed with up to ``parallel`` requests in flight.

    A local folder is walked directly. On an object store the prefixes under ``root`` are expanded
    level by level (one delimited LIST per prefix, the objects met on the way are kept) until there
    are at least ``parallel`` of them or :data:`LIST_FANOUT_DEPTH` levels, and each is then listed
    recursively (paginated, 1,000 keys a request) on a thread of its own. An archive laid out by
    date or device (``2026/11/24/…``) thus lists as fast as ``parallel`` listings in a row.
    """
    if isinstance(fs, LocalFileSystem) or parallel <= 1:
        return fs.find(root, detail=True)
    found: dict[str, dict] = {}
    prefixes = [root]
    with ThreadPoolExecutor(parallel) as pool:
        for _ in range(LIST_FANOUT_DEPTH):
            if len(prefixes) >= parallel:
                break
            deeper = []
            for entries in pool.map(lambda p: fs.ls(p, detail=True), prefixes):
                for e in entries:
                    if e.get("type") == "directory":
                        deeper.append(e["name"])
                    else:
                        found[e["name"]] = e
            prefixes = deeper
            if not prefixes:
                return found
        for part in pool.map(lambda p: fs.find(p, detail=True), prefixes):
            found.update(part)
    return found
