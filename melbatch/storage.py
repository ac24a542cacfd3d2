"""Every place is a URI: the only module that talks to fsspec.

``s3://bucket/prefix`` (s3fs; endpoint and credentials from the standard AWS environment variables,
profile or instance role, e.g. ``AWS_ENDPOINT_URL`` for S3-compatible servers), a local path,
``file://…``, ``memory://…``, and gs/az when their fsspec packages are installed.

Writes are atomic: locally a temporary name is renamed into place; object stores publish an object
only when its upload completes. So a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import http.client
import io
import os
import posixpath
import re
import stat
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, ClassVar, TypeVar

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem
from pyarrow.fs import FSSpecHandler, PyFileSystem

from melbatch import URI

T = TypeVar("T")

# Reads of audio objects: big enough blocks that a sequential decode makes few requests, small
# enough that opening many files at once stays cheap.
READ_BLOCK_BYTES = 8 * 1024 * 1024
# S3 clients, bounded in attempts and time (read from the environment when a client is made, so a
# Ray job or cron entry can set them; the names are botocore's own where it has one):
#   AWS_MAX_ATTEMPTS (4)      botocore attempts per request, with exponential backoff and jitter
#   AWS_RETRY_MODE (adaptive) adaptive also slows the client down after 503 SlowDown
#   MELBATCH_S3_CONNECT_TIMEOUT_S (5), MELBATCH_S3_READ_TIMEOUT_S (60)   deadlines per connect and per
#                             socket read: a stalled connection fails and is retried, it never hangs a task
# s3fs repeats a call S3FS_TRIES times at most (it covers what botocore cannot: a reply body cut off
# mid-transfer); reading a whole object nests two such loops. So one call makes at most
# S3FS_TRIES² x AWS_MAX_ATTEMPTS requests (16 by default), and then raises TransientStorageError
# (see :func:`retrying` for the rounds above that); then the run fails, and re-running resumes it.
S3_DEFAULTS = {"AWS_MAX_ATTEMPTS": "4", "AWS_RETRY_MODE": "adaptive", "MELBATCH_S3_CONNECT_TIMEOUT_S": "5",
               "MELBATCH_S3_READ_TIMEOUT_S": "60"}
S3FS_TRIES = 2
# A read of an object, or a whole-object write, that still fails with TransientStorageError is made
# again (after 1 s, then 2 s) before the task gives up: at most CALL_TRIES x 16 requests per object.
CALL_TRIES = 3


def s3_client_settings() -> dict[str, Any]:
    """The botocore client config of every S3 filesystem (see :data:`S3_DEFAULTS`)."""
    env = {k: os.environ.get(k) or v for k, v in S3_DEFAULTS.items()}
    return {"retries": {"total_max_attempts": int(env["AWS_MAX_ATTEMPTS"]), "mode": env["AWS_RETRY_MODE"]},
            "connect_timeout": float(env["MELBATCH_S3_CONNECT_TIMEOUT_S"]),
            "read_timeout": float(env["MELBATCH_S3_READ_TIMEOUT_S"])}

# Listing: prefixes are expanded (one delimited LIST each) until there are this many, which are
# then listed recursively in parallel, each one a paginated listing of up to 1,000 keys a request.
LIST_PARALLEL = 16
LIST_FANOUT_DEPTH = 3


class StorageError(RuntimeError):
    """A place cannot be listed, read or written; the message says which and what to check."""


class TransientStorageError(StorageError):
    """The store kept failing (throttling, 5xx, resets, timeouts, replies cut off) after every retry.

    Nothing is wrong with the object or the settings as far as melbatch can tell: the work is made
    again (:func:`retrying`), and a run that still fails can be re-run (finished work is kept).
    """


def translate_error(uri: URI, action: str, e: BaseException) -> BaseException:
    """What a failed storage call means for melbatch.

    ``FileNotFoundError`` stays itself (the caller knows whether absence is an error);
    ``PermissionError`` becomes a :class:`StorageError` (fix the credentials or policy); an error of
    the store or the network becomes :class:`TransientStorageError`; anything else (a bug) is
    returned unchanged.
    """
    if isinstance(e, StorageError | FileNotFoundError):
        return e
    if isinstance(e, PermissionError):
        return StorageError(f"{action} {uri}: access denied ({_one_line(e)}). {_hint(uri)}")
    if isinstance(e, OSError) and ("://" not in uri or uri.startswith("file://") or e.errno in _PERMANENT_ERRNOS):
        return StorageError(f"{action} {uri}: {type(e).__name__}: {_one_line(e)}. {_hint(uri)}")
    if isinstance(e, _transient_types()):
        return TransientStorageError(f"{action} {uri} failed after retries: {type(e).__name__}: "
                                     f"{_one_line(e)}. The store or the network kept failing")
    return e


# What s3fs makes of S3 error codes that no retry mends (a bad name or request, a redirect to another
# region, a method the store lacks); 5xx, SlowDown and timeouts keep other numbers.
_PERMANENT_ERRNOS = {errno.EINVAL, errno.ENAMETOOLONG, errno.EMSGSIZE, errno.EPERM, errno.ENOSYS, errno.EREMCHG,
                     errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR, errno.EEXIST}


@functools.cache
def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError, http.client.HTTPException]
    for module, name in (("aiohttp", "ClientError"), ("botocore.exceptions", "BotoCoreError"),
                         ("botocore.exceptions", "ClientError")):
        with contextlib.suppress(ImportError, AttributeError):
            types.append(getattr(__import__(module, fromlist=[name]), name))
    return tuple(types)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def retrying(call: Callable[[], T], tries: int = CALL_TRIES, pause_s: float = 1.0) -> T:
    """``call()``, made again after a pause (doubling) while it raises :class:`TransientStorageError`,
    ``tries`` times in all. For idempotent work only: reading an object, writing one whole."""
    for i in range(tries):
        try:
            return call()
        except TransientStorageError as e:
            if i == tries - 1:
                raise
            print(f"warning: {e}; trying again in {pause_s * 2**i:g} s (round {i + 2} of {tries})", file=sys.stderr,
                  flush=True)  # in the job's log: the store is in trouble before the run stops
            time.sleep(pause_s * 2**i)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _translated(uri: URI, action: str) -> Iterator[None]:
    try:
        yield
    except BaseException as e:
        t = translate_error(uri, action, e)
        if t is e:
            raise
        raise t from None


@dataclass(frozen=True)
class ObjectRef:
    """The identity of one input object: where it is and which version of it we saw."""

    uri: URI
    etag: str
    size: int

    def key(self) -> str:
        return f"{self.uri}\t{self.etag}\t{self.size}"


def filesystem(uri: URI) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for any URI or local path.

    Listings are never cached: Ray workers in other processes write into the same prefixes, and a
    cached listing in the driver would miss their files or name ones since deleted.
    """
    options: dict[str, Any] = {"use_listings_cache": False}
    if uri.startswith(("s3://", "s3a://")):
        options["config_kwargs"] = s3_client_settings()
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as e:
        raise StorageError(f"cannot open {uri!r}: {e}. Install the fsspec package for that scheme "
                           "(s3fs for s3://, gcsfs for gs://, adlfs for az://)") from None
    if "config_kwargs" in options:
        fs.retries = S3FS_TRIES  # s3fs's own retry loop (a class attribute there, not a constructor argument)
    if isinstance(fs, LocalFileSystem) and "%" in path and not os.path.lexists(path):
        real = unescape_name(path)  # an escaped name (escape_name) that is not also a literal one
        if os.path.lexists(real):
            path = real
    return fs, path


