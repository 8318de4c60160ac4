"""Shared test settings: deterministic, CPU-only, no network.

One flaky failure costs a whole CI run, so nothing here may depend on chance or on the order
of the tests:

* every test starts from seed 0 of torch's, Python's and NumPy's global generators (library code
  that draws from ``random`` when given no generator, e.g. the block-mask collator, would
  otherwise see a state left by whichever tests ran before);
* hypothesis runs derandomized (its examples are a function of the test, not of the run),
  with no example database (no replay of a failure found in another run, no ``.hypothesis/``
  folder) and no deadline (a busy machine makes any example slow). ``HYPOTHESIS_PROFILE=explore``
  draws fresh random examples for a local bug hunt; the fuzz files' ``HISTOFM_FUZZ_EXAMPLES``
  does the same for theirs;
* one CPU thread (``OMP_NUM_THREADS=1`` unless set), in this process and in the CLI
  subprocesses the tests start: the command every test was measured with, whatever the
  machine's core count (float reductions, hence tolerances, depend on the thread count), and
  the fastest on a shared 2-core CI machine;
* torch's thread count and default dtype are put back after each test and each module, so a
  test (or a module fixture) that changes them does not change the arithmetic of the tests
  after it (before, the first module that set one thread for speed did so for the rest of the
  run: a test's thread count depended on which tests ran before it).
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: it reads it once
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

from collections.abc import Iterator  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", derandomize=False, database=None, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
if os.environ["OMP_NUM_THREADS"].isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # also when torch was imported before this file


def _torch_globals() -> tuple[int, torch.dtype]:
    return torch.get_num_threads(), torch.get_default_dtype()


def _restore(saved: tuple[int, torch.dtype]) -> None:
    threads, dtype = saved
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if torch.get_default_dtype() != dtype:
        torch.set_default_dtype(dtype)


@pytest.fixture(autouse=True, scope="module")
def _torch_globals_per_module() -> Iterator[None]:
    saved = _torch_globals()
    yield
    _restore(saved)


@pytest.fixture(autouse=True)
def _torch_globals_per_test() -> Iterator[None]:
    saved = _torch_globals()  # after the module's fixtures: what they set holds for each of its tests
    yield
    _restore(saved)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
