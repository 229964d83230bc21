"""The ``hub`` fixture: a loopback Hub (tests/hubserver.py) with huggingface_hub pointed at it.

A plain module; tests/conftest.py imports the fixture from here.

huggingface_hub reads most of its settings once, when it is imported (``constants.ENDPOINT``,
the URL template of ``hf_hub_url``, the cache and token paths, offline mode, Xet): setting the
environment variables is not enough once it is loaded, so both are patched, for one test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hubserver import DEFAULT_TOKENS, HubServer, start_server, stop_server

ALICE = "hf_alice_token"
BOB = "hf_bob_token"
ALICE_READ_ONLY = "hf_alice_read_token"


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` (relative path → bytes) under ``root``."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, relative path → bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@dataclass
class Hub:
    server: HubServer
    endpoint: str
    tokens: dict
    hf_home: Path

    alice = ALICE
    bob = BOB
    alice_read_only = ALICE_READ_ONLY


def point_client_at(endpoint: str, hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Aim huggingface_hub (already imported or not) at ``endpoint``, with its cache, token file
    and Xet cache under ``hf_home``, online, without telemetry, Xet or a token from the
    environment or a stored login."""
    from huggingface_hub import constants

    cache = hf_home / "hub"
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(cache),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_OIDC_RESOURCE",
        "HUGGINGFACE_CO_STAGING",
        "HUGGINGFACE_HUB_CACHE",
    ):
        monkeypatch.delenv(key, raising=False)

    patched = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value, raising=False)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh loopback Hub with DEFAULT_TOKENS (alice, bob, alice read-only) and a client cache
    of this test's own. Yields a ``Hub``; the tokens are ``hub.alice`` etc."""
    from huggingface_hub.utils import close_session

    server, endpoint = start_server(DEFAULT_TOKENS)
    point_client_at(endpoint, tmp_path / "hf", monkeypatch)
    close_session()  # no pooled connection from an earlier test
    try:
        yield Hub(server, endpoint, dict(DEFAULT_TOKENS), tmp_path / "hf")
    finally:
        close_session()
        stop_server(server)
