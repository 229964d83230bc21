"""A hostile Hub (issue 16, items 6, 7 and 8): the loopback Hub of tests/hubserver.py made to
misbehave — echoing the Authorization header, serving bytes that differ from the hash it
advertises, lying in its headers, listing names that climb out of the cache, stalling — and
`pull` must refuse each in one line, keep the token out of every output (``--debug``
included), fetch only what the adapter needs and leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from hubserver import GITATTRIBUTES, Repo, git_blob_oid

from loratool.errors import HubError
from loratool.hub import pull_files

ROOT = Path(__file__).resolve().parent.parent
PLAIN = ROOT / "fixtures" / "adapters" / "llama-plain"
ADAPTER = {
    "adapter_config.json": (PLAIN / "adapter_config.json").read_bytes(),
    "adapter_model.safetensors": (PLAIN / "adapter_model.safetensors").read_bytes(),
}
# one shaped like a real Hub token, one not: both must be masked, whatever their source
HF_SHAPED = "hf_" + "QwErTyUiOpAsDfGhJkLzXcVbNmQwErTyUi"
PLAIN_SECRET = "plain-secret-7d1e0c55"


def host(hub, repo_id: str, files: dict[str, bytes]) -> str:
    """Put a repo straight into the server (so that it may hold names no client could push);
    returns its head commit."""
    owner = repo_id.split("/")[0]
    repo = Repo(repo_id, owner, False, "2024-01-01T00:00:00.000Z")
    commit = repo.add_commit(None, {".gitattributes": GITATTRIBUTES, **files}, "init", "", owner)
    repo.branches["main"] = commit.sha
    hub.server.repos[repo_id] = repo
    return commit.sha


def cache_files(hub) -> list[Path]:
    return sorted(p for p in (hub.hf_home / "hub").rglob("*") if p.is_file() or p.is_symlink())


def gets(hub) -> list[str]:
    return [path for method, path, _ in hub.server.requests if method == "GET"]


def assert_one_line(r) -> str:
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


# -- item 8: what is downloaded is what was promised ------------------------------------------


@pytest.mark.parametrize("lfs", [True, False], ids=["lfs-sha256", "git-blob-id"])
def test_pull_refuses_bytes_that_differ_from_the_advertised_hash(hub, cli_run, lfs):
    hub.server.lfs = lfs
    host(hub, "alice/adapter", ADAPTER)
    good = ADAPTER["adapter_model.safetensors"]
    bad = bytearray(good)
    bad[-1] ^= 0xFF  # same length, one byte off: only a hash can tell
    hub.server.tamper["adapter_model.safetensors"] = bytes(bad)
    r = cli_run("pull", "alice/adapter", "--task", "t")
    err = assert_one_line(r)
    kind = "sha256" if lfs else "git-sha1"
    promised = hashlib.sha256(good).hexdigest() if lfs else git_blob_oid(good)
    assert f"does not match the {kind} the Hub promised ({promised[:12]}" in err
    assert "removed from the cache" in err
    # nothing of the bad file is left in the cache, under its advertised hash or elsewhere
    sha_bad = hashlib.sha256(bytes(bad)).hexdigest()
    for p in cache_files(hub):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            assert data != bytes(bad), p
            assert hashlib.sha256(data).hexdigest() != sha_bad
        assert p.name != promised or not p.exists(), p
    assert json.loads(cli_run("list", "--json").stdout) == []
    # an honest server again: the same pull works and caches the right bytes
    hub.server.tamper.clear()
    assert cli_run("pull", "alice/adapter", "--task", "t").exit_code == 0
    blobs = [p for p in cache_files(hub) if p.parent.name == "blobs"]
    assert hashlib.sha256(good).hexdigest() in {
        hashlib.sha256(p.read_bytes()).hexdigest() for p in blobs
    }


def test_a_lying_length_is_refused_before_the_download(hub, cli_run):
    hub.server.lfs = True
    host(hub, "alice/adapter", ADAPTER)
    hub.server.tamper["adapter_model.safetensors"] = ADAPTER["adapter_model.safetensors"] + b"x"
    r = cli_run("pull", "alice/adapter", "--task", "t")
    assert "should be of size 8192 but has size 8193" in assert_one_line(r)
    blobs = [p.name for p in cache_files(hub) if p.parent.name == "blobs"]
    assert blobs == [git_blob_oid(ADAPTER["adapter_config.json"])]  # checked, and good
    assert json.loads(cli_run("list", "--json").stdout) == []


def test_library_pull_into_staging_verifies_and_copies(hub, tmp_path):
    hub.server.lfs = True
    commit = host(hub, "alice/adapter", ADAPTER)
    staging = tmp_path / "staging"
    staging.mkdir()
    folder, info = pull_files("alice/adapter", into=staging)
    assert folder == staging and info["commit"] == commit
    assert {p.name: p.read_bytes() for p in staging.iterdir()} == ADAPTER


# -- item 7: pull fetches what the adapter needs, nothing more ------------------------------


def test_pull_downloads_only_the_adapter_files(hub, cli_run):
    unused = b"\0" * 300_000
    host(
        hub,
        "alice/adapter",
        {
            **ADAPTER,
            "optimizer.safetensors": unused,
            "checkpoints/step-100/adapter_model.safetensors": unused,
            "deep/er/weights.safetensors": unused,
            "README.md": b"# card\n",
        },
    )
    r = cli_run("pull", "alice/adapter", "--task", "t")
    assert r.exit_code == 0, r.output
    fetched = [p.rsplit("/", 1)[-1] for p in gets(hub) if "/resolve/" in p]
    assert sorted(fetched) == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(p.stat().st_size < len(unused) for p in cache_files(hub) if p.is_file())


def test_a_single_file_adapter_repo_and_an_ambiguous_one(hub, cli_run):
    kohya = (ROOT / "fixtures" / "adapters" / "conv-kohya.safetensors").read_bytes()
    host(hub, "alice/single", {"conv.safetensors": kohya, "sub/other.safetensors": kohya})
    assert cli_run("pull", "alice/single", "--task", "t").exit_code == 0
    host(hub, "alice/two", {"a.safetensors": kohya, "b.safetensors": kohya})
    err = assert_one_line(cli_run("pull", "alice/two", "--task", "t"))
    assert "not exactly one .safetensors" in err and "a.safetensors, b.safetensors" in err
    assert not any("/resolve/" in p for p in gets(hub) if "alice/two" in p)


# -- item 9: names and headers a server must not be trusted with -----------------------------


def test_traversal_names_in_the_listing_are_never_fetched(hub, cli_run, tmp_path):
    host(hub, "alice/adapter", {**ADAPTER, "../../escape.safetensors": b"x" * 64})
    r = cli_run("pull", "alice/adapter", "--task", "t")
    assert r.exit_code == 0, r.output
    assert not any("escape" in p for p in gets(hub))
    assert not list(tmp_path.rglob("escape.safetensors"))
    host(hub, "alice/only-escape", {"../escape.safetensors": b"x" * 64})
    assert_one_line(cli_run("pull", "alice/only-escape", "--task", "t"))
    assert not list(tmp_path.rglob("escape.safetensors"))


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Repo-Commit": "../../../../../../escape"},
        {"X-Repo-Commit": "0" * 40},  # a well-formed sha, but not the commit asked for
        {"ETag": '"../../../../escape"'},
        {"ETag": '"not-a-hash"'},
    ],
    ids=["commit-traversal", "other-commit", "etag-traversal", "etag-not-a-hash"],
)
def test_bad_resolve_headers_are_refused_before_any_write(hub, cli_run, tmp_path, headers):
    host(hub, "alice/adapter", ADAPTER)
    hub.server.resolve_headers.update(headers)
    err = assert_one_line(cli_run("pull", "alice/adapter", "--task", "t"))
    assert "refused" in err and "alice/adapter" in err
    assert not list(tmp_path.rglob("escape*"))
    assert not [p for p in cache_files(hub) if p.parent.name == "blobs"]


def test_a_bad_commit_sha_from_repo_info(hub, cli_run):
    host(hub, "alice/adapter", ADAPTER)

    def lie(handler):
        handler._send_json({"id": "alice/adapter", "sha": "\x1b[2J../../x", "siblings": []})
        return True

    hub.server.hooks.append(("GET", "/api/models/alice/adapter", lie))
    err = assert_one_line(cli_run("pull", "alice/adapter", "--task", "t"))
    assert "not a 40-character sha" in err and "\x1b" not in err


# -- item 6: no secret in any output ----------------------------------------------------------


def _echo_headers(handler) -> bool:
    """A server that reflects the request's headers (Authorization included) in its error."""
    seen = "; ".join(f"{k}: {v}" for k, v in handler.headers.items())
    body = json.dumps({"error": f"upstream failed for request with {seen}"}).encode()
    handler._send(
        500,
        body,
        {"Content-Type": "application/json", "X-Error-Message": f"bad request: {seen}"},
    )
    return True


