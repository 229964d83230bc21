"""GGUF LoRA adapters for llama.cpp, written and read with the ``gguf`` package.

As llama.cpp's ``convert_lora_to_gguf.py`` writes them and ``src/llama-adapter.cpp`` reads them:
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` (float32),
``general.architecture`` equal to the base's; one ``<gguf tensor name>.lora_a`` (r × in, GGUF
ne = [in, r]) and ``.lora_b`` (out × r) per adapted weight, the names from gguf's own
``TensorNameMap`` for the architecture (``model.layers.0.self_attn.q_proj`` →
``blk.0.attn_q.weight``). llama.cpp scales each pair by alpha / r, r read from the pair: one
alpha for the file, so modules with another alpha·(scale·r) have it folded into B (exact only for
powers of two; warned). The converter applies the base's own row transforms to B: for the llama
architecture (``LlamaModel.undo_permute``) the q and k rows are permuted per head; token
embeddings store lora_a transposed (``llm_build_inp_embd``). Factors keep their dtype (F32, F16,
BF16; F64 becomes F32).

Files loratool writes also carry ``loratool.names`` (GGUF name → model path) and the head
counts, so they read back exactly; a foreign file is read with gguf's first name for each
tensor, and a permuted llama q/k (whose head counts the file does not carry) is refused.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from ..adapter import Adapter, AdapterMeta, LoraModule, build_module
from ..errors import FormatError, MissingDependencyError, ValidationError
from .registry import Format, WriteContext, register

MAGIC = b"GGUF"
# HF architectures (config.json "architectures"[0]) → (gguf architecture, q/k rows permuted),
# as convert_hf_to_gguf registers them (LlamaModel: undo_permute = True; Qwen2/Qwen3: none).
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is a dependency
        raise MissingDependencyError(
            "GGUF needs the gguf package: pip install loratool[gguf]"
        ) from exc
    return gguf


def llama_permute(w, n_head: int, n_head_kv: int | None):
    """convert_hf_to_gguf's ``LlamaModel.permute`` on the rows of ``w``."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama_unpermute(w, n_head: int, n_head_kv: int | None):
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _arch(config: dict | None, label: str):
    if not config:
        raise ValidationError(
            f"{label} needs the base model's config.json (its architecture and head counts)",
            hint="pass --base with the model directory",
        )
    archs = config.get("architectures") or []
    hf = archs[0] if archs else None
    if hf not in ARCHITECTURES:
        raise ValidationError(
            f"GGUF export knows {', '.join(sorted(ARCHITECTURES))}; the base is {hf}",
        )
    return hf, *ARCHITECTURES[hf]


def _numpy(t):
    import numpy as np
    import torch

    gguf = _gguf()
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy(), gguf.GGMLQuantizationType.BF16
    if t.dtype == torch.float16:
        return t.numpy(), None
    return t.to(torch.float32).numpy().astype(np.float32), None


