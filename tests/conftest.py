"""Test setup: 8 simulated CPU devices and full-precision matmuls, set before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(module: str):
    """Import an optional test dependency; in CI a missing one is a failure, elsewhere a skip."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        if IN_CI:
            raise
        pytest.skip(f"{module} is not installed")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a required test never skips: a skip (e.g. a missing dependency) is reported as a failure."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which is not allowed: {report.longrepr}"


def _case_model_cache(attention_impl: str):
    import lmzoo

    from .parity import case_dir

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = lmzoo.from_pretrained(case_dir(name), attention_impl=attention_impl)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def models():
    """``models(case)``: the parity case loaded through the public API, once per test module."""
    return _case_model_cache("xla")


@pytest.fixture(scope="module")
def pallas_models():
    """Like ``models`` with ``attention_impl="pallas"``."""
    return _case_model_cache("pallas")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the block-sparse kernel's calls (at trace time), so a test knows attention really ran on it."""
    import lmzoo.kernels.block_sparse_attention as bsa

    calls = []
    real = bsa.block_sparse_attention

    def counting(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(bsa, "block_sparse_attention", counting)
    return calls
