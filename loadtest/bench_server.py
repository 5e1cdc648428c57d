"""``python -m loadtest.bench_server serve``: the gateway's own ``serve`` with end-of-sequence
tokens ignored, so every request of a benchmark generates exactly its ``max_tokens`` (as the
in-process harness does, and as the S-LoRA workload asks), whatever the random prompt makes the
model say. Everything else — settings from ``GATEWAY_*``, the HTTP API, the engine — is the
unchanged gateway. Benchmarks only: a real deployment must stop at EOS."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("loadtest.bench_server")


def main(argv: list[str] | None = None) -> None:
    import gateway.app
    from gateway.cli import main as cli_main

    # build_gateway hands eos_ids(base) to the engine: an empty set means "never stop at EOS"
    gateway.app.eos_ids = lambda base: set()
    cli_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
