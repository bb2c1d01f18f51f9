"""Eight simulated CPU devices for every test: set before JAX is imported anywhere."""

import os
import subprocess
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# XLA:CPU aborts the process when one of a collective's device threads joins its rendezvous
# more than 40 s after the first (its default). Two pytest workers, each with eight device
# threads, beside compiles of the 1B step on two cores can starve a thread that long: an
# in-process sharded training test aborted so, twice in ten full runs. The suite allows ten
# minutes instead, where this jaxlib knows the flag (an unknown XLA flag aborts every process,
# so a child is asked first; workers and CLI runs inherit the answer in XLA_FLAGS).
COLLECTIVE_TIMEOUT = "--xla_cpu_collective_call_terminate_timeout_seconds=600"
if "collective_call_terminate_timeout" not in os.environ["XLA_FLAGS"]:
    flags = f"{os.environ['XLA_FLAGS']} {COLLECTIVE_TIMEOUT}"
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                           env={**os.environ, "XLA_FLAGS": flags}, capture_output=True,
                           timeout=300)
    if probe.returncode == 0:
        os.environ["XLA_FLAGS"] = flags

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def pytest_configure(config: pytest.Config) -> None:
    """XLA's persistent compilation cache: the suite's many CLI runs compile the same tiny
    programs again and again, and a cache hit halves such a run. Set before any test imports
    JAX; the CLI processes the tests start inherit it. Under xdist the controller sets it
    first and both workers inherit its folder: one cache, shared (its writes are not atomic,
    but JAX takes an entry it cannot read for a warning and compiles again)."""
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"llama_jax_test_xla_cache_{os.getuid()}"))
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


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of 3 MiB (a full disk after one tiny checkpoint; `resize` makes it another
    size); root only."""
    where = tmp_path / "fs"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def resize(fs: Path, size: str) -> None:
    """Give the `small_fs` tmpfs `size` (e.g. "64k", "64m")."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(fs)], check=True)
