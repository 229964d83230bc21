"""PEFT's ``rank_pattern`` / ``alpha_pattern`` matching, in time linear in the module path.

peft (0.21 and main, ``peft.utils.other.get_pattern_key``, since peft#2419) takes, for each
module path, the first key in the dict's order for which
``re.match(rf"(.*\\.)?({key})$", path)`` succeeds, and looks the value up under that key; when
no key matches it looks the value up under the path itself (``rank_pattern.get(path, r)``).
Python's ``re`` backtracks, so a key such as ``(a+)+b`` takes exponential time on a long
path: a hostile adapter config could hang ``add`` and ``pull`` for ever.

Here the very regex peft builds is parsed by Python's own parser and run on a Thompson NFA
(all states advanced together, one step per character), which decides *whether* it matches —
all that get_pattern_key asks — in O(len(path) × size of the pattern), whatever the pattern.
Greedy or lazy makes no difference to whether a match exists, so the answer is re's answer
(tests/test_hostile_input.py checks that against ``re`` on generated patterns and paths).
What the NFA cannot run the same way — backreferences, lookarounds, possessive repeats,
atomic groups, flags — is refused in one line; so are keys longer than :data:`MAX_KEY` and
patterns that expand past :data:`MAX_STATES` states (``a{1000}{1000}``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ValidationError

try:  # Python ≥ 3.11
    import re._constants as _c
    import re._parser as _parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _parser  # type: ignore[no-redef]

MAX_KEY = 512
MAX_STATES = 20_000

# flags that only change how the pattern is read, not what it matches
_HARMLESS_FLAGS = re.UNICODE | re.VERBOSE

_Instr = tuple  # ("char", pred) | ("split", a, b) | ("jmp", a) | ("assert", at) | ("match",)


class PatternError(ValueError):
    """The key cannot be matched the way peft matches it, within the bounds."""


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES: dict[Any, Callable[[str], bool]] = {
    _c.CATEGORY_DIGIT: str.isdecimal,
    _c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    _c.CATEGORY_SPACE: str.isspace,
    _c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    _c.CATEGORY_WORD: _is_word,
    _c.CATEGORY_NOT_WORD: lambda ch: not _is_word(ch),
}


def _char_class(items: list) -> Callable[[str], bool]:
    negate = False
    tests: list[Callable[[str], bool]] = []
    for op, av in items:
        if op is _c.NEGATE:
            negate = True
        elif op is _c.LITERAL:
            tests.append(chr(av).__eq__)
        elif op is _c.RANGE:
            lo, hi = av
            tests.append(lambda ch, lo=lo, hi=hi: lo <= ord(ch) <= hi)
        elif op is _c.CATEGORY and av in _CATEGORIES:
            tests.append(_CATEGORIES[av])
        else:
            raise PatternError(f"unsupported character class item {op}")

    def pred(ch: str) -> bool:
        return any(t(ch) for t in tests) != negate

    return pred


class _Compiler:
    def __init__(self) -> None:
        self.prog: list[list] = []

    def emit(self, *instr: Any) -> int:
        if len(self.prog) >= MAX_STATES:
            raise PatternError(f"expands to more than {MAX_STATES} states")
        self.prog.append(list(instr))
        return len(self.prog) - 1

    def seq(self, nodes) -> None:
        for op, av in nodes:
            self.node(op, av)

    def node(self, op, av) -> None:
        if op is _c.LITERAL:
            self.emit("char", chr(av).__eq__)
        elif op is _c.NOT_LITERAL:
            self.emit("char", chr(av).__ne__)
        elif op is _c.ANY:
            self.emit("char", lambda ch: ch != "\n")
        elif op is _c.IN:
            self.emit("char", _char_class(av))
        elif op is _c.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if (add_flags | del_flags) & ~_HARMLESS_FLAGS:
                raise PatternError("inline flags such as (?i:…) are not supported")
            self.seq(sub)
        elif op is _c.BRANCH:
            _, alternatives = av
            jumps = []
            for i, alt in enumerate(alternatives):
                if i < len(alternatives) - 1:
                    split = self.emit("split", None, None)
                    self.prog[split][1] = len(self.prog)
                    self.seq(alt)
                    jumps.append(self.emit("jmp", None))
                    self.prog[split][2] = len(self.prog)
                else:
                    self.seq(alt)
            for j in jumps:
                self.prog[j][1] = len(self.prog)
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            lo, hi, sub = av
            for _ in range(lo):
                self.seq(sub)
            if hi is _c.MAXREPEAT:
                loop = self.emit("split", None, None)
                self.prog[loop][1] = len(self.prog)
                self.seq(sub)
                self.emit("jmp", loop)
                self.prog[loop][2] = len(self.prog)
            else:
                splits = []
                for _ in range(hi - lo):
                    split = self.emit("split", None, None)
                    self.prog[split][1] = len(self.prog)
                    splits.append(split)
                    self.seq(sub)
                for split in splits:
                    self.prog[split][2] = len(self.prog)
        elif op is _c.AT:
            if av not in _ASSERTIONS:
                raise PatternError(f"unsupported anchor {av}")
            self.emit("assert", av)
        elif op in (_c.GROUPREF, _c.GROUPREF_EXISTS):
            raise PatternError("backreferences are not supported")
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            raise PatternError("lookahead and lookbehind are not supported")
        else:  # POSSESSIVE_REPEAT, ATOMIC_GROUP, …: they change which inputs match
            raise PatternError(f"{str(op).lower().replace('_', ' ')} is not supported")


def _at_boundary(s: str, pos: int) -> bool:
    if not s:
        return False
    before = pos > 0 and _is_word(s[pos - 1])
    after = pos < len(s) and _is_word(s[pos])
    return before != after


_ASSERTIONS: dict[Any, Callable[[str, int], bool]] = {
    _c.AT_BEGINNING: lambda s, pos: pos == 0,
    _c.AT_BEGINNING_STRING: lambda s, pos: pos == 0,
    # $ without MULTILINE: at the end, or before a newline that ends the string
    _c.AT_END: lambda s, pos: pos == len(s) or (pos == len(s) - 1 and s[-1] == "\n"),
    _c.AT_END_STRING: lambda s, pos: pos == len(s),
    _c.AT_BOUNDARY: _at_boundary,
    _c.AT_NON_BOUNDARY: lambda s, pos: bool(s) and not _at_boundary(s, pos),
}


class Matcher:
    """One compiled key: ``matcher(path)`` is ``bool(re.match(rf"(.*\\.)?({key})$", path))``."""

    def __init__(self, key: str) -> None:
        if not isinstance(key, str):
            raise PatternError(f"a key must be a string, not {type(key).__name__}")
        if len(key) > MAX_KEY:
            raise PatternError(f"longer than {MAX_KEY} characters")
        regex = rf"(.*\.)?({key})$"
        try:
            re.compile(regex)  # re's own verdict on validity, with its message
            parsed = _parser.parse(regex)
        except re.error as exc:
            raise PatternError(f"not a valid regular expression ({exc})") from None
        except RecursionError:
            raise PatternError("nested too deeply") from None
        if parsed.state.flags & ~_HARMLESS_FLAGS:
            raise PatternError("flags such as (?i) are not supported")
        comp = _Compiler()
        comp.seq(parsed)
        comp.emit("match")
        self.key = key
        self.prog = comp.prog

    def _closure(self, pcs, s: str, pos: int) -> set[int]:
        out: set[int] = set()
        stack = list(pcs)
        prog = self.prog
        while stack:
            pc = stack.pop()
            if pc in out:
                continue
            out.add(pc)
            instr = prog[pc]
            kind = instr[0]
            if kind == "split":
                stack.append(instr[1])
                stack.append(instr[2])
            elif kind == "jmp":
                stack.append(instr[1])
            elif kind == "assert" and _ASSERTIONS[instr[1]](s, pos):
                stack.append(pc + 1)
        return out

    def __call__(self, s: str) -> bool:
        prog = self.prog
        final = len(prog) - 1
        states = self._closure([0], s, 0)
        for i, ch in enumerate(s):
            if final in states:
                return True  # re.match: a match need not reach the end of the string
            nxt = [pc + 1 for pc in states if prog[pc][0] == "char" and prog[pc][1](ch)]
            if not nxt:
                return False
            states = self._closure(nxt, s, i + 1)
        return final in states


@functools.lru_cache(maxsize=4096)
def _matcher(key: str) -> Matcher:
    return Matcher(key)


def compile_patterns(patterns: object, field: str, *, file: object = None) -> list[Matcher]:
    """The matchers of a ``rank_pattern``/``alpha_pattern`` dict, in its order; a key that
    cannot be matched within the bounds is one ValidationError naming the field and the key."""
    if patterns is None:
        return []
    if not isinstance(patterns, Mapping):
        raise ValidationError(
            f"{field} must be an object mapping module patterns to values, got "
            f"{type(patterns).__name__}",
            file=file,
        )
    out = []
    for key in patterns:
        try:
            out.append(_matcher(key))
        except PatternError as exc:
            shown = repr(key) if len(repr(key)) <= 80 else repr(key)[:77] + "..."
            raise ValidationError(f"{field} key {shown}: {exc}", file=file) from None
    return out


def pattern_value(
    patterns: Mapping[str, Any],
    path: str,
    default: Any,
    matchers: list[Matcher] | None = None,
    *,
    field: str = "pattern",
) -> Any:
    """peft's lookup: the value of the first key matching ``path``, else the value stored
    under ``path`` itself, else ``default``."""
    if not patterns:
        return default
    if matchers is None:
        matchers = compile_patterns(patterns, field)
    for m in matchers:
        if m(path):
            return patterns[m.key]
    return patterns.get(path, default)
