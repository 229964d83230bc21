"""Training metadata and the tensor-bytes hash in the catalog (issue 13, last point).

The hashes are checked against their definitions written out here: sha256 over the bytes after
a safetensors file's 8-byte length and header (what sd-scripts' ``addnet_hash_safetensors``
computes, and what ``train_network.py`` stores as ``sshs_model_hash`` through
``precalculate_safetensors_hashes``, reproduced below from its published code), and over a GGUF
file's tensor data section (its offset from the real ``gguf.GGUFReader``). The training facts
are checked against the keys the files were written with."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file
from test_catalog import make_peft_dir

from loratool.catalog import KNOWN_MIGRATIONS, MIGRATIONS, Catalog, record_from_adapter
from loratool.catalog.blobs import BlobStore
from loratool.errors import CatalogError
from loratool.formats import load_adapter, weights_identity

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
LLAMA = FIX / "llama"

SS_META = {
    "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
    "ss_base_model_version": "sdxl_base_v1-0",
    "ss_steps": "1200",
    "ss_max_train_steps": "2000",
    "ss_epoch": "6",
    "ss_num_epochs": "10",
    "ss_learning_rate": "0.0001",
    "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_seed": "42",
    "ss_output_name": "ohwx-style",
    "ss_tag_frequency": json.dumps({"10_ohwx": {"ohwx man": 10, "smiling": 3, " ohwx man": 1}}),
    "ss_new_sd_model_hash": "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
}


# -- the hashes, written out ------------------------------------------------------------
def tensor_bytes_sha256(path: Path) -> str:
    """sha256 of everything after the 8-byte little-endian header length and the header."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n :]).hexdigest()


def sd_scripts_precalculated_hash(tensors: dict, metadata: dict) -> str:
    """sd-scripts' ``train_util.precalculate_safetensors_hashes(tensors, metadata)[0]``: the
    tensors serialised in memory with only the ``ss_*`` metadata, then
    ``addnet_hash_safetensors`` of that buffer (seek past 8 + n, sha256 the rest, 1 MiB
    reads)."""
    buf = io.BytesIO(
        safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    )
    n = int.from_bytes(buf.read(8), "little")
    buf.seek(n + 8)
    h = hashlib.sha256()
    for chunk in iter(lambda: buf.read(1024 * 1024), b""):
        h.update(chunk)
    return h.hexdigest()


