"""S3 through moto's standalone server on 127.0.0.1 (HTTP): storage helpers, ingest and caption
reading and writing s3:// URIs. Checked with boto3, independently of the code under test."""

from __future__ import annotations

import io
import json
import pathlib

import boto3
import pyarrow.parquet as pq
import pytest

from pipelines import caption, ingest, storage
from pipelines.testing import sample_images
from tipsv2 import config_tree

BUCKET = "tipsv2-test"


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _read_parquet(client, keys: list[str]):
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(io.BytesIO(client.get_object(Bucket=BUCKET, Key=k)["Body"].read()))
                             for k in keys if k.endswith(".parquet")])


def test_storage_helpers_on_s3(s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    root = f"s3://{BUCKET}/storage-test"
    storage.write_json(storage.join(root, "a", "x.json"), {"k": 1})
    storage.write_bytes(storage.join(root, "b.bin"), b"\x00\x01")
    assert json.loads(client.get_object(Bucket=BUCKET, Key="storage-test/a/x.json")["Body"].read()) == {"k": 1}
    assert storage.read_bytes(storage.join(root, "b.bin")) == b"\x00\x01"
    assert storage.list_files(root) == [f"{root}/a/x.json", f"{root}/b.bin"]
    assert storage.list_files(root, suffixes=(".bin",)) == [f"{root}/b.bin"]
    assert storage.exists(storage.join(root, "a", "x.json")) and not storage.exists(storage.join(root, "nope"))
    storage.delete(storage.join(root, "a"))
    assert [k for k in _keys(client, "storage-test/") if not k.endswith("/")] == ["storage-test/b.bin"]


def test_local_copy_of_an_object_a_prefix_and_a_local_path(s3_endpoint, tmp_path):
    root = f"s3://{BUCKET}/local-copy-test"
    storage.write_bytes(storage.join(root, "dir", "a.bin"), b"a")
    storage.write_bytes(storage.join(root, "dir", "sub", "b.bin"), b"b")
    one = storage.local_copy(storage.join(root, "dir", "a.bin"), str(tmp_path))
    assert one == str(tmp_path / "a.bin") and (tmp_path / "a.bin").read_bytes() == b"a"
    tree = pathlib.Path(storage.local_copy(storage.join(root, "dir")))   # no scratch: a new temporary directory
    assert tree.name == "dir" and (tree / "a.bin").read_bytes() == b"a" and (tree / "sub" / "b.bin").read_bytes() == b"b"
    assert storage.local_copy(str(tmp_path)) == str(tmp_path)            # local paths as they are
    for missing in (storage.join(root, "nope.bin"), str(tmp_path / "nope")):
        with pytest.raises(ValueError, match="does not exist"):
            storage.local_copy(missing, str(tmp_path))


def test_ingest_and_caption_read_and_write_s3(ray_local, s3_endpoint, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server[1])   # an s3:// output needs a shared tracking store
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    images = sample_images(("astronaut", "chelsea", "coffee"))
    for name, data in images.items():
        client.put_object(Bucket=BUCKET, Key=f"raw/{name}.png", Body=data)
        client.put_object(Bucket=BUCKET, Key=f"raw/{name}.txt", Body=f"a photo of {name}".encode())
    client.put_object(Bucket=BUCKET, Key="raw/broken.png", Body=b"")

    summary = ingest.run(ingest.IngestConfig(source=f"s3://{BUCKET}/raw"), f"s3://{BUCKET}/ingested")
    assert summary["written"]["images"] == 3 and summary["errors_by_reason"] == {"empty_file": 1}
    table = _read_parquet(client, _keys(client, "ingested/images/"))
    assert sorted(table["alt_text"].to_pylist()) == [f"a photo of {n}" for n in sorted(images)]
    assert sorted(table["source"].to_pylist()) == [f"s3://{BUCKET}/raw/{n}.png" for n in sorted(images)]
    assert _read_parquet(client, _keys(client, "ingested/errors/"))["reason"].to_pylist() == ["empty_file"]
    assert "ingested/summary.json" in _keys(client, "ingested/")

    cfg = config_tree.override(caption.template(), f"input=s3://{BUCKET}/ingested")
    first = caption.run(cfg, f"s3://{BUCKET}/captioned")
    captions = _read_parquet(client, _keys(client, "captioned/captions/"))
    assert sorted(captions["caption_short"].to_pylist()) == [f"a photo of {n}" for n in sorted(images)]
    assert sorted(captions["id"].to_pylist()) == sorted(table["id"].to_pylist())
    assert first["written"]["rows"] == 3
    assert {"captioned/config.json", "captioned/summary.json"} <= set(_keys(client, "captioned/"))

    from mlflow.tracking import MlflowClient
    tracked = MlflowClient(mlflow_server[1])
    for summary in (summary, first):   # each stage an MLflow run on the server, its summary.json an artifact
        assert [a.path for a in tracked.list_artifacts(summary["mlflow_run_id"])] == ["summary.json"]

    again = caption.run(cfg, f"s3://{BUCKET}/captioned")
    assert again["read"]["requests"] == 0 and again["read"]["already_captioned_ids"] == 3
    assert _read_parquet(client, _keys(client, "captioned/captions/")).num_rows == 3
