"""A/B experiments between adapters.

``assignment``, ``stats`` and ``results`` are pure code (no torch, FastAPI or scipy) with table
tests; ``store`` persists experiments, request outcomes and feedback; ``service`` runs them in the
gateway (routing, recording, guards); ``metrics`` holds their Prometheus collectors.
"""
