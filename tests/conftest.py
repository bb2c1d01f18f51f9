"""Eight simulated CPU devices for every test: set before JAX is imported anywhere."""

import os

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


@pytest.fixture
def tiny_overrides() -> list[str]:
    """The tiny preset made smaller still, for model-level tests that compile many variants."""
    return ["model.vocab_size=97", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "data.seq_len=16"]
