"""Shared test setup: CPU DeepSpeed, no network logging, deterministic torch threads."""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One synthetic-shard cache for every training test of the session (built by the first run)."""
    return tmp_path_factory.mktemp("demo_cache")
