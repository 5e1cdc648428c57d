"""Which modules an adapter config names, by PEFT's own rule, matched in linear time.

PEFT reads ``target_modules``, ``exclude_modules`` and IA3's ``feedforward_modules`` as either a
regular expression that must match a whole module path (``re.fullmatch``) or a list of names (a
module matches an entry it equals or ends in ``.<entry>``; IA3's feed-forward list only checks
``endswith(entry)``). A config comes from an upload, so a pattern is hostile: Python's backtracking
engine can take hours on ``(a+)+b``-like patterns. Patterns run on RE2 instead, which matches in
time linear in the input and refuses what it cannot do in linear time (backreferences,
lookaround) at compile time; we refuse those patterns by name rather than fall back to ``re``.
Module paths are ASCII without newlines, where RE2 and Python's ``re`` agree on everything else.

``check_targets_agree`` then holds a config to its tensors the way ``PeftModel.from_pretrained``
would: PEFT adds a layer to every targeted module and loads the tensors with ``strict=False``, so a
tensor for an untargeted module is silently dropped and a targeted module without tensors keeps
its initial weights. Either way PEFT would serve something other than what the tensors say, so
both are refused, naming the modules.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import re2

from adapters.errors import AdapterValidationError

MAX_PATTERN_CHARS = 1024
MAX_LIST_ENTRIES = 1024
MAX_ENTRY_CHARS = 256
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output layer
# Per compiled pattern (program and DFA cache; RE2 falls back to its NFA, still linear, when the
# DFA would need more). A real 1 KiB pattern needs a few KiB; with the cache below, at most 32 MiB.
_RE2_MEMORY = 1 << 20
_SHOWN = 5  # module names listed in a message


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # RE2 would print every refused pattern to stderr
    options.max_mem = _RE2_MEMORY
    return options


_OPTIONS = _options()


@functools.lru_cache(maxsize=32)  # one adapter's patterns are matched against every module path
def compile_pattern(pattern: str, field: str = "target_modules") -> Any:
    """A compiled RE2 pattern, or an AdapterValidationError naming the field and why."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterValidationError(
            f"adapter_config.json: {field} is a pattern of {len(pattern)} characters; the limit is "
            f"{MAX_PATTERN_CHARS}")
    try:
        pattern.encode("utf-8")  # RE2 takes UTF-8: a lone surrogate (a JSON escape) has none
    except UnicodeEncodeError:
        raise AdapterValidationError(f"adapter_config.json: {field} is not valid Unicode (a lone surrogate)") from None
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise AdapterValidationError(
            f"adapter_config.json: {field} is not a pattern this gateway can match safely ({reason[:120]}); "
            "backreferences and lookaround are not supported (matching must take linear time): "
            "list the module names instead") from None


def check_spec(field: str, value: Any) -> None:
    """Refuse a module spec that is neither null, a safe pattern nor a bounded list of names."""
    if value is None:
        return
    if isinstance(value, str):
        compile_pattern(value, field)
        return
    if (not isinstance(value, list) or len(value) > MAX_LIST_ENTRIES
            or not all(isinstance(v, str) and len(v) <= MAX_ENTRY_CHARS for v in value)):
        raise AdapterValidationError(
            f"adapter_config.json: {field} must be a regex string or a list of at most {MAX_LIST_ENTRIES} "
            f"module names of at most {MAX_ENTRY_CHARS} characters")


def matches(spec: str | list[str] | None, name: str, *, field: str = "target_modules",
            dotted: bool = True) -> bool:
    """PEFT's rule: a string must match ``name`` whole; a list entry must equal ``name`` or be its
    last dotted part(s) (``dotted=False``: any suffix, as PEFT's IA3 feed-forward check does)."""
    if not spec:
        return False
    if isinstance(spec, str):
        return compile_pattern(spec, field).fullmatch(name) is not None
    if dotted:
        return any(name == entry or name.endswith("." + entry) for entry in spec)
    return any(name.endswith(entry) for entry in spec)


def targeted(config: dict[str, Any], name: str) -> bool:
    """Whether PEFT would add this config's layer to module ``name`` (targets minus exclusions)."""
    if matches(config.get("exclude_modules"), name, field="exclude_modules"):
        return False
    target = config.get("target_modules")
    if isinstance(target, str) and target.lower() == ALL_LINEAR:
        return True  # callers pass only linear layers that are not the output layer
    return matches(target, name)


def _shown(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(repr(n) for n in names[:_SHOWN]) + more


def check_targets_agree(config: dict[str, Any], adapted: Iterable[str], linear_modules: Iterable[str]) -> None:
    """Refuse a config whose targets differ from the modules its tensors adapt (see module doc).

    ``adapted``: module paths the tensors hold weights for; ``linear_modules``: every module of the
    base model a layer can be added to."""
    if not config.get("target_modules"):
        raise AdapterValidationError(
            "adapter_config.json names no target_modules; PEFT would pick defaults by model type, which "
            "may differ from the modules the tensors adapt: list them")
    adapted = set(adapted)
    untargeted = {m for m in adapted if not targeted(config, m)}
    if untargeted:
        raise AdapterValidationError(
            f"adapter_model.safetensors holds weights for {_shown(untargeted)}, which adapter_config.json "
            "does not target (target_modules / exclude_modules); PEFT would drop them")
    without = {m for m in linear_modules if m not in adapted and targeted(config, m)}
    if without:
        raise AdapterValidationError(
            f"adapter_config.json targets {_shown(without)}, for which adapter_model.safetensors holds no "
            "weights; PEFT would leave them at their initial values")


def check_feedforward_within_targets(config: dict[str, Any]) -> None:
    """PEFT refuses an IA3 config whose feed-forward list is not a subset of its target list."""
    if config.get("feedforward_modules") is None:
        raise AdapterValidationError(
            "adapter_config.json: an IA3 config must name feedforward_modules (an empty list if none); "
            "PEFT would pick defaults by model type")
    ff, target = config.get("feedforward_modules"), config.get("target_modules")
    if isinstance(ff, list) and isinstance(target, list) and not set(ff) <= set(target):
        raise AdapterValidationError(
            f"adapter_config.json: feedforward_modules {_shown(set(ff) - set(target))} are not among "
            "target_modules (PEFT refuses that)")
