"""One place that turns URIs into pyarrow filesystems: local paths, `s3://bucket/prefix`, `gs://bucket/prefix`.

S3 endpoint, region and credentials come from the standard AWS environment variables
(`AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3`, `AWS_REGION` / `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`). The scheme follows the endpoint (`http://` for a local
S3 server such as moto). With no region and no endpoint set, the bucket's own region is looked up
(pyarrow refuses a bucket outside the region it is given). Google Cloud Storage takes its credentials
from the environment (a service account on GCE/GKE, or GOOGLE_APPLICATION_CREDENTIALS). Credentials
are never logged or put into error messages.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_SCHEME = "s3://"
GCS_SCHEME = "gs://"
REMOTE_SCHEMES = (S3_SCHEME, GCS_SCHEME)


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def is_remote(uri: str) -> bool:
    """An object-store URI (s3:// or gs://), as opposed to a local path."""
    return uri.startswith(REMOTE_SCHEMES)


def s3_region(bucket: str, *, endpoint: str | None) -> str:
    """AWS_REGION / AWS_DEFAULT_REGION; else us-east-1 for a custom endpoint; else the bucket's region."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region or endpoint:
        return region or "us-east-1"
    try:
        return pafs.resolve_s3_region(bucket)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot find the region of S3 bucket {bucket!r} ({err}); set AWS_REGION") from None


S3_MAX_ATTEMPTS = 10   # per request, with the AWS SDK's exponential backoff (its default, 3, gives up on a burst
                       # of 503 SlowDown under load); AWS_MAX_ATTEMPTS overrides it, as for every AWS SDK


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS)
    kwargs: dict[str, Any] = {"region": s3_region(bucket, endpoint=endpoint),
                              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, an `s3://bucket/prefix` or a `gs://bucket/prefix` URI."""
    for scheme in REMOTE_SCHEMES:
        if uri.startswith(scheme):
            path = uri[len(scheme):].rstrip("/")
            if not path or path.startswith("/"):
                raise ValueError(f"URI {uri!r} has no bucket; expected {scheme}bucket/prefix")
            bucket = path.split("/", 1)[0]
            return (_s3_filesystem(bucket) if scheme == S3_SCHEME else pafs.GcsFileSystem()), path
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}; expected a local path, s3://bucket/prefix or "
                         f"gs://bucket/prefix")
    return pafs.LocalFileSystem(), absolute(uri)


def absolute(uri: str) -> str:
    """A local path made absolute (it then means the same in every process); other URIs unchanged."""
    return uri if "://" in uri else os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """Inverse of `filesystem`: the URI of `path` on `fs`."""
    if isinstance(fs, pafs.S3FileSystem):
        return S3_SCHEME + path
    return GCS_SCHEME + path if isinstance(fs, pafs.GcsFileSystem) else path


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: a reader sees the old object or the whole new one, never a part.

    Local files go to a temporary name beside the target and are renamed; an S3 PUT is atomic.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(os.path.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(tmp) as stream:
            stream.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def list_files(uri: str, *, suffixes: tuple[str, ...] = ()) -> list[str]:
    """URIs of the files under `uri` (recursive), sorted; only names ending in `suffixes` if given.

    Hidden and temporary names (starting with `.` or `_`, or containing `.tmp-`) are skipped.
    """
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    out = []
    for info in infos:
        name = info.base_name
        if info.type != pafs.FileType.File or name.startswith((".", "_")) or ".tmp-" in name:
            continue
        if suffixes and not name.lower().endswith(suffixes):
            continue
        out.append(to_uri(fs, info.path))
    return sorted(out)


def delete(uri: str) -> None:
    """Remove a file or a whole directory tree; nothing happens if it does not exist."""
    fs, path = filesystem(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def local_copy(uri: str, scratch: str | None = None) -> str:
    """A local path holding `uri`'s content: a local path as it is; an s3:// object or prefix copied into
    `scratch` (a new temporary directory when None), a prefix keeping its relative layout."""
    if not is_remote(uri):
        if not os.path.exists(uri):
            raise ValueError(f"{uri!r} does not exist")
        return uri
    target = Path(scratch or tempfile.mkdtemp(prefix="tipsv2-fetch-"), uri.rstrip("/").rsplit("/", 1)[-1])
    if not is_dir(uri):
        if not exists(uri):
            raise ValueError(f"{uri!r} does not exist")
        target.write_bytes(read_bytes(uri))
        return str(target)
    prefix = uri.rstrip("/") + "/"
    for file_uri in list_files(uri):
        local = target / file_uri[len(prefix):]
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(read_bytes(file_uri))
    return str(target)
