"""pipelines.storage: URI schemes and the S3 region, without a server (issue #13 item 4)."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from pipelines import storage


def test_gcs_uris_map_to_pyarrow_gcs_and_back():
    fs, path = storage.filesystem("gs://bucket/a/b/")
    assert isinstance(fs, pafs.GcsFileSystem) and path == "bucket/a/b"
    assert storage.to_uri(fs, path) == "gs://bucket/a/b"
    assert storage.join("gs://bucket/a", "x", "y.json") == "gs://bucket/a/x/y.json"
    assert storage.is_remote("gs://bucket") and storage.is_remote("s3://bucket") and not storage.is_remote("/tmp/x")


@pytest.mark.parametrize("uri, message", [
    ("gs:///nobucket", "has no bucket; expected gs://bucket/prefix"),
    ("s3://", "has no bucket; expected s3://bucket/prefix"),
    ("hdfs://x/y", "unsupported URI scheme in 'hdfs://x/y'; expected a local path, s3://bucket/prefix or gs://"),
])
def test_bad_uris_say_what_is_expected(uri, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        storage.filesystem(uri)


def test_s3_region_comes_from_the_environment_first(monkeypatch):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    assert storage.s3_region("bucket", endpoint=None) == "eu-west-3"
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert storage.s3_region("bucket", endpoint=None) == "ap-south-1"
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    # A custom endpoint (moto, MinIO) has no AWS region to look up: us-east-1, what such servers accept.
    assert storage.s3_region("bucket", endpoint="http://127.0.0.1:9000") == "us-east-1"


def test_s3_region_lookup_failure_names_the_bucket_and_the_fix(monkeypatch):
    """No region and no endpoint: the bucket's region is looked up; when that fails (no network here,
    which this test arranges with a lookup that raises) the error says to set AWS_REGION."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)

    def unreachable(bucket):
        raise OSError("When resolving region for bucket: unreachable")   # a stand-in for the network call

    monkeypatch.setattr(pafs, "resolve_s3_region", unreachable)
    with pytest.raises(ValueError, match="region of S3 bucket 'my-bucket'.*set AWS_REGION"):
        storage.s3_region("my-bucket", endpoint=None)
    monkeypatch.setattr(pafs, "resolve_s3_region", lambda bucket: "eu-central-1")
    assert storage.s3_region("my-bucket", endpoint=None) == "eu-central-1"
