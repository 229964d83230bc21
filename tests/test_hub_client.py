"""loratool.hub against the loopback Hub (tests/hubserver.py) through the real huggingface_hub."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest_hub import read_tree, write_files
from huggingface_hub import HfApi, constants
from huggingface_hub.utils import close_session

from loratool.errors import HubError, NotFoundError, ValidationError
from loratool.hub import parse_repo_spec, pull_files, push_folder

ADAPTER = {
    "adapter_config.json": b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8}\n',
    "adapter_model.safetensors": bytes(range(251)) * 97,
    "README.md": b"---\nlibrary_name: peft\ntags: [lora]\n---\n# demo adapter\n",
    "training/args.txt": b"lr=1e-4\n",  # pushed, but not one of the files pull fetches
}
# pull fetches what the adapter needs, nothing else (not the card, nothing below the top)
PULLED = {k: v for k, v in ADAPTER.items() if k.startswith("adapter_")}


def make_folder(root: Path, files: dict[str, bytes] = ADAPTER) -> Path:
    return write_files(root, files)


def push(hub, folder: Path, repo: str = "alice/adapter", **kw) -> dict:
    args = {"private": False, "revision": None, "message": "Upload adapter"}
    args["token"] = kw.pop("token") if "token" in kw else hub.alice
    return push_folder(folder, repo, **{**args, **kw})


def assert_one_line_without_token(err: pytest.ExceptionInfo, *tokens: str) -> str:
    text = str(err.value)
    assert "\n" not in text and text.strip() == text
    for token in tokens:
        assert token not in text
        assert token not in repr(err.value.args)
    return text


# -- round trips -------------------------------------------------------------------------------


def test_push_then_pull_round_trip(hub, tmp_path, capfd):
    result = push(hub, make_folder(tmp_path / "src"))
    api = HfApi(token=hub.alice)
    assert result["repo"] == "alice/adapter" and result["revision"] == "main"
    assert result["commit"] == api.repo_info("alice/adapter").sha
    assert result["url"] == f"{hub.endpoint}/alice/adapter"
    assert sorted(result["files"]) == sorted(ADAPTER)
    commits = api.list_repo_commits("alice/adapter")
    assert [c.title for c in commits] == ["Upload adapter", "initial commit"]  # one commit
    assert api.repo_info("alice/adapter").private is False

    snapshot, meta = pull_files("alice/adapter")  # public: no token needed
    assert meta == {
        "repo": "alice/adapter",
        "revision": "main",
        "commit": result["commit"],
        "files": sorted(PULLED),
    }
    assert read_tree(snapshot) == PULLED
    assert snapshot.name == result["commit"]
    assert capfd.readouterr().err == ""  # no progress bar from a library call
    assert str(snapshot).startswith(str(hub.hf_home / "hub"))
    assert hub.server.unsupported == []


def test_push_to_an_existing_repo_adds_one_commit(hub, tmp_path):
    first = push(hub, make_folder(tmp_path / "a"))
    changed = {**ADAPTER, "adapter_model.safetensors": b"new weights"}
    second = push(hub, make_folder(tmp_path / "b", changed), message="v2")
    assert second["commit"] != first["commit"]
    commits = HfApi(token=hub.alice).list_repo_commits("alice/adapter")
    assert [c.commit_id for c in commits[:2]] == [second["commit"], first["commit"]]
    snapshot, meta = pull_files(f"alice/adapter@{first['commit']}")
    assert meta["commit"] == first["commit"]
    assert read_tree(snapshot)["adapter_model.safetensors"] == ADAPTER["adapter_model.safetensors"]
    # the same folder again: nothing changes, the head is returned
    again = push(hub, make_folder(tmp_path / "b", changed), message="v2 again")
    assert again["commit"] == second["commit"]


def test_private_push_and_token_from_environment(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.alice)
    result = push(hub, make_folder(tmp_path / "src"), private=True, token=None)
    assert HfApi().repo_info("alice/adapter").private is True
    snapshot, meta = pull_files("alice/adapter")
    assert meta["commit"] == result["commit"] and read_tree(snapshot) == PULLED
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError) as err:
        pull_files("alice/adapter")
    text = assert_one_line_without_token(err, hub.alice)
    assert "alice/adapter" in text and "repository not found" in text and "HF_TOKEN" in text


def test_revision_branch_push_and_pull(hub, tmp_path):
    main = push(hub, make_folder(tmp_path / "main"))
    dev_files = {**ADAPTER, "adapter_config.json": b'{"r": 8}\n'}
    dev = push(hub, make_folder(tmp_path / "dev", dev_files), revision="dev")
    assert dev["revision"] == "dev" and dev["url"] == f"{hub.endpoint}/alice/adapter/tree/dev"
    refs = {b.name: b.target_commit for b in HfApi().list_repo_refs("alice/adapter").branches}
    assert refs == {"main": main["commit"], "dev": dev["commit"]}
    # the branch starts from main, so its one new commit sits on top of main's head
    dev_log = HfApi().list_repo_commits("alice/adapter", revision="dev")
    assert [c.commit_id for c in dev_log[:2]] == [dev["commit"], main["commit"]]

    snapshot, meta = pull_files("alice/adapter@dev")
    assert meta["revision"] == "dev" and meta["commit"] == dev["commit"]
    assert read_tree(snapshot)["adapter_config.json"] == b'{"r": 8}\n'
    by_sha, meta_sha = pull_files(f"alice/adapter@{dev['commit']}")
    assert read_tree(by_sha) == read_tree(snapshot) and meta_sha["commit"] == dev["commit"]
    main_snapshot, _ = pull_files("alice/adapter")
    assert read_tree(main_snapshot)["adapter_config.json"] == ADAPTER["adapter_config.json"]

    # the branch now exists: a second push goes on top of it
    again = push(hub, make_folder(tmp_path / "dev2", {"extra.safetensors": b"x"}), revision="dev")
    assert HfApi().repo_info("alice/adapter", revision="dev").sha == again["commit"]


def test_pull_patterns(hub, tmp_path):
    push(hub, make_folder(tmp_path / "src"))
    pull_files("alice/adapter")
    # the snapshot directory is shared; the files reported are the ones asked for
    snapshot, meta = pull_files("alice/adapter", allow_patterns=["adapter_config.json"])
    assert meta["files"] == ["adapter_config.json"]
    assert (snapshot / "adapter_config.json").read_bytes() == ADAPTER["adapter_config.json"]
    with pytest.raises(HubError) as err:
        pull_files("alice/adapter", allow_patterns=["*.gguf"])
    assert "no top-level file matches" in assert_one_line_without_token(err)


# -- refusals before any request ---------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("alice/adapter", ("alice/adapter", None)),
        ("alice/adapter@dev", ("alice/adapter", "dev")),
        ("  org-1/my.adapter_2@feature/x  ", ("org-1/my.adapter_2", "feature/x")),
        (
            "a/b@" + "0123456789abcdef" * 2 + "01234567",
            ("a/b", "0123456789abcdef" * 2 + "01234567"),
        ),
    ],
)
def test_parse_repo_spec(spec, expected):
    assert parse_repo_spec(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "adapter",
        "alice/",
        "/adapter",
        "a/b/c",
        "alice/adapter@",
        "alice/-x",
        "alice/x.",
        "alice/a--b",
        "alice/a..b",
        "alice/x.git",
        "ali ce/x",
        "alice/x@a..b",
        "alice/x@-dev",
        "alice/x@dev/",
        "alice/é",
    ],
)
def test_malformed_specs(spec):
    with pytest.raises(ValidationError) as err:
        parse_repo_spec(spec)
    assert "\n" not in str(err.value)


def test_push_refuses_bad_input(hub, tmp_path):
    with pytest.raises(NotFoundError):
        push(hub, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValidationError):
        push(hub, tmp_path / "empty")
    folder = make_folder(tmp_path / "src")
    with pytest.raises(ValidationError):
        push(hub, folder, repo="not-a-repo-id")
    with pytest.raises(ValidationError):
        push(hub, folder, revision="a" * 40)
    with pytest.raises(ValidationError):
        push(hub, folder, message="  ")
    assert hub.server.requests == []


# -- Hub errors --------------------------------------------------------------------------------


def test_push_without_token_is_401(hub, tmp_path):
    with pytest.raises(HubError) as err:
        push(hub, make_folder(tmp_path / "src"), token=None)
    text = assert_one_line_without_token(err)
    assert text.startswith("alice/adapter: 401 unauthorized") and "HF_TOKEN" in text
    assert "hf auth login" in text


def test_push_with_a_rejected_token(hub, tmp_path):
    bad = "hf_this_token_is_not_known_to_the_hub"
    with pytest.raises(HubError) as err:
        push(hub, make_folder(tmp_path / "src"), token=bad)
    text = assert_one_line_without_token(err, bad)
    assert "alice/adapter" in text and "401" in text and "rejected the token" in text


def test_push_with_a_rejected_token_from_environment(hub, tmp_path, monkeypatch):
    bad = "hf_env_token_not_known_to_the_hub"
    monkeypatch.setenv("HF_TOKEN", bad)
    with pytest.raises(HubError) as err:
        push(hub, make_folder(tmp_path / "src"), token=None)
    assert "401" in assert_one_line_without_token(err, bad)


def test_push_to_another_users_namespace_is_403(hub, tmp_path):
    with pytest.raises(HubError) as err:
        push(hub, make_folder(tmp_path / "src"), repo="bob/adapter")
    text = assert_one_line_without_token(err, hub.alice)
    assert text.startswith("bob/adapter: 403 forbidden") and "'bob'" in text
    # bob's repo exists and is public: the commit itself is refused
    push(hub, make_folder(tmp_path / "src"), repo="bob/adapter", token=hub.bob)
    with pytest.raises(HubError) as err:
        push(hub, make_folder(tmp_path / "src"), repo="bob/adapter", revision="mine")
    assert "403" in assert_one_line_without_token(err, hub.alice, hub.bob)


def test_pull_unknown_repo_revision_and_private(hub, tmp_path):
    with pytest.raises(HubError) as err:
        pull_files("alice/nope", token=hub.alice)
    text = assert_one_line_without_token(err, hub.alice)
    assert text.startswith("alice/nope: repository not found")

    push(hub, make_folder(tmp_path / "src"))
    for rev in ("nope", "f" * 40):
        with pytest.raises(HubError) as err:
            pull_files(f"alice/adapter@{rev}")
        text = assert_one_line_without_token(err)
        assert text.startswith(f"alice/adapter@{rev}: revision not found")

    push(hub, make_folder(tmp_path / "src"), repo="alice/secret", private=True)
    with pytest.raises(HubError) as err:
        pull_files("alice/secret", token=hub.bob)
    assert "repository not found" in assert_one_line_without_token(err, hub.bob)


def test_file_vanishing_during_pull(hub, tmp_path):
    push(hub, make_folder(tmp_path / "src"))
    hub.server.inject("HEAD", "/resolve/", 404, "Entry not found", code="EntryNotFound")
    with pytest.raises(HubError) as err:
        pull_files("alice/adapter")
    assert "file not found in the repository" in assert_one_line_without_token(err)


def test_conflict_and_server_errors(hub, tmp_path):
    folder = make_folder(tmp_path / "src")
    hub.server.inject("POST", "/commit/", 409, "another commit is in progress")
    with pytest.raises(HubError) as err:
        push(hub, folder)
    text = assert_one_line_without_token(err, hub.alice)
    assert text.startswith("alice/adapter: 409 conflict") and "another commit" in text

    hub.server.inject("GET", "/api/models/alice/adapter", 500, "boom")
    with pytest.raises(HubError) as err:
        pull_files("alice/adapter")
    assert "failed with 500" in assert_one_line_without_token(err)


def test_server_message_cannot_leak_the_token(hub, tmp_path):
    # even a server that echoes the token back does not get it into the message
    hub.server.inject("POST", "/commit/", 409, f"conflict for {hub.alice}")
    with pytest.raises(HubError) as err:
        push(hub, make_folder(tmp_path / "src"))
    assert_one_line_without_token(err, hub.alice)


def test_offline_mode(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError) as err:
        pull_files("alice/adapter")
    assert "HF_HUB_OFFLINE" in assert_one_line_without_token(err)


# -- network failures --------------------------------------------------------------------------


@pytest.fixture
def unreachable(tmp_path, monkeypatch):
    """huggingface_hub aimed at a loopback port where nothing listens."""
    from conftest_hub import point_client_at

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    point_client_at(endpoint, tmp_path / "hf", monkeypatch)
    close_session()
    yield endpoint
    close_session()


def test_connection_refused(unreachable, tmp_path):
    with pytest.raises(HubError) as err:
        pull_files("alice/adapter", token="hf_alice_token")
    text = assert_one_line_without_token(err, "hf_alice_token")
    assert text.startswith("alice/adapter: cannot reach the Hub at " + unreachable)
    with pytest.raises(HubError) as err:
        push_folder(
            make_folder(tmp_path / "src"),
            "alice/adapter",
            private=False,
            revision="dev",
            message="m",
            token="hf_alice_token",
        )
    text = assert_one_line_without_token(err, "hf_alice_token")
    assert text.startswith("alice/adapter@dev: cannot reach the Hub")


@pytest.fixture
def silent(tmp_path, monkeypatch):
    """A loopback port that accepts connections and never answers; short client deadline."""
    from conftest_hub import point_client_at

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
    point_client_at(endpoint, tmp_path / "hf", monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 0.5)
    close_session()
    yield endpoint
    close_session()
    listener.close()


def test_timeout(silent, tmp_path):
    with pytest.raises(HubError) as err:
        pull_files("alice/adapter")
    assert "did not answer in time" in assert_one_line_without_token(err)
    with pytest.raises(HubError) as err:
        push(None, make_folder(tmp_path / "src"), token="hf_alice_token")
    assert "did not answer in time" in assert_one_line_without_token(err, "hf_alice_token")


def test_stored_login_is_used_and_never_shown(hub, tmp_path):
    (hub.hf_home / "token").parent.mkdir(parents=True, exist_ok=True)
    (hub.hf_home / "token").write_text(hub.alice)  # what `hf auth login` leaves behind
    result = push(hub, make_folder(tmp_path / "src"), token=None)
    assert result["commit"] == HfApi(token=hub.alice).repo_info("alice/adapter").sha
    hub.server.inject("POST", "/commit/", 409, f"conflict for {hub.alice}")
    with pytest.raises(HubError) as err:
        push(hub, make_folder(tmp_path / "other", {"x.txt": b"x"}), token=None)
    assert_one_line_without_token(err, hub.alice)
