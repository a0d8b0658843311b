"""Where inputs and runs live: a local path or a URI of any fsspec filesystem (`s3://`, `gs://`, `az://`,
`hf://`, `file://`).

Credentials and endpoints come the ecosystem's own way (the `AWS_*` variables including `AWS_ENDPOINT_URL`,
`GOOGLE_APPLICATION_CREDENTIALS`, Azure's `AZURE_STORAGE_*`, `HF_TOKEN`, instance roles) and from the
pipeline's `storage_options` (per protocol: `{s3: {endpoint_url: ..., key: ...}}`), which are passed to the
filesystem as keyword arguments. Secrets never reach a message: `StorageError` and `redact` blank out every
secret-looking storage option and environment value.

Local paths stay plain paths (`file://` URIs become one), so everything that worked on a folder works as it
did. On a local filesystem files are written to a temporary name and renamed (engine/io/atomic.py); on an
object store one PUT is atomic by itself, so objects are written straight to their names.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

from engine.io.atomic import TMP_MARK, atomic_write_bytes

log = logging.getLogger(__name__)

LOCAL_PROTOCOLS = ("file", "local")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# Option names and environment variables whose values are secrets (the access key id too: it names an account)
_SECRET_NAME = re.compile(
    r"(secret|token|password|passwd|credential|key|sas|connection_string|signature|session)", re.IGNORECASE
)
_NOT_SECRET_NAME = re.compile(r"^(AWS_ENDPOINT_URL.*|AWS_DEFAULT_REGION|AWS_REGION|AWS_PROFILE|TOKENIZERS_.*)$")
# Values no secret ever is, whatever the variable's name: blanking them would blank every `false` in a log
_NOT_SECRET_VALUE = re.compile(r"^(true|false|yes|no|on|off|none|null|\d{1,8})$", re.IGNORECASE)
# Which packages serve a protocol, for the error when one is missing
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs", "adl": "adlfs", "hf": "huggingface_hub"}


class StorageError(RuntimeError):
    """An input or output cannot be reached (no credentials, unknown bucket, endpoint down, no permission).
    The message is one line, names the location, and holds no secret."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(" ".join(str(message).split())))


def protocol(uri: str) -> str:
    """The URI's scheme ("s3", "gs", ...), "file" for a local path."""
    match = _SCHEME.match(str(uri))
    return match.group(1).lower() if match else "file"


def is_remote(uri: str) -> bool:
    return protocol(uri) not in LOCAL_PROTOCOLS


def local_path(uri: str) -> str:
    """A local URI as a plain path (`file:///a/b` -> `/a/b`); other paths unchanged."""
    text = os.fspath(uri)
    return text[len("file://"):] if text.lower().startswith("file://") else text


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended, "/"-separated for URIs and os-separated for local paths."""
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts) if parts else uri
    return os.path.join(local_path(uri), *parts)


def parent(uri: str) -> str:
    if is_remote(uri):
        scheme, _, rest = uri.partition("://")
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(local_path(uri)) or "."


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) if is_remote(uri) else os.path.basename(local_path(uri))


# --- secrets ----------------------------------------------------------------------------------------------


def _secret_values(options: Any, name: str = "") -> Iterator[str]:
    if isinstance(options, Mapping):
        for key, value in options.items():
            yield from _secret_values(value, str(key))
    elif isinstance(options, (list, tuple)):
        for value in options:
            yield from _secret_values(value, name)
    elif isinstance(options, str) and _SECRET_NAME.search(name) and len(options) >= 4:
        yield options


_registered_secrets: set[str] = set()


def register_secrets(options: Mapping[str, Any] | None) -> None:
    """Remember the secret values of `options` so that `redact` blanks them wherever they might show."""
    _registered_secrets.update(_secret_values(options or {}))


def redact(text: str) -> str:
    """`text` with every known secret (storage options given to this process, secret-looking environment
    variables) replaced by `***`."""
    secrets = set(_registered_secrets)
    for name, value in os.environ.items():
        if _SECRET_NAME.search(name) and not _NOT_SECRET_NAME.match(name) and len(value) >= 4 \
                and not _NOT_SECRET_VALUE.match(value):
            secrets.add(value)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def redacted_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """`options` with their values replaced (for manifests and printed configs): which options were set is
    useful to know, their values are not recorded anywhere."""
    return {str(k): (redacted_options(v) if isinstance(v, Mapping) else "<set>") for k, v in (options or {}).items()}


# --- filesystems ------------------------------------------------------------------------------------------


def options_for(uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments for `uri`'s filesystem: the pipeline's `storage_options[protocol]`."""
    return dict((storage_options or {}).get(protocol(uri), {}) or {})


def filesystem(uri: str, storage_options: Mapping[str, Any] | None = None):
    """(fsspec filesystem, path inside it) for `uri` (fsspec keeps one filesystem object per protocol and
    options in a process). Local paths get fsspec's local filesystem and an absolute path."""
    from fsspec.core import url_to_fs

    proto = protocol(uri)
    if proto in LOCAL_PROTOCOLS:
        fs, _ = url_to_fs("file:///")
        return fs, os.path.abspath(local_path(uri))
    options = options_for(uri, storage_options)
    register_secrets(options)
    try:
        return url_to_fs(uri, **options)
    except ImportError as exc:
        package = _PACKAGES.get(proto, f"the fsspec implementation of {proto}://")
        raise StorageError(
            f"{proto}:// needs {package}, which is not installed: pip install 'granucap[cloud]' ({exc})"
        ) from None
    except ValueError as exc:  # fsspec: unknown protocol
        raise StorageError(f"{uri}: {exc}") from None


