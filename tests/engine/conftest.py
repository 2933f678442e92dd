import pytest


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One synthetic-shard cache for every training test of the session (built by the first run)."""
    return tmp_path_factory.mktemp("demo_cache")