def write_gguf(adapter: Adapter, dest: Path, ctx: WriteContext) -> None:
    import torch

    from .builtin import single_model

    gguf = _gguf()
    adapter = single_model(adapter, ctx, "GGUF")
    hf, arch_name, permute = _arch(ctx.base_config, "GGUF export")
    cfg = ctx.base_config or {}
    n_head = cfg.get("num_attention_heads")
    n_kv = cfg.get("num_key_value_heads", n_head)
    n_blocks = int(cfg.get("num_hidden_layers") or 0)
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    names = gguf.TensorNameMap(arch, n_blocks)
    mods = [m.materialized() for m in adapter.modules.values()]
    # llama.cpp's scale is alpha / r per pair: one alpha carries every module whose
    # scale·r agrees; the others get the ratio folded into B.
    alphas = Counter(m.scale * m.rank for m in mods)
    alpha = alphas.most_common(1)[0][0]
    if alpha == 0:
        raise ValidationError("every module has scale 0 (llama.cpp reads alpha 0 as scale 1)")
    writer = gguf.GGUFWriter(str(dest), arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    if adapter.meta.name:
        writer.add_name(adapter.meta.name)
    back: dict[str, str] = {}
    folded = []
    if float(torch.tensor(alpha, dtype=torch.float32)) != alpha:
        folded.append("(alpha itself rounds to float32)")
    for m in sorted(mods, key=lambda m: m.name):
        path = m.name.removesuffix(".weight")
        gname = names.get_name(m.name, try_suffixes=(".weight",))
        if gname is None:
            raise ValidationError(f"gguf has no {arch_name} tensor name for it", tensor=m.name)
        if m.kind not in ("linear", "embedding"):
            raise ValidationError(f"llama.cpp's LoRA has no {m.kind} modules", tensor=m.name)
        A, B = m.A, m.B
        ratio = (m.scale * m.rank) / alpha
        if ratio != 1:
            B = (B.to(torch.float64) * ratio).to(B.dtype)
            if ratio == 0 or not math.log2(abs(ratio)).is_integer():
                folded.append(m.name)
        if permute and path.endswith("q_proj"):
            B = llama_permute(B, n_head, n_head)
        elif permute and path.endswith("k_proj"):
            B = llama_permute(B, n_head, n_kv)
        if gname == "token_embd.weight" or m.kind == "embedding":
            # llama.cpp keeps token_embd's lora_a transposed (see llm_build_inp_embd)
            A = A.T
        if A.dtype == torch.float64:
            ctx.warn("float64 factors written as float32 (llama.cpp has no F64 LoRA)")
        for suffix, t in ((".lora_a", A), (".lora_b", B)):
            data, raw = _numpy(t)
            writer.add_tensor(gname + suffix, data, raw_dtype=raw)
        back[gname] = path
    if folded:
        ctx.warn(
            f"llama.cpp has one alpha per adapter ({alpha:g}); B of {len(folded)} modules "
            f"rescaled and rounded to its dtype (approximate): {', '.join(folded[:5])}"
        )
    writer.add_string("loratool.names", json.dumps(back, sort_keys=True))
    writer.add_string("loratool.kinds", json.dumps({m.name: m.kind for m in mods}, sort_keys=True))
    if n_head:
        writer.add_uint32("loratool.n_head", int(n_head))
        writer.add_uint32("loratool.n_head_kv", int(n_kv))
    writer.add_string("loratool.hf_architecture", hf)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _torch(t):
    import numpy as np
    import torch

    gguf = _gguf()
    shape = tuple(int(s) for s in reversed(t.shape))
    kind = gguf.GGMLQuantizationType(int(t.tensor_type))
    if kind == gguf.GGMLQuantizationType.F32:
        return torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(shape))
    if kind == gguf.GGMLQuantizationType.F16:
        return torch.from_numpy(np.array(t.data, dtype=np.float16).reshape(shape))
    if kind == gguf.GGMLQuantizationType.BF16:
        raw = np.array(t.data).view(np.uint16).reshape(shape)
        return torch.from_numpy(raw.copy()).view(torch.bfloat16)
    raise ValidationError(f"{kind.name} LoRA tensors are not supported", tensor=t.name)


