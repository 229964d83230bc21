"""The Hub as a source: a Hub id works wherever a BASE is taken (merge, unmerge --check,
extract, savings --base), headers first, downloading only what the command reads through the
Hugging Face cache; a local path wins; pull checks for an adapter before downloading. Against
the loopback Hub (tests/hubserver.py), through the real huggingface_hub client."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hubserver import GITATTRIBUTES, Repo
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
PLAIN = FIX / "adapters" / "llama-plain"
BIG = 300_000  # bytes of each file that must never be downloaded


def host(hub, repo_id: str, files: dict[str, bytes]) -> str:
    """Put a repo straight into the loopback Hub; returns its head commit."""
    owner = repo_id.split("/")[0]
    repo = Repo(repo_id, owner, False, "2024-01-01T00:00:00.000Z")
    commit = repo.add_commit(None, {".gitattributes": GITATTRIBUTES, **files}, "init", "", owner)
    repo.branches["main"] = commit.sha
    hub.server.repos[repo_id] = repo
    return commit.sha


def model_repo(folder: Path) -> dict[str, bytes]:
    """A model repo as the Hub holds them: the safetensors layout, small model files, and
    the same weights in other formats and subfolders, which no command should download."""
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files.update(
        {
            "generation_config.json": b'{"do_sample": false}\n',
            "tokenizer_config.json": b'{"model_max_length": 128}\n',
            "README.md": b"---\nlicense: apache-2.0\n---\n# tiny llama\n",
            "pytorch_model.bin": b"PK\x03\x04" + b"\0" * BIG,
            "flax_model.msgpack": b"\x82" + b"\0" * BIG,
            "model.gguf": b"GGUF" + b"\0" * BIG,
            "onnx/model.onnx": b"\0" * BIG,
            "original/consolidated.safetensors": b"\0" * BIG,
        }
    )
    return files


def downloads(hub, repo_id: str) -> list[str]:
    """Files fetched whole (200) from the repo; range requests (206) read headers only."""
    return sorted(
        path.split("/resolve/", 1)[1].split("/", 1)[1]
        for method, path, status in hub.server.requests
        if method == "GET" and status == 200 and f"/{repo_id}/resolve/" in path
    )


def ranged(hub, repo_id: str) -> list[str]:
    return sorted(
        {
            path.split("/resolve/", 1)[1].split("/", 1)[1]
            for method, path, status in hub.server.requests
            if method == "GET" and status == 206 and f"/{repo_id}/resolve/" in path
        }
    )


def tensors(path: Path) -> dict:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.fixture
def alice(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.alice)
    return hub


@pytest.mark.parametrize("layout", ["llama", "llama-sharded"])
def test_merge_a_hub_base_downloads_only_what_the_merge_reads(alice, cli_run, tmp_path, layout):
    import torch

    files = model_repo(FIX / layout)
    commit = host(alice, "alice/tiny-llama", files)
    out = tmp_path / "merged"
    r = cli_run("merge", "alice/tiny-llama", PLAIN, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    weights = sorted(n for n in files if n.endswith(".safetensors") and "/" not in n)
    small = ["README.md", "config.json", "generation_config.json", "tokenizer_config.json"]
    index = ["model.safetensors.index.json"] if layout == "llama-sharded" else []
    assert downloads(alice, "alice/tiny-llama") == sorted(small + weights + index)
    assert ranged(alice, "alice/tiny-llama") == weights  # the headers were read first
    assert doc["base_source"]["hub"] == "alice/tiny-llama"
    assert doc["base_source"]["commit"] == commit
    # the output: the merge of the same base given as a folder, and only the model's files
    local = tmp_path / "local"
    assert cli_run("merge", FIX / layout, PLAIN, "-o", local).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(small + weights + index)
    ours, ref = tensors(out), tensors(local)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    # the provenance names the Hub id, not the cache's commit folder
    with safe_open(out / weights[0], "pt") as fh:
        assert fh.metadata()["loratool.base_model"] == "alice/tiny-llama"
    # a second merge finds everything in the cache: headers again, no download
    before = len(downloads(alice, "alice/tiny-llama"))
    assert cli_run("merge", "alice/tiny-llama", PLAIN, "-o", tmp_path / "again").exit_code == 0
    assert len(downloads(alice, "alice/tiny-llama")) == before


def test_a_merge_that_cannot_fit_is_refused_from_the_headers(alice, cli_run, tmp_path):
    host(alice, "alice/tiny-llama", model_repo(FIX / "llama"))
    r = cli_run("merge", "alice/tiny-llama", FIX / "adapters" / "gpt2-lora", "-o", tmp_path / "o")
    assert r.exit_code == 1 and r.stderr.startswith("error: "), r.output
    assert "model.safetensors" not in downloads(alice, "alice/tiny-llama")
    assert not (tmp_path / "o").exists()


def test_a_local_path_wins_over_a_hub_id(alice, cli_run, tmp_path, monkeypatch):
    host(alice, "alice/tiny-llama", model_repo(FIX / "llama"))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(FIX / "llama", tmp_path / "alice" / "tiny-llama")
    r = cli_run("merge", "alice/tiny-llama", PLAIN, "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    assert "base_source" not in json.loads(r.stdout)
    assert alice.server.requests == []  # the Hub was never asked


def test_savings_base_reads_headers_only(alice, cli_run):
    host(alice, "alice/tiny-llama", model_repo(FIX / "llama-sharded"))
    r = cli_run("savings", "--base", "alice/tiny-llama", "--json")
    assert r.exit_code == 0, r.output
    hub_doc = json.loads(r.stdout)["base"] if "base" in json.loads(r.stdout) else None
    local = json.loads(cli_run("savings", "--base", FIX / "llama-sharded", "--json").stdout)
    r2 = cli_run(
        "savings", "--base", "alice/tiny-llama", "--rank", "8", "--targets", "q_proj", "--json"
    )
    assert r2.exit_code == 0, r2.output
    local2 = cli_run(
        "savings", "--base", FIX / "llama-sharded", "--rank", "8", "--targets", "q_proj", "--json"
    )
    hyp, hyp_local = json.loads(r2.stdout), json.loads(local2.stdout)
    assert {k: hyp[k] for k in ("params", "dense_params", "base_params", "base_bytes")} == {
        k: hyp_local[k] for k in ("params", "dense_params", "base_params", "base_bytes")
    }
    if hub_doc is not None:  # an empty catalog reports no base; the hypothetical one does
        assert hub_doc["params"] == local["base"]["params"]
    # nothing but config.json and the index came down; the shards were read by range
    assert downloads(alice, "alice/tiny-llama") == ["config.json", "model.safetensors.index.json"]
    assert len(ranged(alice, "alice/tiny-llama")) == 3


def test_unmerge_check_and_extract_take_hub_ids(alice, cli_run, tmp_path):
    host(alice, "alice/tiny-llama", model_repo(FIX / "llama"))
    merged = tmp_path / "merged"
    assert cli_run("merge", FIX / "llama", PLAIN, "-o", merged).exit_code == 0
    r = cli_run(
        "unmerge", merged, PLAIN, "-o", tmp_path / "u", "--check", "alice/tiny-llama", "--json"
    )
    assert r.exit_code == 0, r.output
    local = cli_run(
        "unmerge", merged, PLAIN, "-o", tmp_path / "u2", "--check", FIX / "llama", "--json"
    )
    a, b = json.loads(r.stdout), json.loads(local.stdout)
    assert a["max_abs_error"] == b["max_abs_error"] and a["tensors_exact"] == b["tensors_exact"]
    # --check reads the weights and config, not the tokenizer or the card
    assert downloads(alice, "alice/tiny-llama") == ["config.json", "model.safetensors"]
    out = tmp_path / "extracted"
    r = cli_run("extract", "alice/tiny-llama", merged, "--rank", "4", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "alice/tiny-llama"
    assert cfg["task_type"] == "CAUSAL_LM"


def test_not_a_safetensors_repo_is_one_line(alice, cli_run, tmp_path):
    host(
        alice,
        "alice/pickles",
        {"config.json": b"{}", "pytorch_model.bin": b"PK\x03\x04" + b"\0" * BIG},
    )
    r = cli_run("merge", "alice/pickles", PLAIN, "-o", tmp_path / "o")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.output
    assert "pytorch_model.bin" in r.stderr and "safetensors" in r.stderr
    assert downloads(alice, "alice/pickles") == ["config.json"]


def test_pull_checks_for_an_adapter_before_downloading(alice, cli_run):
    host(
        alice,
        "alice/tiny-llama",
        {"model.safetensors": (FIX / "llama" / "model.safetensors").read_bytes()},
    )
    r = cli_run("pull", "alice/tiny-llama", "--task", "t")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.output
    assert "holds no adapter tensors" in r.stderr and "nothing was downloaded" in r.stderr
    assert downloads(alice, "alice/tiny-llama") == []
    assert ranged(alice, "alice/tiny-llama") == ["model.safetensors"]
    # a kohya file is recognised from its header, then downloaded
    kohya = (FIX / "adapters" / "conv-kohya.safetensors").read_bytes()
    host(alice, "alice/style", {"style.safetensors": kohya})
    assert cli_run("pull", "alice/style", "--task", "t").exit_code == 0
    assert downloads(alice, "alice/style") == ["style.safetensors"]


@pytest.mark.parametrize(
    "lfs, target",
    [(True, "model.safetensors"), (False, "model.safetensors"), (False, "config.json")],
    ids=["lfs-sha256", "git-blob-id", "config"],
)
def test_a_base_file_that_differs_from_its_advertised_hash_is_refused(
    alice, cli_run, tmp_path, monkeypatch, lfs, target
):
    """What is downloaded is what was promised: the bytes served differ from the hash the
    listing advertises (same length, one byte off, so only a hash can tell)."""
    import hashlib

    from hubserver import git_blob_oid

    import loratool.hub

    alice.server.lfs = lfs
    files = model_repo(FIX / "llama")
    host(alice, "alice/tiny-llama", files)
    good = files[target]
    bad = bytearray(good)
    bad[-2] ^= 0x01  # config.json's last byte is a newline; this keeps it JSON-ish
    alice.server.tamper[target] = bytes(bad)
    out = tmp_path / "merged"
    r = cli_run("merge", "alice/tiny-llama", PLAIN, "-o", out)
    assert r.exit_code == 1 and r.stderr.startswith("error: alice/tiny-llama: "), r.output
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    kind = "sha256" if lfs else "git-sha1"
    promised = hashlib.sha256(good).hexdigest() if lfs else git_blob_oid(good)
    assert f"downloaded {target} " in r.stderr
    assert f"does not match the {kind} the Hub promised ({promised[:12]}" in r.stderr
    assert "removed from the cache" in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [alice.hf_home]
    # nothing of the bad bytes is left in the cache, under the promised name or any other
    cache = [p for p in (alice.hf_home / "hub").rglob("*") if p.is_file() or p.is_symlink()]
    for p in cache:
        assert p.name != promised or not p.exists(), p
        if p.is_file() and not p.is_symlink():
            assert p.read_bytes() != bytes(bad), p
    # the same refusal for a command that reads headers only, when what it needs is tampered
    if target == "config.json":
        r = cli_run("savings", "--base", "alice/tiny-llama", "--rank", "8", "--json")
        assert r.exit_code == 1 and "removed from the cache" in r.stderr, r.output
    # an honest server: the merge works; a second one finds the verified blobs in the cache
    # and neither downloads nor hashes them again
    alice.server.tamper.clear()
    assert cli_run("merge", "alice/tiny-llama", PLAIN, "-o", out).exit_code == 0
    hashed: list[str] = []
    verify = loratool.hub._verify_download
    monkeypatch.setattr(
        loratool.hub,
        "_verify_download",
        lambda entry, *a: (hashed.append(entry.path), verify(entry, *a))[1],
    )
    before = len(downloads(alice, "alice/tiny-llama"))
    assert cli_run("merge", "alice/tiny-llama", PLAIN, "-o", tmp_path / "again").exit_code == 0
    assert len(downloads(alice, "alice/tiny-llama")) == before and hashed == []
    # a cached file that is not filed under its promised hash is hashed (and refused if bad)
    snap = next((alice.hf_home / "hub").glob("models--alice--tiny-llama/snapshots/*"))
    link = snap / target
    blob = link.resolve()
    link.unlink()
    link.write_bytes(bytes(bad))  # a plain file, as HF_HUB_DISABLE_SYMLINKS leaves them
    r = cli_run("merge", "alice/tiny-llama", PLAIN, "-o", tmp_path / "third")
    assert r.exit_code == 1 and "removed from the cache" in r.stderr, r.output
    assert hashed == [target] and not link.exists() and blob.exists()
    assert not (tmp_path / "third").exists()


@pytest.mark.parametrize(
    "headers",
    [{"X-Repo-Commit": "0" * 40}, {"ETag": '"../../../../escape"'}, {"ETag": '"not-a-hash"'}],
    ids=["other-commit", "etag-traversal", "etag-not-a-hash"],
)
def test_bad_resolve_headers_for_a_base_are_refused_before_any_write(
    alice, cli_run, tmp_path, headers
):
    host(alice, "alice/tiny-llama", model_repo(FIX / "llama"))
    alice.server.resolve_headers.update(headers)
    r = cli_run("merge", "alice/tiny-llama", PLAIN, "-o", tmp_path / "o")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.output
    assert "refused" in r.stderr and r.stderr.startswith("error: alice/tiny-llama: ")
    assert not list(tmp_path.rglob("escape*")) and not (tmp_path / "o").exists()
    assert not [p for p in (alice.hf_home / "hub").rglob("blobs/*")]
