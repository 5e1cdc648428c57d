"""A/B experiments between adapters: deterministic arm assignment and pure statistics.

Kept free of torch/FastAPI/scipy so it can be unit-tested (and reasoned about) in isolation.
"""
