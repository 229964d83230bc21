"""LyCORIS single files, as lycoris-lora saves them (``LycorisNetworkKohya.save_weights``).

One ``.safetensors`` with every module under its kohya stem (``lora_unet_…``, ``lora_te_…``,
``lora_te1_…``; ``lycoris_…`` for lycoris' own wrapper) and, per module, the tensors of its
algorithm (``custom_state_dict`` of each ``lycoris/modules/*.py``); lycoris picks the algorithm
per module the same way (``lycoris.modules.get_module``: the first whose detection key is there):

- LoCon / LoRA: ``lora_up.weight``, ``lora_down.weight`` [+ ``lora_mid.weight``: Tucker];
- LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` [+ ``hada_t1``, ``hada_t2``];
- LoKr: ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``; ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``
  [+ ``lokr_t2``];
- every module: ``alpha`` (a 0-d tensor; lycoris' loader calls ``float(alpha)``, so a module
  without one does not load there and is refused here too).

Refused by name: weight decomposition (``dora_scale``), full (``diff``/``diff_b``), (B)OFT,
IA³, GLoRA, norms, and anything else. A LoCon with only ``lora_down``/``lora_up`` is also what
the kohya reader reads; this reader takes a file as soon as one key is LyCORIS-only.

Module names stay flattened kohya stems until resolved against a base (``formats.resolve``);
written back, every tensor keeps its key, dtype and the file's metadata.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..adapter import (
    Adapter,
    AdapterMeta,
    LoconTuckerModule,
    LohaModule,
    LokrModule,
    LoraModule,
    build_module,
)
from ..adapter.lycoris import _Lycoris
from ..errors import ValidationError
from ..tensors.header import HeaderTensor
from ..tensors.io import dtype_tag, torch_dtype
from .registry import Format, register
from .training import refresh_network_facts

# key suffixes only LyCORIS writes: a file holding one is read here
LYCORIS_ONLY = ("hada_", "lokr_", "lora_mid.weight")
PREFIXES = (
    "lora_unet_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
    "lora_te_",
    "lora_transformer_",
    "lycoris_",
)
# per algorithm: the tensors it needs and may have (lycoris' weight_list, without dora_scale)
LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
LOHA_OPT = {"hada_t1", "hada_t2"}
LOKR = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
LOCON = {"lora_up.weight", "lora_down.weight"}
LOCON_OPT = {"lora_mid.weight"}
# other LyCORIS algorithms' keys: refused by name
REFUSED = (
    ("dora_scale", "LyCORIS weight decomposition (DoRA, dora_scale) is not supported"),
    ("diff", "LyCORIS full (diff/diff_b) modules are not supported"),
    ("diff_b", "LyCORIS full (diff/diff_b) modules are not supported"),
    ("oft_blocks", "LyCORIS (B)OFT modules are not supported"),
    ("oft_diag", "LyCORIS (B)OFT modules are not supported"),
    ("rescale", "LyCORIS (B)OFT modules are not supported"),
    ("on_input", "LyCORIS IA³ modules are not supported"),
    ("w_norm", "LyCORIS norm modules are not supported"),
    ("b_norm", "LyCORIS norm modules are not supported"),
    ("a1.weight", "LyCORIS GLoRA modules are not supported"),
    ("a2.weight", "LyCORIS GLoRA modules are not supported"),
    ("b1.weight", "LyCORIS GLoRA modules are not supported"),
    ("b2.weight", "LyCORIS GLoRA modules are not supported"),
)
_KEY = re.compile(r"^(?P<stem>[^.]+)\.(?P<part>.+)$")


def looks_like_lycoris(keys) -> bool:
    return any(part.startswith(LYCORIS_ONLY) for part in (k.partition(".")[2] for k in keys))


def _alpha(t) -> float:
    if isinstance(t, HeaderTensor):
        return t.scalar()
    return float(t.float().reshape(()).item())


def lycoris_from_tensors(tensors: dict, metadata: dict, *, source: object) -> Adapter:
    groups: dict[str, dict] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValidationError(
                "not a LyCORIS tensor (expected <stem>.<part>)", file=source, tensor=key
            )
        stem, part = m.group("stem"), m.group("part")
        for marker, why in REFUSED:
            if part == marker:
                raise ValidationError(why, file=source, tensor=key)
        if part != "alpha" and part not in LOHA | LOHA_OPT | LOKR | LOCON | LOCON_OPT:
            raise ValidationError(
                "not a tensor of any LyCORIS algorithm loratool knows", file=source, tensor=key
            )
        groups.setdefault(stem, {})[part] = t
    prefixes = set()
    for stem in groups:
        p = next((p for p in PREFIXES if stem.startswith(p)), None)
        if p is None:
            raise ValidationError(
                f"unknown LyCORIS module prefix (known: {', '.join(PREFIXES)})",
                file=source,
                tensor=stem,
            )
        prefixes.add(p)
    if "lycoris_" in prefixes and len(prefixes) > 1:
        raise ValidationError(
            "mixes lycoris_ names with kohya ones (lora_unet_/lora_te…)", file=source
        )
    if "lora_te_" in prefixes and prefixes & {"lora_te1_", "lora_te2_"}:
        raise ValidationError(
            "mixes lora_te_ (one text encoder) with lora_te1_/lora_te2_ (SDXL numbering)",
            file=source,
        )
    modules = {}
    alpha_tags, alpha_shapes = set(), set()
    for stem, parts in groups.items():
        modules[stem] = _module(stem, parts, source)
        if "alpha" in parts:
            alpha_tags.add(dtype_tag(parts["alpha"].dtype))
            alpha_shapes.add(tuple(parts["alpha"].shape))
    if not modules:
        raise ValidationError("holds no LyCORIS tensors", file=source)
    origin = {
        "lycoris_metadata": dict(metadata or {}),
        "lycoris_alpha_dtype": alpha_tags.pop() if len(alpha_tags) == 1 else None,
        "lycoris_alpha_shape": list(alpha_shapes.pop()) if len(alpha_shapes) == 1 else [],
    }
    return Adapter(modules, AdapterMeta(format="lycoris"), origin)


def _module(stem: str, parts: dict, source):
    def key(part):
        return f"{stem}.{part}"

    names = set(parts) - {"alpha"}
    algos = [
        n
        for n, have in (
            ("LoHa", names & (LOHA | LOHA_OPT)),
            ("LoKr", names & LOKR),
            ("LoCon", names & (LOCON | LOCON_OPT)),
        )
        if have
    ]
    if len(algos) > 1:
        raise ValidationError(
            f"mixes LyCORIS {' and '.join(algos)} tensors in one module", file=source, tensor=stem
        )
    if not algos:
        raise ValidationError("has an alpha but no factors", file=source, tensor=key("alpha"))
    if "alpha" not in parts:
        raise ValidationError(
            f"a LyCORIS {algos[0]} module without alpha (lycoris' own loader needs one)",
            file=source,
            tensor=stem,
        )
    t = parts["alpha"]
    if t.numel() != 1:
        raise ValidationError(
            f"alpha must be a scalar, got shape {list(t.shape)}", file=source, tensor=key("alpha")
        )
    alpha = _alpha(t)
    if not math.isfinite(alpha):
        raise ValidationError(f"alpha is {alpha}", file=source, tensor=key("alpha"))
    if alpha == 0:
        # lycoris reads alpha 0 as alpha = dim (scale 1), ComfyUI as scale 0; lycoris itself
        # never saves 0.
        raise ValidationError(
            "alpha is 0: lycoris reads that as scale 1, ComfyUI as scale 0; refusing to guess",
            file=source,
            tensor=key("alpha"),
        )
    algo = algos[0]
    if algo == "LoHa":
        missing = sorted(LOHA - names)
        if missing:
            raise ValidationError(
                f"a LoHa module without {', '.join(missing)}", file=source, tensor=stem
            )
        cls, kind, roles = LohaModule, "loha", {p: parts[p] for p in names}
    elif algo == "LoKr":
        if not names & {"lokr_w1", "lokr_w1_a", "lokr_w1_b"}:
            raise ValidationError(
                "a LoKr with neither lokr_w1 nor lokr_w1_a/b", file=source, tensor=stem
            )
        if not names & {"lokr_w2", "lokr_w2_a", "lokr_w2_b"}:
            raise ValidationError(
                "a LoKr with neither lokr_w2 nor lokr_w2_a/b", file=source, tensor=stem
            )
        cls, kind, roles = LokrModule, "lokr", {p: parts[p] for p in names}
    else:
        missing = sorted(LOCON - names)
        if missing:
            raise ValidationError(
                f"a LoCon module without {', '.join(missing)}", file=source, tensor=stem
            )
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if "lora_mid.weight" in names:
            cls, kind = LoconTuckerModule, "locon_tucker"
            roles = {"lora_down": down, "lora_mid": parts["lora_mid.weight"], "lora_up": up}
        else:
            return build_module(
                stem, "conv2d" if down.dim() == 4 else "linear", down, up, alpha, source=source
            )
    return cls.from_parts(stem, kind, roles, {"alpha": alpha}, source=source)


# -- writing ------------------------------------------------------------------------------------


def lycoris_parts(adapter: Adapter) -> tuple[dict, dict]:
    """The tensors and metadata of a LyCORIS file holding ``adapter``."""

    origin = adapter.origin
    tag = origin.get("lycoris_alpha_dtype") or origin.get("kohya_alpha_dtype") or "F32"
    shape = origin.get("lycoris_alpha_shape", []) or []
    if adapter.ops:
        op = sorted(adapter.ops)[0]
        raise ValidationError(
            "a LyCORIS file holds no whole-tensor operations", tensor=op, hint="export as PEFT"
        )
    from .kohya import stem_namer

    stem_of = stem_namer(adapter)
    out: dict = {}
    owner: dict[str, str] = {}
    for m in adapter.modules.values():
        if m.target_rows is not None:
            raise ValidationError(
                "a LyCORIS file cannot say that ΔW covers rows of a fused tensor", tensor=m.name
            )
        stem = stem_of(m.name)
        if stem in owner:
            raise ValidationError(
                f"both {owner[stem]} and {m.name} flatten to {stem}", tensor=m.name
            )
        owner[stem] = m.name
        alpha = m.alpha
        if isinstance(m, LoraModule):
            if m.magnitude is not None:
                raise ValidationError(
                    "DoRA magnitudes have no LyCORIS form loratool writes", tensor=m.name
                )
            if m.kind in ("linear_fifo", "embedding"):
                A, B = m.B.T.contiguous(), m.A.T.contiguous()  # (B·A)ᵀ = Aᵀ·Bᵀ, as a Linear
            else:
                A, B = m.A, m.B
            # LyCORIS' scale is alpha / r: rsLoRA's alpha/√r is alpha·√r / r (as lycoris saves it)
            alpha = m.alpha * math.sqrt(m.rank) if m.rslora else m.alpha
            out[f"{stem}.lora_down.weight"] = A
            out[f"{stem}.lora_up.weight"] = B
        elif isinstance(m, _Lycoris):
            for role, t in m.tensors().items():
                part = f"{role}.weight" if isinstance(m, LoconTuckerModule) else role
                out[f"{stem}.{part}"] = t
        else:
            raise ValidationError(f"a {m.label} module has no LyCORIS form", tensor=m.name)
        out[f"{stem}.alpha"] = _alpha_tensor(alpha, tag, shape)
    meta = dict(origin.get("lycoris_metadata") or origin.get("kohya_metadata") or {})
    return out, refresh_network_facts(meta, adapter.modules.values())


def _alpha_tensor(value: float, tag: str, shape: list):
    import torch

    for t in (tag, "F32", "F64"):
        x = torch.tensor(value, dtype=torch_dtype(t))
        if float(x.item()) == value:
            return x.reshape(shape)
    return torch.tensor(value, dtype=torch.float64).reshape(shape)


def write_lycoris(adapter: Adapter, dest: Path, ctx=None) -> None:
    from ..tensors.io import save_file

    tensors, meta = lycoris_parts(adapter)
    save_file(tensors, dest, metadata=meta or None)


def read_lycoris(path: Path, lazy: bool = False) -> Adapter:
    from ..tensors.io import load_file

    tensors, metadata = load_file(path, lazy=lazy)
    return lycoris_from_tensors(tensors, metadata, source=path)


def _detect(path: Path, header) -> bool:
    return header is not None and looks_like_lycoris(header.tensors)


FORMAT = register(
    Format(
        name="lycoris",
        help="one .safetensors file as lycoris-lora saves it (LoHa hada_*, LoKr lokr_*, LoCon "
        "lora_down/lora_mid/lora_up, alpha), under kohya's names",
        layout="file",
        detect=_detect,
        read=read_lycoris,
        write=write_lycoris,
        priority=25,  # before kohya, which reads the same files' plain LoRA modules
        suffix=".safetensors",
    )
)
