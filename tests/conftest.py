"""Shared test setup: run Triton on the CPU through its interpreter when no GPU is present, a seed per test,
and the `cuda` marker for tests that need a GPU (skipped without one; select them with `-m cuda`)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # must happen before triton is imported by any test module
    os.environ.setdefault("TRITON_INTERPRET", "1")


workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if workers > 1:
    # the cores shared among the workers: oversubscribed, the tiny models' many small ops ran several times slower
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    # A skipif on the test itself is evaluated before its module's own skipif marks, so this reason is the one shown.
    no_gpu = pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (run `python -m pytest -m cuda` on a machine with one)"
    )
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    return 0


# for tests that prefer a name over the marker: `from conftest import requires_cuda`
requires_cuda = pytest.mark.cuda
