"""Shared fixtures: real services started once per session (moto S3, local Ray) and tiny local models."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server on 127.0.0.1 (bucket `tipsv2-test`); AWS env vars point at it."""
    from pipelines.testing import moto_server

    with moto_server(bucket="tipsv2-test") as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """A local Ray with 4 logical CPUs (the vLLM pipeline waits forever with 2, ENVIRONMENT.md).

    Started after moto so that every Ray worker inherits the S3 endpoint and credentials.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A random-weight 2-layer Llama (head size 64) with a locally trained tokenizer, built once."""
    from pipelines.testing import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama") / "model")


@pytest.fixture(scope="session")
def tiny_paligemma(tmp_path_factory) -> str:
    """A random-weight PaliGemma (SigLIP 56 px + Gemma) with its processor, built once."""
    from pipelines.testing import build_tiny_paligemma

    return build_tiny_paligemma(tmp_path_factory.mktemp("tiny_paligemma") / "model")
