"""Fault-suite setup: the hypothesis profiles of the decoder fuzz (tests/faults/test_decoder_fuzz.py).

- ``ci`` (default): 1,000 cases, derandomized so a CI run is reproducible and never flaky;
- ``nightly``: 10,000 random cases (new ones every night).

Pick one with ``GNN3D_FUZZ_PROFILE=nightly``; ``GNN3D_FUZZ_EXAMPLES=N`` overrides the case count of either.
The profiles are registered here but applied only by the fuzz test itself, so no other test's hypothesis
settings change.
"""

from datetime import timedelta

from hypothesis import HealthCheck, settings

# A hang (a decoder stuck on crafted bytes) shows as a deadline failure; a decode of 8x8 images takes
# milliseconds, so 2 s is far from a false alarm even on a busy 2-core CI machine.
settings.register_profile(
    "ci",
    max_examples=1_000,
    deadline=timedelta(seconds=2),
    derandomize=True,
    database=None,  # no .hypothesis/ folder in the source tree; a failure prints its reproduction blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("nightly", settings.get_profile("ci"), max_examples=10_000, derandomize=False)