def escape_name(path: str) -> str:
    """A local path as text: the bytes of a name that is not UTF-8 (an old recorder's Latin-1 ``é``,
    which Python reads as a lone surrogate) become ``%XX``, and ``%`` in such a name ``%25``, so
    the URI can be written to Parquet and JSON and still leads back to the file (:func:`filesystem`).
    A name that is valid UTF-8 is returned as it is."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        pass
    text = os.fsencode(path).decode("utf-8", "surrogateescape")
    return "".join("%25" if c == "%" else f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff" else c
                   for c in text)


def unescape_name(path: str) -> str:
    """The inverse of :func:`escape_name`: ``%XX`` back to bytes, decoded as the OS decodes names."""
    raw = re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), path.encode("utf-8"))
    return os.fsdecode(raw)


def arrow_filesystem(uri: URI) -> tuple[Any, str]:
    """(pyarrow filesystem, path) for libraries that speak pyarrow.fs (Ray Data, Ray Train).

    Local paths get ``None`` (pyarrow's own local filesystem); anything else is this module's fsspec
    filesystem wrapped for pyarrow, so endpoints and credentials resolve exactly as everywhere else.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        return None, path
    return PyFileSystem(FSSpecHandler(fs)), path


def is_local(uri: URI) -> bool:
    return isinstance(filesystem(uri)[0], LocalFileSystem)


def canonical(uri: URI) -> URI:
    """The one spelling of a place: ``s3://b/k``, ``file:///abs/path``."""
    fs, path = filesystem(uri)
    return _unstrip(fs, path)


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> URI:
    return fs.unstrip_protocol(path.rstrip("/")) if path not in ("", "/") else fs.unstrip_protocol(path)


def join(base: URI, *parts: str) -> URI:
    return posixpath.join(base.rstrip("/"), *parts)


def relative(uri: URI, base: URI) -> str:
    """``uri`` relative to the folder ``base`` (both canonical)."""
    prefix = base.rstrip("/") + "/"
    if not uri.startswith(prefix):
        raise ValueError(f"{uri} is not under {base}")
    return uri[len(prefix):]


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
    under, base_uri = base + "/", _unstrip(fs, base)
    try:
        with _translated(src, "listing"):
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
                    uri = f"{base_uri}/{rel}" if inside and name is path else _unstrip(fs, name)
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
    real_root = os.path.realpath(root)
    try:
        st = os.stat(root)
    except OSError:
        st = None
    walked = {(st.st_dev, st.st_ino)} if st else set()  # every real folder entered, (device, inode)
    listed: set[tuple[int, int]] = set()  # files reached through links out of the folder

    def inside(real: str) -> bool:
        return real == real_root or real.startswith(real_root.rstrip("/") + "/")

    def walk(path: str, rel: str, chain: tuple[tuple[int, int], ...]) -> Iterator[tuple[str, dict]]:
        try:
            with os.scandir(path) as it:
                entries = sorted(((e.name + "/" if _is_dir(e) else e.name), e) for e in it)
        except OSError as e:
            if not rel:  # the folder itself: list_objects says it does not exist, or cannot be read
                raise
            notes.unreadable(f"{rel}/ ({e.strerror or type(e).__name__})", f"{root_uri}/{escape_name(rel)}/")
            return
        for _, e in entries:
            name = f"{rel}/{e.name}" if rel else e.name
            try:
                link = e.is_symlink()
                st = e.stat()  # follows a link
            except FileNotFoundError:  # a dangling link, or a file or folder gone while we list
                if e.is_symlink():
                    notes.add("dangling", f"{name} -> {_readlink(e.path)}")
                elif _is_dir(e):  # a mount that went away: its files may be back tomorrow, not deleted
                    notes.unreadable(f"{name}/ (gone while listed)", f"{root_uri}/{escape_name(name)}/")
                continue
            except OSError as err:  # ELOOP: a link to itself; EACCES: a folder that may be read but not entered
                if err.errno == errno.ELOOP:
                    notes.add("loop", f"{name} -> {_readlink(e.path)}")
                else:
                    why = err.strerror or type(err).__name__
                    notes.unreadable(f"{name} ({why})", f"{root_uri}/{escape_name(name)}")
                continue
            identity = (st.st_dev, st.st_ino)
            is_dir = stat.S_ISDIR(st.st_mode)
            if not (is_dir or stat.S_ISREG(st.st_mode)):  # a FIFO would block a reader forever, /dev/zero never end
                notes.add("special", f"{name} ({_special_kind(st.st_mode)})")
                continue
            if link and os.path.realpath(e.path).startswith(PSEUDO_FILESYSTEMS):
                notes.add("special", f"{name} -> {_readlink(e.path)} (the system's own files)")
                continue
            if link:
                if identity in chain:
                    notes.add("loop", f"{name} -> {_readlink(e.path)}")
                    continue
                if inside(os.path.realpath(e.path)) or identity in (walked if is_dir else listed):
                    notes.add("repeat", f"{name} -> {_readlink(e.path)}")
                    continue
            if is_dir:
                if identity in chain:  # a bind mount of a folder that holds it
                    notes.add("loop", f"{name}/")
                    continue
                walked.add(identity)
                yield from walk(e.path, name, (*chain, identity))
                continue
            if link:
                listed.add(identity)
            yield e.path, {"type": "file", "size": st.st_size, "mtime": st.st_mtime}

    yield from walk(root, "", tuple(walked))


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


# Objects up to this size are fetched in one request; larger ones are streamed in blocks.
WHOLE_READ_BYTES = 32 * 1024 * 1024


class GuardedReader(io.RawIOBase):
    """A read-only stream that remembers the first storage error it saw.

    Decoders such as libsndfile call ``read`` through C callbacks that swallow Python exceptions
    and see a short read instead; ``error`` (already passed through :func:`translate_error`) lets
    the caller tell a failed read from a bad file.
    """

    def __init__(self, f: IO[bytes], uri: URI = ""):
        self._f = f
        self.uri = uri
        self.error: BaseException | None = None
        self.at_end = False  # a read came back short: the decoder has seen the end of the object

    def _failed(self, e: BaseException) -> BaseException:
        self.error = self.error or translate_error(self.uri, "reading", e)
        return self.error

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._f.read(n)
        except Exception as e:
            raise self._failed(e) from None
        if n is None or n < 0 or len(data) < n:
            self.at_end = True
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            return self._f.seek(offset, whence)
        except Exception as e:
            raise self._failed(e) from None

    def tell(self) -> int:
        return self._f.tell()


@contextlib.contextmanager
def open_input(uri: URI, size: int | None = None) -> Iterator[GuardedReader]:
    """A seekable binary stream over an object.

    Small objects (``size`` known and up to :data:`WHOLE_READ_BYTES`) are fetched in one request;
    larger ones are read in large blocks as the decoder asks, never whole.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        with _translated(uri, "opening"):
            f = open(path, "rb")  # noqa: SIM115 (closed below)
        with f:
            yield GuardedReader(f, uri)
        return
    if size is not None and size <= WHOLE_READ_BYTES:
        with _translated(uri, "reading"):
            data = fs.cat_file(path)
        if len(data) != size:  # replaced since it was listed (a reply cut short fails in the HTTP layer)
            raise StorageError(f"reading {uri} returned {len(data)} bytes, not the {size} it had when listed: "
                               "it changed meanwhile; the next run lists it again")
        yield GuardedReader(io.BytesIO(data), uri)
        return
    with _translated(uri, "opening"):
        f = fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead")
    with f:
        yield GuardedReader(f, uri)


def read_bytes(uri: URI) -> bytes:
    fs, path = filesystem(uri)
    try:
        with _translated(uri, "reading"):
            return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"{uri} does not exist") from None


def read_many(uris: list[URI]) -> dict[URI, bytes]:
    """Several small objects at once (object stores fetch them concurrently)."""
    if not uris:
        return {}
    fs, _ = filesystem(uris[0])
    paths = {filesystem(u)[1]: u for u in uris}
    with _translated(uris[0], "reading"):
        return {paths[p]: data for p, data in fs.cat(list(paths)).items()}


def exists(uri: URI) -> bool:
    fs, path = filesystem(uri)
    with _translated(uri, "looking for"):
        return fs.exists(path)


@contextlib.contextmanager
def _local_tmp(path: str) -> Iterator[str]:
    """A temporary file name beside local ``path`` (its folder created), removed if still there after."""
    os.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(uri: URI) -> Iterator[IO[bytes]]:
    """Open ``uri`` for writing so that it appears complete or not at all."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        with _local_tmp(path) as tmp:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, path)
    else:  # object stores: the object is published when the (multipart) upload completes
        with _translated(uri, "writing"):
            f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            if hasattr(f, "discard"):
                f.discard()  # abandon the upload: nothing is published
                f.closed = True  # and don't let a later close() try to finish it
            raise
        else:
            with _translated(uri, "writing"):
                f.close()


def write_bytes(uri: URI, data: bytes) -> None:
    """Write a whole object atomically (made again if the store keeps failing: same name, same bytes)."""

    def write() -> None:
        with atomic_open(uri) as f:
            f.write(data)

    retrying(write)


def create_exclusive(uri: URI, data: bytes) -> bool:
    """Create ``uri`` with ``data`` only if nothing is there; ``False`` if something already was.

    S3: one PUT with ``If-None-Match: *`` (the store decides; two writers can never both succeed).
    Local: the data goes to a temporary file that is hard-linked into place, which fails if the
    name exists, so readers see the whole file or none. Other stores: exists-then-write (not atomic).
    A create whose reply is lost may have happened: callers compare content when this says ``False``.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        with _local_tmp(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
    with _translated(uri, "creating"):
        if fs.protocol in ("s3", "s3a") or "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else ()):
            try:
                fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True


def list_files(prefix: URI, suffix: str = "") -> list[URI]:
    """Files directly or recursively under ``prefix`` ending in ``suffix`` (empty if none)."""
    fs, path = filesystem(prefix)
    with _translated(prefix, "listing"):
        if not fs.exists(path):
            return []
        return sorted(_unstrip(fs, p) for p in fs.find(path) if p.endswith(suffix))


def list_names(prefix: URI) -> list[str]:
    """The names directly under ``prefix`` (files and folders, one delimited listing), sorted; empty if none."""
    fs, path = filesystem(prefix)
    with _translated(prefix, "listing"):
        if not fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def delete(uris: list[URI]) -> None:
    if not uris:
        return
    fs, _ = filesystem(uris[0])
    with _translated(uris[0], "deleting"):
        fs.rm([filesystem(u)[1] for u in uris])


def delete_tree(prefix: URI) -> None:
    """Everything under ``prefix``, and the folder itself where folders exist."""
    fs, path = filesystem(prefix)
    with _translated(prefix, "deleting"):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def check_readable(src: URI) -> None:
    """Fail fast, before any cluster work, if ``src`` cannot be reached or does not exist."""
    fs, path = filesystem(src)
    try:
        ok = fs.exists(path)
    except Exception as e:
        raise StorageError(f"cannot reach {src}: {type(e).__name__}: {e}. {_hint(src)}") from None
    if not ok:
        raise StorageError(f"{src} does not exist (nothing to read). {_hint(src)}")


def check_writable(dst: URI) -> None:
    """Fail fast if ``dst`` cannot be written: write and delete a small probe object."""
    probe = join(dst, f"_probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"melbatch write probe")
        delete([probe])
    except Exception as e:
        raise StorageError(f"cannot write to {dst}: {type(e).__name__}: {e}. {_hint(dst)}") from None


def _hint(uri: URI) -> str:
    if uri.startswith("s3://"):
        return ("Check the bucket name, AWS_ENDPOINT_URL (for S3-compatible servers), AWS_DEFAULT_REGION, "
                "and the credentials in the environment, ~/.aws or the instance role.")
    return "Check the path and its permissions."