def read_gguf(path: Path, lazy: bool = False) -> Adapter:
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as exc:
        raise FormatError(f"not a readable GGUF file: {exc}", file=path) from exc
    if _field(reader, "general.type") != "adapter" or _field(reader, "adapter.type") != "lora":
        raise ValidationError("not a GGUF LoRA adapter (general.type / adapter.type)", file=path)
    arch_name = _field(reader, "general.architecture")
    alpha = float(_field(reader, "adapter.lora.alpha") or 0.0)
    names = json.loads(_field(reader, "loratool.names") or "{}")
    kinds = json.loads(_field(reader, "loratool.kinds") or "{}")
    n_head, n_kv = _field(reader, "loratool.n_head"), _field(reader, "loratool.n_head_kv")
    hf = _field(reader, "loratool.hf_architecture")
    permute = (ARCHITECTURES.get(hf) or (arch_name, arch_name == "llama"))[1]
    pairs: dict[str, dict] = {}
    for t in reader.tensors:
        base, _, leaf = t.name.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            if t.name.endswith("_norm.weight"):
                raise ValidationError(
                    "norm vectors in a LoRA adapter are not supported", file=path, tensor=t.name
                )
            raise ValidationError("not a lora_a / lora_b tensor", file=path, tensor=t.name)
        pairs.setdefault(base, {})[leaf] = t
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    modules: dict[str, LoraModule] = {}
    for gname, p in pairs.items():
        if set(p) != {"lora_a", "lora_b"}:
            raise ValidationError("lora_a / lora_b pair incomplete", file=path, tensor=gname)
        A, B = _torch(p["lora_a"]), _torch(p["lora_b"])
        path_ = names.get(gname) or _hf_name(gguf, arch, gname)
        if path_ is None:
            raise ValidationError(
                "no model name known for this GGUF tensor", file=path, tensor=gname
            )
        name = path_ + ".weight"
        kind = kinds.get(name) or ("embedding" if gname == "token_embd.weight" else "linear")
        if gname == "token_embd.weight" or kind == "embedding":
            A = A.T.contiguous()
        if permute and path_.endswith(("q_proj", "k_proj")):
            if not n_head:
                raise ValidationError(
                    "llama.cpp permuted these rows per head; the file does not say how many "
                    "heads, so they cannot be put back",
                    file=path,
                    tensor=gname,
                )
            B = llama_unpermute(B, int(n_head), int(n_head if path_.endswith("q_proj") else n_kv))
        rank = int(A.shape[0])
        # llama.cpp: scale = alpha / r, and alpha 0 means scale 1
        mod_alpha = alpha if alpha else float(rank)
        modules[name] = build_module(name, kind, A, B, mod_alpha, source=path)
    if not modules:
        raise ValidationError("holds no LoRA tensors", file=path)
    training = {"architecture": str(arch_name)}
    for key, ours in (("general.name", "title"), ("general.basename", "base_model")):
        v = _field(reader, key)
        if v:
            training[ours] = str(v)
    return Adapter(
        modules, AdapterMeta(format="gguf"), {"gguf_training": training, "gguf_arch": arch_name}
    )


def _hf_name(gguf, arch, gname: str) -> str | None:
    """The first Hugging Face name gguf's TensorNameMap gives for a GGUF tensor name."""
    import re

    m = re.match(r"^blk\.(\d+)\.(.+)\.weight$", gname)
    for tensor, gguf_name in gguf.TENSOR_NAMES.items():
        if m and gguf_name == "blk.{bid}." + m.group(2):
            cands = gguf.TensorNameMap.block_mappings_cfg.get(tensor)
            return cands[0].format(bid=m.group(1)) if cands else None
        if not m and gguf_name + ".weight" == gname:
            cands = gguf.TensorNameMap.mappings_cfg.get(tensor)
            return cands[0] if cands else None
    return None


def _detect(path: Path, header) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == MAGIC


def data_start(path: Path) -> int:
    """Where the tensor data section begins (after the key/values, the tensor infos and the
    alignment padding): the bytes an edit of the key/values leaves as they are."""
    gguf = _gguf()
    try:
        return int(gguf.GGUFReader(str(path)).data_offset)
    except (ValueError, OSError, KeyError) as exc:
        raise FormatError(f"not a readable GGUF file: {exc}", file=path) from exc


FORMAT = register(
    Format(
        name="gguf",
        help="a llama.cpp LoRA adapter (.gguf; needs --base for the architecture)",
        layout="file",
        detect=_detect,
        read=lambda p, lazy: read_gguf(p, lazy),
        write=write_gguf,
        priority=1,
        suffix=".gguf",
        data_start=data_start,
    )
)
