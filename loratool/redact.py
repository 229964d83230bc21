"""Secrets never leave the process: every text loratool shows is scrubbed of the Hub token.

The token is the one a caller registered (:func:`register_secret`: a ``token=`` argument), the
environment's (``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN``), or a login huggingface_hub stored
(``HF_TOKEN_PATH``, and every token in ``HF_STORED_TOKENS_PATH``). Besides those exact values,
anything shaped like a Hub token (``hf_`` and 30 or more letters and digits) and any
credential after ``Authorization:`` / ``Bearer`` is replaced, so a server that echoes a
header it was sent, or a token nobody told us about, does not get through either.

:func:`scrub_exception` rewrites an exception and everything chained to it (its args, notes,
string attributes, ``__cause__`` and ``__context__``), so that even a traceback rendered later
(``--debug``) carries no secret; :func:`scrub` does a text. Stdlib only: no huggingface_hub
import (it costs a third of a second) just to find where the token file lives.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MASK = "***"
_MIN_SECRET = 4  # shorter "secrets" would mask ordinary text
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")
# the credential after an Authorization header or a Bearer/Basic scheme, however it is quoted
_AUTH = re.compile(
    r"(?i)(\bauthorization\b[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?|\bbearer\s+)"
    r"[^\s\"',;}\]]+"
)
_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Treat ``value`` (an explicit token) as a secret for the rest of the process."""
    if value and len(value) >= _MIN_SECRET:
        _registered.add(value)


def _hf_home() -> Path:
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface"


def known_secrets() -> set[str]:
    """Every token this process could send: registered, from the environment, or stored."""
    found = set(_registered)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        v = os.environ.get(var)
        if v:
            found.add(v.strip())
    token_path = os.environ.get("HF_TOKEN_PATH") or str(_hf_home() / "token")
    stored_path = os.environ.get("HF_STORED_TOKENS_PATH") or str(_hf_home() / "stored_tokens")
    try:  # where huggingface_hub itself looks, when it is loaded (tests repoint it)
        import sys

        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:
            token_path = getattr(constants, "HF_TOKEN_PATH", token_path)
            stored_path = getattr(constants, "HF_STORED_TOKENS_PATH", stored_path)
    except Exception:  # finding the token must never mask what is being reported
        pass
    try:
        text = Path(token_path).read_text(errors="replace").strip()
        if text:
            found.add(text)
    except OSError:
        pass
    try:  # an INI file: [name] sections with hf_token = <token>
        for line in Path(stored_path).read_text(errors="replace").splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "hf_token" and value.strip():
                found.add(value.strip())
    except OSError:
        pass
    return {s for s in found if len(s) >= _MIN_SECRET}


def scrub(text: str, secrets: set[str] | None = None) -> str:
    """``text`` with every secret, token-shaped string and Authorization credential masked."""
    if not isinstance(text, str) or not text:
        return text
    for secret in sorted(known_secrets() if secrets is None else secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    # The regexes only where their anchor words occur: a 4 MB `list --json` is scanned for
    # "hf_", "authorization" and "bearer" (fast substring searches), not matched char by char.
    if "hf_" in text:
        text = _TOKEN_LIKE.sub("hf_" + MASK, text)
    lowered = text.lower()
    if "authorization" in lowered or "bearer" in lowered:
        text = _AUTH.sub(lambda m: m.group(1) + MASK, text)
    return text


def _scrub_value(value: object, secrets: set[str]) -> object:
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, bytes):
        try:
            return scrub(value.decode("utf-8"), secrets).encode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, tuple):
        return tuple(_scrub_value(v, secrets) for v in value)
    if isinstance(value, list):
        return [_scrub_value(v, secrets) for v in value]
    if isinstance(value, dict):
        return {_scrub_value(k, secrets): _scrub_value(v, secrets) for k, v in value.items()}
    return value


def scrub_exception(exc: BaseException | None) -> BaseException | None:
    """Mask secrets in ``exc`` and every exception chained to it, in place; returns ``exc``."""
    secrets = known_secrets()
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        try:
            e.args = tuple(_scrub_value(a, secrets) for a in e.args)
        except Exception:  # an exception type whose args cannot be set
            pass
        notes = getattr(e, "__notes__", None)
        if isinstance(notes, list):
            e.__notes__ = [scrub(n, secrets) if isinstance(n, str) else n for n in notes]
        for key, value in list(vars(e).items()) if hasattr(e, "__dict__") else ():
            if key.startswith("__"):
                continue
            new = _scrub_value(value, secrets)
            if new is not value:
                try:
                    setattr(e, key, new)
                except Exception:
                    pass
        if isinstance(e, OSError):
            for key in ("strerror", "filename", "filename2"):
                v = getattr(e, key, None)
                if isinstance(v, str):
                    try:
                        setattr(e, key, scrub(v, secrets))
                    except Exception:
                        pass
        todo.extend([e.__cause__, e.__context__])
        todo.extend(getattr(e, "exceptions", ()) or ())  # ExceptionGroup
    return exc
