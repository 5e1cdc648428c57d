"""Hypothesis settings shared by the parser fuzz tests.

The suite runs a modest number of examples per property so unit tests stay fast; a deeper run sets
``GATEWAY_FUZZ_EXAMPLES`` (e.g. ``GATEWAY_FUZZ_EXAMPLES=5000 python -m pytest tests/unit/test_fuzz_parsers.py``).
No example database is written; a failure prints the example to replay (hypothesis still keeps a
self-ignored cache in .hypothesis/).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "200"))

fuzz = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,  # no timed assertions: a slow example is not a failure
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