def kohya_tensors(seed: int = 0, r: int = 4, alpha: float = 2.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(2):
        stem = f"lora_unet_down_blocks_0_attentions_0_proj_{i}"
        out[stem + ".lora_down.weight"] = torch.randn(r, 40, generator=g)
        out[stem + ".lora_up.weight"] = torch.randn(24, r, generator=g)
        out[stem + ".alpha"] = torch.tensor(alpha)
    return out


def save_like_sd_scripts(path: Path, tensors: dict, metadata: dict) -> Path:
    """What ``LoRANetwork.save_weights`` does: precalculated hashes into the metadata, then
    ``save_file``."""
    meta = dict(metadata)
    meta["sshs_model_hash"] = sd_scripts_precalculated_hash(tensors, meta)
    meta["sshs_legacy_hash"] = "00000000"
    save_file(tensors, str(path), metadata=meta)
    return path


def test_tensor_hash_is_the_sd_scripts_hash_and_ignores_the_metadata(tmp_path):
    tensors = kohya_tensors()
    f = save_like_sd_scripts(tmp_path / "style.safetensors", tensors, SS_META)
    ident = weights_identity(f)
    assert ident.path == f
    assert ident.file_sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert ident.tensor_sha256 == tensor_bytes_sha256(f)
    # the hash sd-scripts computed before writing, and stored in the file
    stored = json.loads(f.read_bytes()[8 : 8 + struct.unpack("<Q", f.read_bytes()[:8])[0]])
    assert ident.tensor_sha256 == stored["__metadata__"]["sshs_model_hash"]
    assert ident.tensor_sha256 == sd_scripts_precalculated_hash(tensors, SS_META)
    assert ident.autov2 == ident.file_sha256[:10].upper()
    assert ident.autov3 == ident.tensor_sha256[:12].upper()
    # metadata edited (a longer header): the tensor bytes' hash stays, the file's changes
    g = tmp_path / "edited.safetensors"
    save_file(tensors, str(g), metadata={**SS_META, "modelspec.trigger_phrase": "ohwx man" * 50})
    edited = weights_identity(g)
    assert edited.tensor_sha256 == ident.tensor_sha256 and edited.file_sha256 != ident.file_sha256
    # one weight changed: a new tensor hash
    tensors["lora_unet_down_blocks_0_attentions_0_proj_0.lora_up.weight"][0, 0] += 1
    save_file(tensors, str(g), metadata=SS_META)
    assert weights_identity(g).tensor_sha256 != ident.tensor_sha256


def test_peft_and_mlx_directories_are_named_by_their_tensor_file(tmp_path, cli_run):
    peft = make_peft_dir(tmp_path / "peft")
    ident = weights_identity(peft)
    assert ident.path == peft / "adapter_model.safetensors"
    assert ident.tensor_sha256 == tensor_bytes_sha256(ident.path)
    r = cli_run("convert", FIX / "adapters" / "llama-plain", tmp_path / "mlx", "--to", "mlx")
    assert r.exit_code == 0, r.output
    ident = weights_identity(tmp_path / "mlx")
    assert ident.path == tmp_path / "mlx" / "adapters.safetensors"
    assert ident.file_sha256 == hashlib.sha256(ident.path.read_bytes()).hexdigest()
    assert ident.tensor_sha256 == tensor_bytes_sha256(ident.path)


def test_gguf_tensor_hash_covers_its_data_section(tmp_path):
    gguf = pytest.importorskip("gguf")
    from loratool.formats.convert import convert

    adapter = load_adapter(FIX / "adapters" / "llama-plain")
    adapter.meta.name = "one"
    convert(adapter, tmp_path / "a.gguf", "gguf", base=LLAMA)
    adapter.meta.name = "a much longer general.name than before"
    convert(adapter, tmp_path / "b.gguf", "gguf", base=LLAMA)
    a, b = weights_identity(tmp_path / "a.gguf"), weights_identity(tmp_path / "b.gguf")
    for path, ident in ((tmp_path / "a.gguf", a), (tmp_path / "b.gguf", b)):
        data = path.read_bytes()
        start = gguf.GGUFReader(str(path)).data_offset
        assert ident.tensor_sha256 == hashlib.sha256(data[start:]).hexdigest()
        assert ident.file_sha256 == hashlib.sha256(data).hexdigest()
    assert a.tensor_sha256 == b.tensor_sha256 and a.file_sha256 != b.file_sha256


# -- the catalog records the facts --------------------------------------------------------
@pytest.fixture
def cat(loratool_home):
    c = Catalog(loratool_home)
    yield c
    c.close()


def test_kohya_training_facts_and_hashes_are_recorded(cat, tmp_path):
    f = save_like_sd_scripts(tmp_path / "ohwx-style.safetensors", kohya_tensors(), SS_META)
    row = cat.add(f, task="style")
    t = row["training"]
    assert t["base_model"] == "sd_xl_base_1.0.safetensors"
    assert t["base_model_version"] == "sdxl_base_v1-0"
    assert t["steps"] == "1200"  # the steps done when saved, not the planned 2000
    assert t["epochs"] == "6"
    assert t["learning_rate"] == "0.0001" and t["optimizer"].endswith("AdamW8bit")
    assert t["network_dim"] == "4" and t["network_alpha"] == "2.0" and t["seed"] == "42"
    assert t["title"] == "ohwx-style"
    assert t["base_model_hash"] == SS_META["ss_new_sd_model_hash"]
    # no modelspec.trigger_phrase: the most frequent caption tags stand in
    assert t["top_tags"].startswith("ohwx man, smiling")
    assert t["addnet_hash"] == row["tensor_sha256"] == tensor_bytes_sha256(f)
    assert row["file_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert cat.get("ohwx-style")["training"] == t


def test_peft_mlx_and_gguf_facts_are_recorded(cat, tmp_path, cli_run):
    pytest.importorskip("gguf")
    src = FIX / "adapters" / "llama-plain"
    peft = cat.add(src, task="t")
    assert peft["training"] == {
        "base_model": "fixtures/llama",
        "task_type": "CAUSAL_LM",
        "trainer": "0.21.2",
    }
    assert peft["tensor_sha256"] == tensor_bytes_sha256(src / "adapter_model.safetensors")
    assert cli_run("convert", src, tmp_path / "mlx", "--to", "mlx").exit_code == 0
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    mlx = cat.add(tmp_path / "mlx", task="t", name="m")
    assert mlx["training"]["trainer"] == "mlx-lm"
    assert mlx["training"]["num_layers"] == str(cfg["num_layers"])
    assert mlx["tensor_sha256"] == tensor_bytes_sha256(tmp_path / "mlx" / "adapters.safetensors")
    r = cli_run("export", "llama-plain", tmp_path / "a.gguf", "--format", "gguf", "--base", LLAMA)
    assert r.exit_code == 0, r.output
    g = cat.add(tmp_path / "a.gguf", task="t", name="g")
    assert g["training"]["architecture"] == "llama"
    assert g["training"]["title"] == "llama-plain"  # general.name
    assert g["tensor_sha256"] == weights_identity(tmp_path / "a.gguf").tensor_sha256


def test_adapters_made_in_the_catalog_have_no_source_hash(cat, tmp_path):
    cat.add(make_peft_dir(tmp_path / "a"), task="t")
    adapter = cat.load("a")
    row = cat.add_adapter(adapter, name="copy", task="t")
    assert row["file_sha256"] is None and row["tensor_sha256"] is None
    assert row["training"]["base_model"] == "tiny/llama"  # from the origin the blob keeps
    assert row["same_weights"] == [] and cat.same_weights("a")["same_weights"] == []


# -- the same weights with edited metadata are one adapter ---------------------------------
def test_same_weights_with_edited_metadata_are_recognised(cat, tmp_path):
    tensors = kohya_tensors()
    first = save_like_sd_scripts(tmp_path / "style.safetensors", tensors, SS_META)
    cat.add(first, task="style")
    edited = tmp_path / "style-v2.safetensors"
    save_file(tensors, str(edited), metadata={**SS_META, "modelspec.trigger_phrase": "ohwx"})
    with pytest.raises(CatalogError) as err:
        cat.add(edited, task="style")
    msg = str(err.value)
    assert "same weights as style" in msg and "only the metadata differs" in msg
    assert str(edited) in msg and "--replace" in msg and "--keep-both" in msg
    with pytest.raises(CatalogError, match="same weights as style"):
        cat.add(edited, task="style", name="other")
    assert cat.count() == 1
    # --replace without --name: the adapter these weights are is updated, under its name
    old_blob = cat.get("style")["sha256"]
    row = cat.add(edited, task="style", replace=True)
    assert row["name"] == "style" and cat.count() == 1
    assert row["training"]["trigger_words"] == "ohwx" and row["source"] == str(edited)
    assert row["sha256"] != old_blob and not cat.blobs.exists(old_blob)
    # --keep-both: a second adapter, which knows it has the same weights
    both = cat.add(first, task="style", name="again", keep_both=True)
    assert both["same_weights"] == ["style"]
    assert cat.same_weights("style") == {"same_weights": ["again"], "same_tensors": []}
    # the file "style" was updated from, again: the oldest twin is named, the others counted
    with pytest.raises(CatalogError, match=r"same weights as style \(and 1 more\).*the same file"):
        cat.add(edited, task="style")
    # the first file again: its default name is the twin's
    with pytest.raises(CatalogError, match="name 'style' is taken, by the same weights") as err:
        cat.add(first, task="style")
    assert "only the metadata differs" in str(err.value) and "--replace" in str(err.value)
    assert cat.count() == 2


def test_same_tensors_with_another_alpha_are_another_adapter(cat, tmp_path):
    a = make_peft_dir(tmp_path / "a", alpha=8)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    cfg = json.loads((b / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 16  # same tensor bytes, twice the scale: not the same adapter
    (b / "adapter_config.json").write_text(json.dumps(cfg))
    cat.add(a, task="t")
    row = cat.add(b, task="t")
    assert row["tensor_sha256"] == cat.get("a")["tensor_sha256"]
    assert row["same_weights"] == [] and row["same_tensors"] == ["a"]


def test_concurrent_duplicate_check_happens_under_the_lock(cat, tmp_path, monkeypatch):
    # The check reads the rows inside the write transaction: a twin committed by another
    # process between the slow load and the lock is still caught.
    f = save_like_sd_scripts(tmp_path / "s.safetensors", kohya_tensors(), SS_META)
    other = Catalog(cat.home)
    real = Catalog._write

    def write_after_other_added(self):
        if self is cat and not other.exists("s-by-other"):
            other.add(f, task="t", name="s-by-other")
        return real(self)

    monkeypatch.setattr(Catalog, "_write", write_after_other_added)
    with pytest.raises(CatalogError, match="same weights as s-by-other"):
        cat.add(f, task="t", name="mine")
    other.close()


# -- list filters --------------------------------------------------------------------------
def _names(rows) -> list[str]:
    return [r["name"] for r in rows]


def test_list_filters_on_training_meta_trigger_and_hashes(cat, tmp_path):
    save_like_sd_scripts(tmp_path / "xl.safetensors", kohya_tensors(0), SS_META)
    sd15 = {**SS_META, "ss_sd_model_name": "v1-5-pruned.safetensors", "ss_steps": "800"}
    sd15["modelspec.trigger_phrase"] = "zkz woman, portrait"
    save_like_sd_scripts(tmp_path / "sd15.safetensors", kohya_tensors(1), sd15)
    cat.add(tmp_path / "xl.safetensors", task="style", meta={"source": "civitai"})
    cat.add(tmp_path / "sd15.safetensors", task="style")
    cat.add(make_peft_dir(tmp_path / "llm"), task="chat")
    L = cat.list  # noqa: N806
    assert _names(L(trained=[("base_model", "sd_xl_base_1.0.safetensors")])) == ["xl"]
    assert _names(L(trained=[("base_model", "SD_XL_BASE_1.0.SAFETENSORS")])) == ["xl"]
    assert _names(L(trained=[("base_model", "*xl*")])) == ["xl"]
    assert _names(L(trained=[("base_model", "*.safetensors")])) == ["sd15", "xl"]
    assert _names(L(trained=[("base_model", "sd_xl")])) == []  # exact unless a glob
    assert _names(L(trained=[("steps", "800")])) == ["sd15"]
    assert _names(L(trained=[("trigger_words", None)])) == ["sd15"]  # the key is there
    assert _names(L(trained=[("base_model", "TINY/*")])) == ["llm"]
    assert _names(L(trained=[("base_model", "*"), ("steps", "1200")])) == ["xl"]
    assert _names(L(trigger="ZKZ")) == ["sd15"]
    assert _names(L(trigger="ohwx")) == ["xl"]  # from its caption tags (top_tags)
    assert _names(L(meta=[("source", "CivitAI")])) == ["xl"]
    assert _names(L(meta=[("source", None)], task="chat")) == []
    xl = cat.get("xl")
    for prefix in (xl["tensor_sha256"][:12].upper(), xl["file_sha256"][:10], xl["sha256"][:8]):
        assert _names(L(hash_prefix=prefix)) == ["xl"]
    assert _names(L(hash_prefix="0x" + xl["tensor_sha256"])) == ["xl"]
    assert _names(L(hash_prefix="ffffffffffffffff")) == []


def test_list_and_show_cli(cat, tmp_path, cli_run):
    f = save_like_sd_scripts(tmp_path / "xl.safetensors", kohya_tensors(), SS_META)
    cat.add(f, task="style")
    cat.add(make_peft_dir(tmp_path / "llm"), task="chat")
    r = cli_run("list", "--trained", "base_model=*XL*", "--json")
    assert r.exit_code == 0 and [x["name"] for x in json.loads(r.stdout)] == ["xl"]
    row = json.loads(r.stdout)[0]
    assert row["tensor_sha256"] == tensor_bytes_sha256(f)
    assert row["file_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    r = cli_run("list", "--trigger", "ohwx")
    assert r.exit_code == 0 and "xl" in r.stdout and "llm" not in r.stdout
    r = cli_run("list", "--hash", tensor_bytes_sha256(f)[:12].upper(), "--json")
    assert [x["name"] for x in json.loads(r.stdout)] == ["xl"]
    r = cli_run("list", "--trained", "steps=99999")
    assert r.exit_code == 0 and "no adapters match" in r.stdout
    for bad in (["--hash", "xyz"], ["--trained", "=x"], ["--trigger", " "]):
        r = cli_run("list", *bad)
        assert r.exit_code == 2, (bad, r.output)
    r = cli_run("show", "xl", "--json")
    info = json.loads(r.stdout)
    assert info["training"]["steps"] == "1200" and info["training"]["seed"] == "42"
    assert info["tensor_sha256"] == tensor_bytes_sha256(f)
    assert info["autov3"] == tensor_bytes_sha256(f)[:12].upper()
    assert info["autov2"] == hashlib.sha256(f.read_bytes()).hexdigest()[:10].upper()
    assert info["same_weights"] == [] and info["same_tensors"] == []
    r = cli_run("show", "xl")
    assert r.exit_code == 0
    assert f"tensor sha256  {tensor_bytes_sha256(f)} (AutoV3 " in r.stdout
    assert "training:" in r.stdout and "  steps = 1200" in r.stdout
    assert "declared hash" not in r.stdout  # sd-scripts' sshs_model_hash is the real one
    r = cli_run("show", "llm")
    assert "base_model = tiny/llama" in r.stdout


def test_add_cli_refuses_and_updates_same_weights(tmp_path, cli_run):
    tensors = kohya_tensors()
    save_like_sd_scripts(tmp_path / "style.safetensors", tensors, SS_META)
    save_file(tensors, str(tmp_path / "v2.safetensors"), metadata={"ss_output_name": "v2"})
    assert cli_run("add", tmp_path / "style.safetensors", "--task", "s").exit_code == 0
    r = cli_run("add", tmp_path / "v2.safetensors", "--task", "s")
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: ") and "same weights as style" in lines[0]
    )
    r = cli_run("add", tmp_path / "v2.safetensors", "--task", "s", "--replace")
    assert r.exit_code == 0 and r.stdout.startswith("style\n")
    r = cli_run("add", tmp_path / "style.safetensors", "--task", "s", "--name", "b", "--keep-both")
    assert r.exit_code == 0 and "note: the same weights as style" in r.stderr
    r = cli_run("show", "style")
    assert "same weights   b" in r.stdout
    # a file whose declared sshs_model_hash is not its tensor bytes' hash is shown as such
    save_file(tensors, str(tmp_path / "lie.safetensors"), metadata={"sshs_model_hash": "ab" * 32})
    r = cli_run("add", tmp_path / "lie.safetensors", "--task", "s", "--keep-both")
    assert r.exit_code == 0
    assert "declared hash  " + "ab" * 32 in cli_run("show", "lie").stdout


# -- an older catalog is migrated in place --------------------------------------------------
def old_catalog(home: Path, adapters: dict[str, Path]) -> None:
    """A catalog as loratool wrote it before 0003_training: its migrations, and rows and
    blobs written column by column as its add did (only the columns that schema had)."""
    import sqlite_utils

    from loratool.formats.canonical import canonical_bytes

    home.mkdir(parents=True)
    db = sqlite_utils.Database(home / "catalog.db")
    db.enable_wal()
    MIGRATIONS.apply(db, stop_before="0003_training")
    db.execute(f"PRAGMA user_version = {KNOWN_MIGRATIONS.index('0003_training')}")
    store = BlobStore(home / "blobs", home / "tmp")
    a_cols, m_cols = set(db["adapters"].columns_dict), set(db["modules"].columns_dict)
    assert "tensor_sha256" not in a_cols and "training" not in db.table_names()
    for name, src in adapters.items():
        adapter = load_adapter(src)
        data = canonical_bytes(adapter)
        sha = hashlib.sha256(data).hexdigest()
        store.put(data)
        rec = record_from_adapter(adapter, name=name, task="t", sha256=sha, source=str(src))
        db["adapters"].insert({k: v for k, v in rec.row().items() if k in a_cols})
        for i, m in enumerate(rec.modules):
            row = {**m.__dict__, "adapter": name, "position": i}
            for k in ("a_shape", "b_shape", "base_shape"):
                row[k] = json.dumps(row[k])
            db["modules"].insert({k: v for k, v in row.items() if k in m_cols})
    db.conn.commit()
    db.close()


def test_an_old_catalog_is_migrated_with_its_training_facts(loratool_home, tmp_path, cli_run):
    f = save_like_sd_scripts(tmp_path / "xl.safetensors", kohya_tensors(), SS_META)
    old_catalog(loratool_home, {"xl": f, "llm": make_peft_dir(tmp_path / "llm")})
    with Catalog(loratool_home) as c:
        assert [m.name for m in MIGRATIONS.applied(c.db)] == list(KNOWN_MIGRATIONS)
        assert c.schema_problems() == []
        xl = c.get("xl")
        # what the blob kept of the file's header, as an add today records it
        assert xl["training"] == load_and_training(f)
        assert xl["training"]["steps"] == "1200"
        assert c.get("llm")["training"]["base_model"] == "tiny/llama"
        # the source files were not kept: their hashes are unknown, not guessed
        assert xl["file_sha256"] is None and xl["tensor_sha256"] is None
        assert c.verify().ok
        assert _names(c.list(trained=[("base_model", "*xl*")])) == ["xl"]
        # adding the same file now records its hashes (its old row has none to compare)
        row = c.add(f, task="t", name="xl2")
        assert row["tensor_sha256"] == tensor_bytes_sha256(f)
    r = cli_run("show", "xl")
    assert r.exit_code == 0 and "not recorded" in r.stdout and "steps = 1200" in r.stdout


def load_and_training(path: Path) -> dict:
    from loratool.formats.training import training_of

    return training_of(load_adapter(path))


def test_migration_survives_a_missing_blob(loratool_home, tmp_path):
    f = save_like_sd_scripts(tmp_path / "xl.safetensors", kohya_tensors(), SS_META)
    old_catalog(loratool_home, {"xl": f})
    for p in (loratool_home / "blobs").rglob("*.safetensors"):
        p.unlink()
    with Catalog(loratool_home) as c:
        assert c.get("xl")["training"] == {}
        assert [p.kind for p in c.verify().problems] == ["missing-blob"]


# -- verify checks the new rows ---------------------------------------------------------------
def test_verify_finds_damaged_training_rows_and_hashes(cat, tmp_path):
    f = save_like_sd_scripts(tmp_path / "xl.safetensors", kohya_tensors(), SS_META)
    cat.add(f, task="t")
    assert cat.verify().ok
    conn = sqlite3.connect(cat.db_path)
    conn.execute("update training set value = x'07' where adapter = 'xl' and key = 'steps'")
    conn.execute("insert into training values ('ghost', 'steps', '1')")
    conn.execute("update adapters set tensor_sha256 = 'nope' where name = 'xl'")
    conn.commit()
    conn.close()
    found = [str(p) for p in cat.verify().problems]
    assert any("training fact 'steps' = b'\\x07' is not text" in p for p in found)
    assert any("ghost" in p and "training" in p for p in found)
    assert any("tensor_sha256 'nope' is not a sha256" in p for p in found)
    with pytest.raises(CatalogError, match="tensor_sha256"):
        cat.get("xl")
    conn = sqlite3.connect(cat.db_path)
    conn.execute("update adapters set tensor_sha256 = null where name = 'xl'")
    conn.commit()
    conn.close()
    with pytest.raises(CatalogError, match="damaged: training 'steps' = b'.x07' is not text"):
        cat.get("xl")


def test_the_committed_kohya_fixture(cat):
    f = FIX / "adapters" / "conv-kohya.safetensors"
    row = cat.add(f, task="toy")
    assert row["training"] == {
        "base_model_version": "toy-conv",
        "network_alpha": "2.0",
        "network_args": '{"conv_dim": "4", "conv_alpha": "2.0"}',
        "network_dim": "4",
        "network_module": "networks.lora",
        "title": "conv-kohya",
    }
    assert row["tensor_sha256"] == tensor_bytes_sha256(f)
    assert _names(cat.list(trained=[("network_args", '*"conv_dim": "4"*')])) == ["conv-kohya"]


def test_verify_sees_the_new_schema(cat):
    assert cat.schema_problems() == []
    cat.db.execute("drop table training")
    cat.db.execute("drop index idx_adapters_tensor_sha256")
    found = [p.message for p in cat.schema_problems()]
    assert "table training is missing" in found
    assert "index idx_adapters_tensor_sha256 on adapters is missing" in found


def test_a_kohya_export_keeps_the_tensor_hash(cat, tmp_path, cli_run):
    """kohya → catalog → kohya writes the same tensor bytes: AUTOMATIC1111 and Civitai still
    know the export by its hash, and adding it back is recognised as the same weights."""
    f = save_like_sd_scripts(tmp_path / "style.safetensors", kohya_tensors(), SS_META)
    cat.add(f, task="s")
    out = tmp_path / "out.safetensors"
    assert cli_run("export", "style", out, "--format", "kohya").exit_code == 0
    assert tensor_bytes_sha256(out) == tensor_bytes_sha256(f)
    with pytest.raises(CatalogError, match="same weights as style"):
        cat.add(out, task="s")


def test_hostile_metadata_is_bounded_and_printed_safely(cat, tmp_path, cli_run):
    meta = {"ss_training_comment": "x" * 5000, "ss_output_name": "evil\x1b[31mred\x07"}
    save_file(kohya_tensors(), str(tmp_path / "h.safetensors"), metadata=meta)
    row = cat.add(tmp_path / "h.safetensors", task="t")
    assert len(row["training"]["comment"]) == 2000 and row["training"]["comment"].endswith("…")
    out = cli_run("show", "h").stdout
    assert "\x1b" not in out and "\x07" not in out and "title = evil" in out
