"""The loopback Hub (tests/hubserver.py) driven by the real huggingface_hub client."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest_hub import read_tree, write_files
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

FILES = {
    "README.md": b"---\nlicense: mit\ntags: [lora]\n---\n# a card\n",
    "adapter_config.json": b'{"r": 4, "lora_alpha": 8}\n',
    "adapter_model.safetensors": bytes(range(256)) * 33,
    "sub/dir/notes.txt": "h\u00e9llo\n".encode(),
    "empty.txt": b"",
}


def make_folder(root: Path, files: dict[str, bytes] = FILES) -> Path:
    return write_files(root, files)


def no_lfs_or_xet(hub) -> None:
    assert hub.server.unsupported == []
    paths = [path for _, path, _ in hub.server.requests]
    assert not [p for p in paths if "xet" in p or "lfs" in p or ".git/" in p]


def test_whoami(hub):
    me = HfApi(token=hub.alice).whoami()
    assert me["name"] == "alice" and me["auth"]["accessToken"]["role"] == "write"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_not_a_token").whoami()
    assert err.value.response.status_code == 401


def test_create_repo_conflict_and_exist_ok(hub):
    api = HfApi(token=hub.alice)
    url = api.create_repo("alice/demo")
    assert url.repo_id == "alice/demo" and url.startswith(hub.endpoint)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("alice/demo")
    assert err.value.response.status_code == 409
    assert api.create_repo("alice/demo", exist_ok=True).repo_id == "alice/demo"
    # a new repo holds the Hub's initial commit
    assert api.list_repo_files("alice/demo") == [".gitattributes"]
    assert len(api.list_repo_commits("alice/demo")) == 1


@pytest.mark.parametrize("xet", [False, True], ids=["legacy-commit", "xet-pipeline"])
def test_upload_folder_and_download_by_branch_and_sha(hub, tmp_path, monkeypatch, xet):
    # With hf_xet importable and not disabled, upload_folder takes its pipelined path; every
    # file is still "regular", so neither path transfers anything through LFS or Xet.
    import huggingface_hub._upload_pipeline as pipeline

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    pipelined = []
    real = pipeline.pipelined_upload
    monkeypatch.setattr(
        pipeline, "pipelined_upload", lambda *a, **k: pipelined.append(1) or real(*a, **k)
    )
    api = HfApi(token=hub.alice)
    api.create_repo("alice/demo")
    folder = make_folder(tmp_path / "src")
    info = api.upload_folder(repo_id="alice/demo", folder_path=folder, commit_message="add files")

    commits = api.list_repo_commits("alice/demo")
    assert [c.title for c in commits] == ["add files", "initial commit"]  # one commit
    assert commits[0].commit_id == info.oid == api.repo_info("alice/demo").sha
    assert sorted(api.list_repo_files("alice/demo")) == sorted([".gitattributes", *FILES])

    by_branch = Path(snapshot_download("alice/demo", revision="main"))
    assert by_branch.name == info.oid
    by_sha = Path(
        snapshot_download("alice/demo", revision=info.oid, cache_dir=tmp_path / "other-cache")
    )
    expected = {".gitattributes": hub.server.head("alice/demo").files[".gitattributes"], **FILES}
    assert read_tree(by_branch) == read_tree(by_sha) == expected
    assert len(pipelined) == int(xet)
    no_lfs_or_xet(hub)


def test_unchanged_upload_makes_no_commit(hub, tmp_path):
    api = HfApi(token=hub.alice)
    api.create_repo("alice/demo")
    folder = make_folder(tmp_path / "src")
    first = api.upload_folder(repo_id="alice/demo", folder_path=folder)
    again = api.upload_folder(repo_id="alice/demo", folder_path=folder)
    assert again.oid == first.oid
    assert len(api.list_repo_commits("alice/demo")) == 2


def test_branch_revision(hub, tmp_path):
    api = HfApi(token=hub.alice)
    api.create_repo("alice/demo")
    api.create_branch("alice/demo", branch="dev")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch("alice/demo", branch="dev")
    assert err.value.response.status_code == 409
    api.create_branch("alice/demo", branch="dev", exist_ok=True)

    info = api.upload_folder(
        repo_id="alice/demo", folder_path=make_folder(tmp_path / "src"), revision="dev"
    )
    refs = {b.name: b.target_commit for b in api.list_repo_refs("alice/demo").branches}
    assert refs["dev"] == info.oid and refs["main"] != info.oid
    assert api.list_repo_files("alice/demo") == [".gitattributes"]
    path = hf_hub_download("alice/demo", "adapter_config.json", revision="dev")
    assert Path(path).read_bytes() == FILES["adapter_config.json"]
    assert Path(path).parent.name == info.oid


def test_writes_without_token_are_401(hub, tmp_path):
    anonymous = HfApi(token=False)
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.create_repo("alice/demo")
    assert err.value.response.status_code == 401
    HfApi(token=hub.alice).create_repo("alice/demo")
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.upload_folder(repo_id="alice/demo", folder_path=make_folder(tmp_path / "src"))
    assert err.value.response.status_code == 401


def test_invalid_token_is_401_not_a_missing_repo(hub):
    HfApi(token=hub.alice).create_repo("alice/demo")
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_not_a_token").repo_info("alice/demo")
    assert err.value.response.status_code == 401
    assert not isinstance(err.value, RepositoryNotFoundError)


def test_unknown_repo(hub):
    with pytest.raises(RepositoryNotFoundError) as err:
        HfApi(token=hub.alice).repo_info("alice/nope")
    assert err.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError) as err:
        HfApi(token=False).repo_info("alice/nope")
    assert err.value.response.status_code == 401  # as the Hub: anonymous cannot tell
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("alice/nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/nope", "README.md")


def test_unknown_revision_and_file(hub, tmp_path):
    api = HfApi(token=hub.alice)
    api.create_repo("alice/demo")
    api.upload_folder(repo_id="alice/demo", folder_path=make_folder(tmp_path / "src"))
    with pytest.raises(RevisionNotFoundError):
        api.repo_info("alice/demo", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        api.repo_info("alice/demo", revision="0" * 40)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("alice/demo", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/demo", "README.md", revision="nope")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/demo", "missing.txt")
    with pytest.raises(RevisionNotFoundError):  # commits go to branches only
        api.upload_folder(repo_id="alice/demo", folder_path=tmp_path / "src", revision="nope")


def test_private_repo_hidden_from_others(hub, tmp_path):
    alice = HfApi(token=hub.alice)
    alice.create_repo("alice/secret", private=True)
    alice.upload_folder(repo_id="alice/secret", folder_path=make_folder(tmp_path / "src"))
    assert alice.repo_info("alice/secret").private is True
    for other in (HfApi(token=False), HfApi(token=hub.bob)):
        with pytest.raises(RepositoryNotFoundError):
            other.repo_info("alice/secret")
        with pytest.raises(RepositoryNotFoundError):
            other.list_repo_files("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("alice/secret")  # no token in this test's environment
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "README.md", token=hub.bob)
    path = Path(snapshot_download("alice/secret", token=hub.alice))
    assert read_tree(path)["adapter_config.json"] == FILES["adapter_config.json"]


def test_other_namespace_and_read_only_token(hub, tmp_path):
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token=hub.alice).create_repo("bob/demo")
    assert err.value.response.status_code == 403
    HfApi(token=hub.bob).create_repo("bob/demo")
    # exist_ok: the client sees the 403, finds the repo readable and goes on; the write fails
    assert HfApi(token=hub.alice).create_repo("bob/demo", exist_ok=True).repo_id == "bob/demo"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token=hub.alice).upload_folder(
            repo_id="bob/demo", folder_path=make_folder(tmp_path / "src")
        )
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token=hub.alice_read_only).create_repo("alice/demo")
    assert err.value.response.status_code == 403


def test_tree_is_paginated(hub, tmp_path):
    hub.server.tree_page_size = 2
    api = HfApi(token=hub.alice)
    api.create_repo("alice/demo")
    api.upload_folder(repo_id="alice/demo", folder_path=make_folder(tmp_path / "src"))
    assert sorted(api.list_repo_files("alice/demo")) == sorted([".gitattributes", *FILES])
    assert sum(p.endswith("/tree/main") for _, p, _ in hub.server.requests) > 1


def test_stale_parent_commit_is_refused(hub, tmp_path):
    from huggingface_hub import CommitOperationAdd

    api = HfApi(token=hub.alice)
    api.create_repo("alice/demo")
    base = api.repo_info("alice/demo").sha
    api.upload_folder(repo_id="alice/demo", folder_path=make_folder(tmp_path / "src"))
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(
            "alice/demo",
            [CommitOperationAdd(path_in_repo="x.txt", path_or_fileobj=b"x")],
            commit_message="late",
            parent_commit=base,
        )
    assert err.value.response.status_code == 412


def test_range_requests(hub, tmp_path):
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import get_session

    api = HfApi(token=hub.alice)
    api.create_repo("alice/demo")
    api.upload_folder(repo_id="alice/demo", folder_path=make_folder(tmp_path / "src"))
    url = hf_hub_url("alice/demo", "adapter_model.safetensors")
    data = FILES["adapter_model.safetensors"]
    r = get_session().get(url, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    r = get_session().get(url, headers={"Range": "bytes=-5"})
    assert r.content == data[-5:]