def describe(exc: BaseException, uri: str, doing: str) -> str:
    """One line for an exception met while `doing` (e.g. "read") `uri`, with a hint for the usual causes."""
    name = type(exc).__name__
    text = " ".join(str(exc).split()) or name
    hint = ""
    proto = protocol(uri)
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError") or "credentials" in text:
        where = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a role" if proto in ("s3", "s3a") else \
            "the environment (docs/operations.md, Object storage)"
        hint = f"no credentials found ({text}): set {where}, or storage_options.{proto} in the pipeline"
    elif name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or \
            "could not connect" in text.lower() or "connection refused" in text.lower():
        hint = f"the endpoint cannot be reached ({text}); check AWS_ENDPOINT_URL / storage_options endpoint_url"
    elif "bucket does not exist" in text.lower() or "NoSuchBucket" in text:
        hint = "the bucket does not exist"
    elif isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        hint = f"permission denied ({text})"
    elif isinstance(exc, FileNotFoundError):
        hint = "not found"
    return f"cannot {doing} {uri}: {hint or f'{name}: {text}'}"


class Location:
    """A folder: a local directory or a prefix in an fsspec filesystem. Paths given to its methods are
    relative ("shards/000000.tar") and "/"-separated."""

    def __init__(self, uri: str | Path, storage_options: Mapping[str, Any] | None = None) -> None:
        text = os.fspath(uri)
        self.remote = is_remote(text)
        self.uri = text.rstrip("/") if self.remote else local_path(text)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(self.uri, self.storage_options)
        self.root = self.root.rstrip("/") if self.remote else self.root

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def path(self, rel: str = "") -> str:
        """The filesystem path of `rel` (what `self.fs` methods take)."""
        if not rel:
            return self.root
        return posixpath.join(self.root, rel) if self.remote else os.path.join(self.root, *rel.split("/"))

    def uri_of(self, rel: str = "") -> str:
        """`rel` as a URI (remote) or path (local), for messages and for other tools (webdataset, pyarrow)."""
        return join(self.uri, rel) if rel else self.uri

    def local(self, rel: str = "") -> Path | None:
        """`rel` as a local Path, None on a remote filesystem."""
        return None if self.remote else Path(self.path(rel))

    # reading

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def isdir(self, rel: str = "") -> bool:
        return bool(self.fs.isdir(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def open(self, rel: str, mode: str = "rb", **kwargs: Any):
        return self.fs.open(self.path(rel), mode, **kwargs)

    def list(self, rel: str = "") -> list[str]:
        """Names of the files directly inside folder `rel` (sorted); [] when it does not exist."""
        folder = self.path(rel)
        if self.remote:
            self.fs.invalidate_cache(folder)  # other processes write here: never trust an old listing
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") != "directory")

    # writing

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write one file so that a reader never sees part of it: temp + fsync + rename locally, one PUT on an
        object store."""
        if self.remote:
            self.fs.pipe_file(self.path(rel), data)
        else:
            atomic_write_bytes(self.path(rel), data)

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def clean_temporaries(self, folders: tuple[str, ...] = ("shards", "index", "")) -> int:
        """Delete partial files a killed local write left behind (object stores leave none); returns how
        many."""
        if self.remote:
            return 0
        removed = 0
        for folder in folders:
            root = Path(self.path(folder))
            if root.is_dir():
                for path in root.iterdir():
                    if TMP_MARK in path.name and path.is_file():
                        path.unlink()
                        removed += 1
        return removed

    # checks

    def check_writable(self, create: bool = True) -> None:
        """StorageError unless a file can be written, read back and deleted here (the output's first check:
        credentials, endpoint, bucket and permissions all at once). With `create` False a local folder that
        does not exist yet is not made: the nearest existing folder above it must be writable."""
        probe = f".granucap-probe-{os.getpid()}-{os.urandom(4).hex()}"
        if not create and not self.remote and not os.path.exists(self.root):
            above = self.root
            while not os.path.exists(above):
                above = os.path.dirname(above)
            if not os.path.isdir(above):
                raise StorageError(f"cannot write to {self.uri}: {above} is a file, not a folder")
            if not os.access(above, os.W_OK | os.X_OK):
                raise StorageError(f"cannot write to {self.uri}: {above} is not writable")
            return
        try:
            if not self.remote:
                if os.path.exists(self.root) and not os.path.isdir(self.root):
                    raise StorageError(f"cannot write to {self.uri}: it is a file, not a folder")
                os.makedirs(self.root, exist_ok=True)
            self.write_bytes(probe, b"")
            self.read_bytes(probe)
            self.remove(probe)
        except StorageError:
            raise
        except Exception as exc:  # botocore, gcsfs, adlfs each have their own exception trees
            raise StorageError(describe(exc, self.uri, "write to")) from None


__all__ = [
    "Location",
    "StorageError",
    "basename",
    "describe",
    "filesystem",
    "is_remote",
    "join",
    "local_path",
    "parent",
    "protocol",
    "redact",
    "redacted_options",
    "register_secrets",
]