@pytest.mark.parametrize("token", [HF_SHAPED, PLAIN_SECRET], ids=["hf-shaped", "plain"])
@pytest.mark.parametrize("source", ["env", "token-file"])
@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_an_echoed_token_never_reaches_any_output(hub, cli_run, monkeypatch, token, source, debug):
    hub.server.tokens[token] = ("alice", "write")
    host(hub, "alice/adapter", ADAPTER)
    if source == "env":
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        hub.hf_home.mkdir(parents=True, exist_ok=True)
        (hub.hf_home / "token").write_text(token)
    hub.server.hooks.append(("GET", "/api/models/alice/adapter", _echo_headers))
    args = ["--debug"] if debug else []
    r = cli_run(*args, "pull", "alice/adapter", "--task", "t")
    assert r.exit_code == 1
    assert token not in r.output and token not in r.stderr
    assert token[4:-4] not in r.stderr  # not even a slice of it
    if debug:
        # the chained exceptions are all there, masked: the traceback is still useful
        assert "Traceback" in r.stderr and "HfHubHTTPError" in r.stderr
        assert "bearer ***" in r.stderr.lower()
    else:
        assert_one_line(r)


def test_a_token_echoed_into_a_push_result_is_masked(hub, cli_run, monkeypatch):
    hub.server.tokens[HF_SHAPED] = ("alice", "write")
    monkeypatch.setenv("HF_TOKEN", HF_SHAPED)
    cli_run("add", PLAIN, "--task", "t", "--name", "x")

    def commit_url_with_token(handler) -> bool:
        # the commit is made honestly; the URL reported for it carries the caller's header
        send = handler._send_json

        def lying(obj, status=200, headers=None):
            if isinstance(obj, dict) and "commitUrl" in obj:
                obj = {**obj, "commitUrl": f"{obj['commitUrl']}?{handler.headers['authorization']}"}
            send(obj, status, headers)

        handler._send_json = lying
        return False  # the normal route answers, through the lying _send_json

    hub.server.hooks.append(("POST", "/commit/", commit_url_with_token))
    r = cli_run("push", "x", "--repo", "alice/x", "--json")
    assert r.exit_code == 0, r.output
    assert HF_SHAPED not in r.output
    assert "Bearer ***" in json.loads(r.stdout)["commit_url"]  # it was there, masked


