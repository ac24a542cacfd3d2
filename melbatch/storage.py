"""Every place is a URI: the module that talks to fsspec (with :mod:`melbatch.listing`, which lists archives).

``s3://bucket/prefix`` (s3fs; endpoint and credentials from the standard AWS environment variables,
profile or instance role, e.g. ``AWS_ENDPOINT_URL`` for S3-compatible servers), a local path,
``file://…``, ``memory://…``, and gs/az when their fsspec packages are installed.

Writes are atomic: locally a temporary name is renamed into place; object stores publish an object
only when its upload completes. So a reader never sees half a file. Listing an archive is
:mod:`melbatch.listing`'s.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import http.client
import io
import os
import posixpath
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar

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
def translated(uri: URI, action: str) -> Iterator[None]:
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
    except OSError as e:  # a scheme that connects when opened (ftp://, sftp://): no such host, refused
        raise StorageError(f"cannot open {uri!r}: {e}. Check the host name and that it can be reached from here; "
                           "melbatch is tested on local folders and s3://") from None
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
    return unstrip(fs, path)


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> URI:
    return fs.unstrip_protocol(path.rstrip("/")) if path not in ("", "/") else fs.unstrip_protocol(path)


def join(base: URI, *parts: str) -> URI:
    return posixpath.join(base.rstrip("/"), *parts)


def relative(uri: URI, base: URI) -> str:
    """``uri`` relative to the folder ``base`` (both canonical)."""
    prefix = base.rstrip("/") + "/"
    if not uri.startswith(prefix):
        raise ValueError(f"{uri} is not under {base}")
    return uri[len(prefix):]


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
def arrow_input(uri: URI, whole: bool = True) -> Iterator[str | pa.BufferReader | GuardedReader]:
    """What pyarrow's Parquet reader is given for ``uri`` (``pq.read_table(src)``, ``pq.ParquetFile(src)``):
    a local file's path, which pyarrow opens natively, or a remote object's bytes fetched whole (one
    request, with :func:`read_bytes`' retries) in an Arrow buffer. Never a Python file object: pyarrow's
    reader keeps one in a task of its thread pool, which a pool thread drops a moment after the read
    returns, taking the GIL to do so; a thread that asks for the GIL while the interpreter finalizes is
    ended by pthread_exit, which C++ turns into std::terminate (SIGABRT after the process's output, seen
    twice in CI; apache/arrow#34314; a script of 8 threaded reads of file objects then exit aborted 5
    times in 400 runs). Errors while reading are translated as :func:`open_input`'s are.

    ``whole=False``, for a read of the footer alone (a schema, a row count) or a stream of row groups
    read in this thread (``iter_batches(use_threads=False)``): a remote object is opened as a stream
    (:func:`open_input`), not fetched whole."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem) or whole:
        with translated(uri, "reading"):
            yield path if isinstance(fs, LocalFileSystem) else pa.BufferReader(read_bytes(uri))
        return
    with open_input(uri) as f:
        yield f


@contextlib.contextmanager
def open_input(uri: URI, size: int | None = None) -> Iterator[GuardedReader]:
    """A seekable binary stream over an object.

    Small objects (``size`` known and up to :data:`WHOLE_READ_BYTES`) are fetched in one request;
    larger ones are read in large blocks as the decoder asks, never whole.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        with translated(uri, "opening"):
            f = open(path, "rb")  # noqa: SIM115 (closed below)
        with f:
            yield GuardedReader(f, uri)
        return
    if size is not None and size <= WHOLE_READ_BYTES:
        with translated(uri, "reading"):
            data = fs.cat_file(path)
        if len(data) != size:  # replaced since it was listed (a reply cut short fails in the HTTP layer)
            raise StorageError(f"reading {uri} returned {len(data)} bytes, not the {size} it had when listed: "
                               "it changed meanwhile; the next run lists it again")
        yield GuardedReader(io.BytesIO(data), uri)
        return
    with translated(uri, "opening"):
        f = fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead")
    with f:
        yield GuardedReader(f, uri)


def read_bytes(uri: URI) -> bytes:
    fs, path = filesystem(uri)
    try:
        with translated(uri, "reading"):
            return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"{uri} does not exist") from None


def read_many(uris: list[URI]) -> dict[URI, bytes]:
    """Several small objects at once (object stores fetch them concurrently)."""
    if not uris:
        return {}
    fs, _ = filesystem(uris[0])
    paths = {filesystem(u)[1]: u for u in uris}
    with translated(uris[0], "reading"):
        return {paths[p]: data for p, data in fs.cat(list(paths)).items()}


def exists(uri: URI) -> bool:
    fs, path = filesystem(uri)
    with translated(uri, "looking for"):
        return fs.exists(path)


def isfile(uri: URI) -> bool:
    """Is there an object (a file, not a folder or prefix) at ``uri``?"""
    fs, path = filesystem(uri)
    with translated(uri, "looking for"):
        return fs.isfile(path)


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
        if os.path.lexists(path) and not (os.path.isfile(path) or os.path.islink(path)):
            raise StorageError(f"{uri} exists and is not a regular file (a folder, a device such as /dev/full, a "
                               "pipe): melbatch writes whole files by renaming into place and will not replace it; "
                               "give the path of a file")
        with _local_tmp(path) as tmp:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, path)
    else:  # object stores: the object is published when the (multipart) upload completes
        with translated(uri, "writing"):
            f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            if hasattr(f, "discard"):
                f.discard()  # abandon the upload: nothing is published
                f.closed = True  # and don't let a later close() try to finish it
            raise
        else:
            with translated(uri, "writing"):
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
    with translated(uri, "creating"):
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
    with translated(prefix, "listing"):
        if not fs.exists(path):
            return []
        return sorted(unstrip(fs, p) for p in fs.find(path) if p.endswith(suffix))


def list_names(prefix: URI) -> list[str]:
    """The names directly under ``prefix`` (files and folders, one delimited listing), sorted; empty if none."""
    fs, path = filesystem(prefix)
    with translated(prefix, "listing"):
        if not fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def delete(uris: list[URI]) -> None:
    if not uris:
        return
    fs, _ = filesystem(uris[0])
    with translated(uris[0], "deleting"):
        fs.rm([filesystem(u)[1] for u in uris])


def delete_tree(prefix: URI) -> None:
    """Everything under ``prefix``, and the folder itself where folders exist."""
    fs, path = filesystem(prefix)
    with translated(prefix, "deleting"):
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
