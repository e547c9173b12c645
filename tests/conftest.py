import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# "ci" (the default) draws the same examples on every run, so a red CI is a regression and not a
# new draw; "dev" and "nightly" explore with fresh random examples (see docs/reliability.md).
settings.register_profile("ci", max_examples=40, deadline=None, print_blob=True, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=15, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("nightly", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def jit_warmup():
    """Compile the numba kernels once so compile time never counts against a test."""
    import streamlev as sl

    K = np.random.default_rng(0).standard_normal((40, 4))
    sk = sl.LevSketch(4, 0.5).update(K[:20])
    for row in K[20:]:
        sk.update(row)
    yield


@pytest.fixture
def rng():
    return np.random.default_rng(int(os.environ.get("STREAMLEV_TEST_SEED", "0")))