# -- stalls ------------------------------------------------------------------------------------


def test_a_stalled_server_is_one_line(hub, cli_run, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    host(hub, "alice/adapter", ADAPTER)

    def stall(handler) -> bool:
        time.sleep(3)
        return True  # and never answer

    hub.server.hooks.append(("GET", "/api/models/alice/adapter", stall))
    started = time.monotonic()
    err = assert_one_line(cli_run("pull", "alice/adapter", "--task", "t"))
    assert "did not answer in time" in err
    assert time.monotonic() - started < 30
    with pytest.raises(HubError):
        pull_files("alice/adapter")


# -- the scrubbing itself ----------------------------------------------------------------------


def test_scrub_exception_masks_the_whole_chain(monkeypatch, tmp_path):
    from loratool.redact import register_secret, scrub, scrub_exception

    stored = tmp_path / "stored_tokens"
    stored.write_text(f"[work]\nhf_token = {PLAIN_SECRET}\n[home]\nhf_token = other-secret-99\n")
    monkeypatch.setenv("HF_STORED_TOKENS_PATH", str(stored))
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "none"))
    from huggingface_hub import constants  # read once at its import: where it looks now

    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(stored))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "none"))
    monkeypatch.setenv("HF_TOKEN", HF_SHAPED)
    register_secret("explicit-token-123")
    try:
        try:
            try:
                raise OSError(13, f"denied {PLAIN_SECRET}", f"/x/{HF_SHAPED}")
            except OSError as inner:
                err = ValueError("bad", {"Authorization": "Bearer explicit-token-123"})
                err.add_note(f"note with other-secret-99 and hf_{'A' * 34}")
                raise err from inner
        except ValueError as mid:
            raise RuntimeError(f"outer {HF_SHAPED}") from mid
    except RuntimeError as outer:
        exc = outer
    scrub_exception(exc)
    import traceback

    text = "".join(traceback.format_exception(exc))
    for secret in (HF_SHAPED, PLAIN_SECRET, "explicit-token-123", "other-secret-99", "A" * 34):
        assert secret not in text
    assert "Bearer ***" in text and "hf_***" in text
    # ordinary text is left alone: short hf_ names, the word "token"
    assert (
        scrub("tokenizer.json hf_adapter_v1 token store")
        == "tokenizer.json hf_adapter_v1 token store"
    )
