"""A catalog adapter opened lazily (inspect-rank, merge, resize on a catalog name): its blob is
verified by a streamed sha256 (never read whole), and its factors are read only from the very
file that was hashed."""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratool.catalog import Catalog
from loratool.catalog.blobs import BlobStore
from loratool.errors import CatalogError, FormatError
from loratool.tensors.header import HeaderTensor
from loratool.tensors.io import materialize

D, K, R, LAYERS = 512, 512, 64, 16  # 32 modules × 2 × 64×512 float32 = 8.4 MB of factors


def make_peft(path: Path, *, d: int = D, k: int = K, r: int = R, layers: int = LAYERS) -> Path:
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for layer in range(layers):
        for proj in ("q_proj", "v_proj"):
            mod = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{mod}.lora_A.weight"] = torch.randn(r, k, generator=g)
            tensors[f"{mod}.lora_B.weight"] = torch.randn(d, r, generator=g)
    path.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": ["q_proj", "v_proj"],
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


@pytest.fixture
def cat(loratool_home):
    c = Catalog(loratool_home)
    yield c
    c.close()


@pytest.fixture
def big(cat, tmp_path):
    cat.add(make_peft(tmp_path / "big"), task="t", name="big")
    return cat.blob_path("big")


def factors(adapter) -> dict[str, torch.Tensor]:
    out = {}
    for mod in adapter.modules.values():
        for role, t in mod.tensors().items():
            out[f"{mod.name}:{role}"] = materialize(t)
    return out


def refuse_whole_reads(monkeypatch):
    def refuse(self, sha, *, label=None):
        raise AssertionError("a lazy open read the whole blob")

    monkeypatch.setattr(BlobStore, "read_verified", refuse)


def test_lazy_load_never_reads_the_whole_blob(cat, big, monkeypatch):
    eager = factors(cat.load("big"))
    refuse_whole_reads(monkeypatch)
    lazy = cat.load("big", lazy=True)
    assert all(
        isinstance(t, HeaderTensor) for m in lazy.modules.values() for t in m.tensors().values()
    )
    got = factors(lazy)
    assert got.keys() == eager.keys() and len(got) == 2 * 2 * LAYERS
    for key, t in eager.items():
        assert torch.equal(got[key], t), key
    assert lazy.meta.name == "big" and lazy.meta.task == "t"


def test_lazy_load_memory_stays_far_below_the_blob(cat, big):
    size = big.stat().st_size
    assert size > 8_000_000
    tracemalloc.start()
    try:
        adapter = cat.load("big", lazy=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(adapter.modules) == 2 * LAYERS
    # a 1 MiB hashing buffer plus the parsed header; reading the blob whole would be ≥ size
    assert peak < 2_500_000, (peak, size)


def test_lazy_load_refuses_a_corrupt_blob(cat, big):
    os.chmod(big, 0o644)
    with open(big, "r+b") as fh:
        fh.seek(-3, os.SEEK_END)
        fh.write(b"\x7f\x7f\x7f")
    with pytest.raises(CatalogError, match="corrupt"):
        cat.load("big", lazy=True)
    big.unlink()
    with pytest.raises(CatalogError, match="missing"):
        cat.load("big", lazy=True)


def test_factors_refuse_a_blob_rewritten_after_the_check(cat, big):
    """Same size, bytes changed in place after verification: reading a factor refuses
    instead of returning bytes nobody hashed."""
    adapter = cat.load("big", lazy=True)
    os.chmod(big, 0o644)
    st = big.stat()
    with open(big, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\0\0\0\0")
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    mod = next(iter(adapter.modules.values()))
    with pytest.raises(FormatError, match="changed since its sha256 was verified"):
        materialize(next(iter(mod.tensors().values())))


def test_factors_refuse_a_blob_replaced_after_the_check(cat, big, tmp_path):
    """A new file under the blob's name (another inode), even with the same bytes, is not
    the file that was verified."""
    adapter = cat.load("big", lazy=True)
    copy = tmp_path / "copy"
    copy.write_bytes(big.read_bytes())
    os.replace(copy, big)
    mod = next(iter(adapter.modules.values()))
    t = next(iter(mod.tensors().values()))
    with pytest.raises(FormatError, match="changed since"):
        materialize(t)
    with pytest.raises(FormatError, match="changed since"):
        t.raw()
    # opened again, the replacement verifies (same sha256) and reads
    again, eager = factors(cat.load("big", lazy=True)), factors(cat.load("big"))
    assert all(torch.equal(again[key], t) for key, t in eager.items())


def test_a_blob_replaced_between_hash_and_header_is_refused(cat, big, tmp_path, monkeypatch):
    import loratool.tensors.io as tio

    real = tio.load_file

    def swap_then_read(path, *, lazy=False):
        evil = tmp_path / "evil"
        evil.write_bytes(Path(path).read_bytes())
        os.replace(evil, path)
        return real(path, lazy=lazy)

    monkeypatch.setattr(tio, "load_file", swap_then_read)
    with pytest.raises(CatalogError, match="changed while it was being verified"):
        cat.load("big", lazy=True)


def test_pin_verified_hashes_what_sha256_of_the_bytes_says(cat, big):
    sha = hashlib.sha256(big.read_bytes()).hexdigest()
    path, pin = cat.blobs.pin_verified(sha, label="big")
    st = big.stat()
    assert path == big
    assert (pin.ino, pin.size, pin.mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


def test_inspect_rank_on_a_catalog_name_is_lazy_and_equals_the_path(
    cat, cli_run, tmp_path, monkeypatch
):
    src = make_peft(tmp_path / "small", d=48, k=40, r=6, layers=2)
    cat.add(src, task="t", name="small")
    by_path = json.loads(cli_run("inspect-rank", src, "--json").stdout)
    refuse_whole_reads(monkeypatch)
    by_name = json.loads(cli_run("inspect-rank", "small", "--json").stdout)
    assert by_name["modules"] == by_path["modules"]
    assert by_name["summary"] == by_path["summary"]
