"""The caption stage against an S3 endpoint that answers 503 SlowDown: a small HTTP proxy in front of the
session's moto server (a fake only around what cannot fail here: moto never throttles).

- Every 4th request answered 503 SlowDown: retried with backoff (pyarrow's AWS retry strategy), 0 rows lost.
- Every request failing once the first caption file is committed: the job ends with a message that says
  what failed and that a rerun resumes; the rerun (endpoint healthy again) finishes with every id once.

The stage runs in a driver subprocess joined to the session's Ray whose job sends its workers to the
proxy (runtime_env), so that reads and writes in Ray tasks go through it too.
"""

from __future__ import annotations

import http.client
import http.server
import io
import os
import subprocess
import sys
import threading
from urllib.parse import urlparse

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.testing import free_port
from tipsv2.data import schema

BUCKET = "tipsv2-test"
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultyS3Proxy:
    """Forwards HTTP requests to `upstream`; answers 503 SlowDown to every `every`-th request, or to every
    request once `fail_after_commit` is set and a caption file has been PUT."""

    def __init__(self, upstream: str):
        self.upstream = urlparse(upstream).netloc
        self.every, self.fail_after_commit, self.committed = 0, False, False
        self.requests = self.injected = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b""   # the AWS SDK streams uploads chunked: decode, forward with a Content-Length
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline().strip():   # trailers
                    pass
                return body

            def _any(self):
                body = self._body()
                if proxy.should_fail():
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "content-length", "connection")}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                # an object is there after a PutObject or a CompleteMultipartUpload (not after an UploadPart)
                completes = (self.command, "uploadId=" in self.path) in (("PUT", False), ("POST", True))
                if "/captions/" in self.path and completes and response.status == 200:
                    proxy.committed = True
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                # HEAD: the object's length as the server gave it; else the length of what is sent
                length = response.getheader("Content-Length") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def should_fail(self) -> bool:
        with self.lock:
            self.requests += 1
            fail = (self.every and self.requests % self.every == 0) or (self.fail_after_commit and self.committed)
            self.injected += bool(fail)
            return bool(fail)


def _put_images(client, prefix: str, files: int, rows: int) -> list[str]:
    ids = []
    for f in range(files):
        part = [f"{prefix}-{f}-{i}" for i in range(rows)]
        table = pa.table({"id": part, "image": [b"x"] * rows, "format": ["PNG"] * rows, "width": [4] * rows,
                          "height": [4] * rows, "alt_text": [f"thing {i}" for i in part], "source": part,
                          "sha256": part}).cast(schema.IMAGES)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/in/images/part-{f}.parquet", Body=buf.getvalue())
        ids += part
    return ids


def _run(ray_local, endpoint: str, prefix: str, *, tracking: str, fail_fast: bool = False) -> subprocess.CompletedProcess:
    """The stage in a driver whose Ray job (and so every task) talks to `endpoint`. `fail_fast`: 2 attempts
    per S3 request and no Ray Data I/O retries (minutes of backoff otherwise), for the persistent failure."""
    env_vars = {"AWS_ENDPOINT_URL": endpoint, **({"AWS_MAX_ATTEMPTS": "2"} if fail_fast else {})}
    code = ("import ray, ray.data, sys\n"
            f"ray.init(address={ray_local.get_runtime_context().gcs_address!r}, log_to_driver=False, "
            f"runtime_env={{'env_vars': {env_vars!r}}})\n"
            + ("ray.data.DataContext.get_current().retried_io_errors = []\n" if fail_fast else "") +
            "from pipelines import caption\n"
            f"caption.main(['--config', 'template', '--set', 'input=s3://{BUCKET}/{prefix}/in', '--set', "
            f"'engine.batch_size=5', '--output', 's3://{BUCKET}/{prefix}/out'])\n")
    env = {**os.environ, **env_vars, "MLFLOW_TRACKING_URI": tracking}   # an s3:// output needs a shared store
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def _output_ids(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/out/captions/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".parquet")]
    return [i for k in keys for i in pq.read_table(io.BytesIO(
        client.get_object(Bucket=BUCKET, Key=k)["Body"].read()), columns=["id"])["id"].to_pylist()]


@pytest.mark.slow
def test_slow_down_is_retried_and_a_persistent_failure_resumes(ray_local, s3_endpoint, mlflow_server):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    proxy = FaultyS3Proxy(s3_endpoint)

    ids = _put_images(client, "faults-a", files=3, rows=10)
    proxy.every = 4
    done = _run(ray_local, proxy.url, "faults-a", tracking=mlflow_server[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert proxy.injected > 0, "the proxy should have answered some requests with 503"
    assert sorted(_output_ids(client, "faults-a")) == sorted(ids), "0 rows lost, none twice"
    print(f"\nS3 faults: {proxy.injected} of {proxy.requests} requests answered 503 SlowDown; all retried")

    ids = _put_images(client, "faults-b", files=3, rows=10)
    proxy.every, proxy.fail_after_commit, proxy.committed = 0, True, False
    failed = _run(ray_local, proxy.url, "faults-b", tracking=mlflow_server[1], fail_fast=True)
    assert failed.returncode != 0
    message = failed.stderr.strip().splitlines()[-1]
    assert "rerun" in message and ("SLOW_DOWN" in message or "SlowDown" in message or "503" in message), message
    partial = _output_ids(client, "faults-b")
    assert 0 < len(partial) < len(ids) and len(partial) == len(set(partial))
    proxy.fail_after_commit = False
    resumed = _run(ray_local, proxy.url, "faults-b", tracking=mlflow_server[1])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(_output_ids(client, "faults-b")) == sorted(ids)
    print(f"persistent failure: {len(partial)} of {len(ids)} ids committed before it; message: {message[:300]}")
