"""Eight simulated CPU devices for every test: set before JAX is imported anywhere."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def pytest_configure(config: pytest.Config) -> None:
    """XLA's persistent compilation cache, one per pytest worker (its writes are not atomic,
    so two writers could tear an entry): the suite's many CLI runs compile the same tiny
    programs again and again, and a cache hit halves such a run. Set before any test imports
    JAX; the CLI processes the tests start inherit it."""
    worker = getattr(config, "workerinput", {}).get("workerid", "main")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"llama_jax_test_xla_cache_{os.getuid()}_{worker}"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


@pytest.fixture
def tiny_overrides() -> list[str]:
    """The tiny preset made smaller still, for model-level tests that compile many variants."""
    return ["model.vocab_size=97", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "data.seq_len=16"]


@pytest.fixture
def unsharded():
    """For tests that call the model directly on one device's arrays: outside
    `activation_sharding` a call on this 8-device process is refused."""
    from llama_jax import sharding

    with sharding.unsharded():
        yield
