"""Check ``gateway.pattern_cost``'s limits against the installed xgrammar: random regular
expressions that pass the check are compiled and followed, and any that compiles slowly or makes a
masking step slow is reported.

Patterns are built at random from atoms (``a``, ``.``, ``[a-z]``, ``\\w``, ``\\d`` ...), sequences,
alternations and quantifiers (``*``, ``+``, ``?``, ``{m,n}`` up to 128 past ``m``); those
``check_pattern_cost`` refuses are skipped. Each pattern that passes runs in a child process
(killed past ``--timeout``): it is compiled as a JSON-schema string pattern over the embedded
SmolLM2 tokenizer, then followed for up to 64 tokens, each drawn at random among those its mask
allows; the time of each step (``fill_next_token_bitmask`` and ``accept_token``, what the engine
thread does for a constrained row) is measured. Run it after upgrading xgrammar: a report of
zero slow patterns means the limits still hold; a slow one shows which limit to tighten.

    python -m loadtest.pattern_sweep --patterns 150 --seed 2
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import random
import sys
import time

log = logging.getLogger(__name__)

ATOMS = ["a", "b", ".", "[a-z]", "\\w", "\\d", "[ab]", " "]
STEPS = 64


def random_pattern(rng: random.Random, depth: int = 0) -> str:
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice(ATOMS)
    if r < 0.5:
        return "".join(random_pattern(rng, depth + 1) for _ in range(rng.randint(2, 4)))
    if r < 0.65:
        return "(" + "|".join(random_pattern(rng, depth + 1) for _ in range(rng.randint(2, 3))) + ")"
    inner = random_pattern(rng, depth + 1)
    operand = inner if inner in ATOMS else f"({inner})"
    q = rng.random()
    if q < 0.3:
        return operand + rng.choice("*+?")
    low = rng.randint(0, 8)
    return operand + "{%d,%d}" % (low, low + rng.choice([0, 1, 4, 16, 64, 128]))


def follow(pattern: str, info_json: str, seed: int, out) -> None:
    """Child process: compile ``pattern`` and follow it; put (compile s, worst step s) in ``out``."""
    import torch
    import xgrammar

    info = xgrammar.TokenizerInfo.deserialize_json(info_json)
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    started = time.perf_counter()
    grammar = compiler.compile_json_schema(json.dumps({"type": "string", "pattern": pattern}),
                                           any_whitespace=False, strict_mode=True)
    compile_s = time.perf_counter() - started
    matcher = xgrammar.GrammarMatcher(grammar)
    bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    rng, worst = random.Random(seed), 0.0
    for _ in range(STEPS):
        started = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        spent = time.perf_counter() - started
        scores = torch.zeros(1, info.vocab_size)
        xgrammar.apply_token_bitmask_inplace(scores, bitmask)
        allowed = (scores[0] == 0).nonzero().flatten().tolist()
        allowed = [t for t in allowed if t not in info.stop_token_ids] or allowed
        if not allowed:
            break
        started = time.perf_counter()
        matcher.accept_token(rng.choice(allowed))
        worst = max(worst, spent + time.perf_counter() - started)
        if matcher.is_terminated():
            break
    out.put((compile_s, worst))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", type=int, default=150, help="patterns that pass the check, to try")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds a pattern may take in all")
    parser.add_argument("--slow-compile", type=float, default=5.0, help="compile seconds reported as slow")
    parser.add_argument("--slow-step", type=float, default=5.0, help="step milliseconds reported as slow")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import xgrammar

    from gateway.base_model import embedded_tokenizer
    from gateway.pattern_cost import PatternTooComplexError, check_pattern_cost

    tokenizer = embedded_tokenizer()
    info_json = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer)).serialize_json()
    rng = random.Random(args.seed)
    tried, slow, refused_by_xgrammar, worst_step, worst_compile = 0, [], 0, 0.0, 0.0
    context = multiprocessing.get_context("spawn")
    while tried < args.patterns:
        pattern = random_pattern(rng)
        try:
            check_pattern_cost(pattern)
        except PatternTooComplexError:
            continue
        tried += 1
        out = context.Queue()
        child = context.Process(target=follow, args=(pattern, info_json, tried, out))
        child.start()
        child.join(args.timeout)
        if child.is_alive():
            child.kill()
            child.join()
            slow.append(pattern)
            log.warning("TIMEOUT after %.0f s: %r", args.timeout, pattern)
            continue
        if out.empty():  # xgrammar refused it (its message is in the child's stderr)
            refused_by_xgrammar += 1
            continue
        compile_s, step_s = out.get()
        worst_step, worst_compile = max(worst_step, step_s), max(worst_compile, compile_s)
        if compile_s > args.slow_compile or step_s * 1e3 > args.slow_step:
            slow.append(pattern)
            log.warning("SLOW: compile %.2f s, worst step %.1f ms: %r", compile_s, step_s * 1e3, pattern)
    log.info("%d patterns passed the check; %d refused by xgrammar; %d slow; worst compile %.2f s, worst step "
             "%.2f ms", tried, refused_by_xgrammar, len(slow), worst_compile, worst_step * 1e3)
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
