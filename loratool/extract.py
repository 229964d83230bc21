"""extract: a LoRA from the difference of two full models, streamed tensor pair by tensor pair.

The plan (``plan_extract``) reads only headers and config.json: it checks that the two models
hold the same tensors with the same shapes, decides what each tensor becomes (a LoRA module of
some kind, a full tensor kept as PEFT ``modules_to_save``, or a tensor that must not differ)
and names the base and the task type for the adapter config. The engine (``run_extract``)
then reads one pair at a time — a reader thread fetches the next pair while the current one
is factored, so disk and arithmetic overlap and memory holds about two pairs — computes
ΔW = W_finetuned − W_base in float32 on the chosen device, and factors it with
``rank.factor_dense`` (randomized SVD by default), measuring each module's relative error.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .adapter import Adapter, AdapterMeta, LoraModule
from .adapter.ops import ReplaceTensor
from .errors import ValidationError
from .rank import RankRule
from .tensors.header import BaseIndex, HeaderTensor, TensorInfo, read_base

# PEFT's TaskType values that an adapter config can carry.
TASK_TYPES = (
    "CAUSAL_LM",
    "SEQ_2_SEQ_LM",
    "SEQ_CLS",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
OUT_DTYPES = ("float32", "float16", "bfloat16", "same")
EMBED_CHOICES = ("lora", "full")

_CONV1D_NAMES = re.compile(r"\.(c_attn|c_proj|c_fc|q_attn)\.weight$")
# Input embeddings (nn.Embedding): PEFT's LoRA for them is lora_embedding_A/B.
_EMBED_NAMES = re.compile(
    r"(embed_tokens|word_embeddings|wte|wpe|embed_positions|shared|embeddings?)\.weight$"
)
# Output embeddings (an nn.Linear over the vocabulary).
_OUTPUT_NAMES = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")
# transformers' encoder-decoder families whose *ForConditionalGeneration is a seq2seq LM (others
# with that suffix, Llava, Qwen2-VL, …, are causal LMs with a vision tower).
_SEQ2SEQ_TYPES = {
    "bart",
    "mbart",
    "t5",
    "mt5",
    "umt5",
    "longt5",
    "pegasus",
    "pegasus_x",
    "marian",
    "m2m_100",
    "nllb-moe",
    "led",
    "plbart",
    "fsmt",
    "blenderbot",
    "blenderbot-small",
    "prophetnet",
    "switch_transformers",
    "bigbird_pegasus",
}


@dataclass(frozen=True)
class Planned:
    """One tensor name and what it becomes: a module kind, "full" or "same" (must not differ)."""

    name: str
    role: str  # linear | linear_fifo | conv2d | embedding | full | same
    base: TensorInfo
    ft: TensorInfo


@dataclass(frozen=True)
class ExtractPlan:
    base: BaseIndex
    ft: BaseIndex
    items: tuple[Planned, ...]
    rule: RankRule
    exact: bool
    oversample: int
    niter: int
    seed: int
    device: str
    dtype: str
    embed: str
    base_model: str
    base_model_source: str  # how it was found: option | hf-cache | config | path
    revision: str | None
    task_type: str | None


@dataclass
class ExtractResult:
    adapter: Adapter
    modules: dict[str, dict]  # per extracted module: kind, rank, relative_error, method, q
    full: list[str] = field(default_factory=list)  # tensors kept whole (modules_to_save)
    not_extracted: list[dict] = field(default_factory=list)  # changed, not expressible as LoRA
    seconds: float = 0.0
    device: str = "cpu"


# -- naming the base and the task ------------------------------------------------------------


def _config(root: Path) -> dict:
    cfg = (root if root.is_dir() else root.parent) / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def base_model_id(base: BaseIndex, given: str | None = None) -> tuple[str, str | None, str]:
    """(name, revision, how) for the adapter config's base_model_name_or_path.

    In order: ``given`` (the user's --base-model); a Hugging Face cache snapshot
    (…/models--OWNER--NAME/snapshots/SHA → OWNER/NAME at revision SHA); config.json's
    ``_name_or_path`` when it is a Hub id or an existing absolute path; else the base folder's
    absolute path, which ``AutoPeftModelForCausalLM`` loads on this machine. Never a bare
    folder name, which loads from nowhere.
    """
    if given:
        name, _, rev = given.partition("@")
        return name, rev or None, "option"
    root = base.root if base.root.is_dir() else base.root.parent
    root = root.resolve()
    from .bases import hub_snapshot

    snap = hub_snapshot(root)
    if snap is not None:
        return snap[0], snap[1], "hf-cache"
    declared = _config(root).get("_name_or_path")
    if isinstance(declared, str) and declared:
        from .bases import looks_like_hub_id

        if looks_like_hub_id(declared) and not Path(declared).exists():
            return declared, None, "config"
        if Path(declared).is_absolute() and Path(declared).exists():
            return declared, None, "config"
    return str(root), None, "path"


def task_type_of(root: Path) -> str | None:
    """PEFT's task_type for a model, from its config.json's architectures (None if unknown)."""
    cfg = _config(root)
    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    if arch.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if arch.endswith("ForSeq2SeqLM"):
        return "SEQ_2_SEQ_LM"
    if arch.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM" if cfg.get("model_type") in _SEQ2SEQ_TYPES else "CAUSAL_LM"
    if arch.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if arch.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if arch.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    if arch.endswith("Model"):
        return "FEATURE_EXTRACTION"
    return None


# -- plan ------------------------------------------------------------------------------------


def _role(name: str, info: TensorInfo, gpt2: bool, embed: str) -> str:
    from .tensors.header import FLOAT_DTYPES

    if info.dtype not in FLOAT_DTYPES or not name.endswith(".weight"):
        return "same"
    if len(info.shape) == 4:
        return "conv2d"
    if len(info.shape) != 2:
        return "same"
    if _EMBED_NAMES.search(name):
        return "embedding" if embed == "lora" else "full"
    if _OUTPUT_NAMES.search(name):
        return "linear" if embed == "lora" else "full"
    if gpt2 and _CONV1D_NAMES.search(name):
        return "linear_fifo"  # Conv1D stores in×out
    return "linear"


def plan_extract(
    base_path,
    finetuned_path,
    rule: RankRule,
    *,
    exact: bool = False,
    oversample: int = 10,
    niter: int = 2,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "float32",
    embed: str = "lora",
    base_model: str | None = None,
    task_type: str | None = "auto",
) -> ExtractPlan:
    """Check the two models against each other and decide every tensor's fate; reads headers."""
    from .merge import pick_device

    if dtype not in OUT_DTYPES:
        raise ValidationError(f"unknown --dtype {dtype!r}; choose one of {', '.join(OUT_DTYPES)}")
    if embed not in EMBED_CHOICES:
        raise ValidationError(f"unknown embedding mode {embed!r}")
    if oversample < 0 or niter < 0:
        raise ValidationError("--oversample and --niter must be ≥ 0")
    if task_type not in (None, "auto", *TASK_TYPES):
        raise ValidationError(
            f"unknown --task-type {task_type!r}; choose one of {', '.join(TASK_TYPES)}"
        )
    dev = pick_device(device)
    base = read_base(base_path)
    ft = read_base(finetuned_path)
    only = sorted(set(base.tensors) ^ set(ft.tensors))
    if only:
        where = "the fine-tuned model" if only[0] in ft.tensors else "the base"
        raise ValidationError(
            f"only {where} holds this tensor: the two models hold different tensors",
            file=finetuned_path,
            tensor=only[0],
        )
    gpt2 = (
        _config(ft.root).get("model_type") == "gpt2"
        or _config(base.root).get("model_type") == "gpt2"
    )
    items = []
    order = sorted(base.tensors.values(), key=lambda t: (base.files.index(t.file), t.start))
    for binfo in order:
        name = binfo.name
        finfo = ft.tensors[name]
        if finfo.shape != binfo.shape:
            hint = None
            if _EMBED_NAMES.search(name) or _OUTPUT_NAMES.search(name):
                hint = "the fine-tune resized its vocabulary; a LoRA cannot change a shape"
            raise ValidationError(
                f"shape {list(finfo.shape)} in the fine-tuned model, {list(binfo.shape)} in the base",
                file=finetuned_path,
                tensor=name,
                hint=hint,
            )
        items.append(Planned(name, _role(name, finfo, gpt2, embed), binfo, finfo))
    name, rev, how = base_model_id(base, base_model)
    tt = task_type_of(ft.root) if task_type == "auto" else task_type
    return ExtractPlan(
        base,
        ft,
        tuple(items),
        rule,
        exact,
        oversample,
        niter,
        seed,
        dev,
        dtype,
        embed,
        name,
        how,
        rev,
        tt,
    )


# -- engine ----------------------------------------------------------------------------------


class _Reader:
    """Reads tensor pairs' bytes, one file handle per file, on one thread at a time."""

    def __init__(self) -> None:
        self.handles: dict[Path, object] = {}

    def read(self, info: TensorInfo) -> bytearray:
        from .errors import FormatError

        fh = self.handles.get(info.file)
        if fh is None:
            fh = self.handles[info.file] = open(info.file, "rb")  # noqa: SIM115
        fh.seek(info.start)
        buf = bytearray(info.nbytes)
        n = fh.readinto(buf)
        if n != info.nbytes:
            raise FormatError(
                f"read {n} of {info.nbytes} bytes: truncated", file=info.file, tensor=info.name
            )
        return buf

    def pair(self, item: Planned) -> tuple[Planned, bytearray, bytearray]:
        return item, self.read(item.base), self.read(item.ft)

    def close(self) -> None:
        for fh in self.handles.values():
            fh.close()


def _out_dtype(plan: ExtractPlan, info: TensorInfo):
    import torch

    from .tensors.io import torch_dtype

    if plan.dtype == "same":
        dt = torch_dtype(info.dtype)
        return (
            dt
            if dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
            else torch.float32
        )
    return getattr(torch, plan.dtype)


def run_extract(plan: ExtractPlan, progress: Callable | None = None) -> ExtractResult:
    """Execute a plan: the adapter (scale 1, alpha = r) and what happened to every tensor."""
    import torch

    from .formats.peft import build_config
    from .rank import factor_dense, frobenius_sq
    from .tensors.io import tensor_from_bytes

    progress = progress or (lambda n=1, label=None: None)
    t0 = time.perf_counter()
    modules: dict[str, LoraModule] = {}
    ops: dict[str, ReplaceTensor] = {}
    report: dict[str, dict] = {}
    full: list[str] = []
    not_extracted: list[dict] = []
    reader = _Reader()
    items = plan.items
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratool-read") as pool:
            pending = pool.submit(reader.pair, items[0]) if items else None
            for i in range(len(items)):
                item, braw, fraw = pending.result()
                # Fetch the next pair while this one is factored: disk and math overlap.
                pending = pool.submit(reader.pair, items[i + 1]) if i + 1 < len(items) else None
                if braw == fraw:  # identical bytes: nothing changed (memcmp, no torch)
                    progress(1, item.name)
                    continue
                if item.role == "full":
                    # Kept whole (PEFT modules_to_save): the fine-tuned tensor as stored, bit for
                    # bit, read again from its file when written (memory holds no copy).
                    value = tensor_from_bytes(item.ft, fraw)
                    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                        raise ValidationError(
                            "holds NaN or Inf", file=item.ft.file, tensor=item.name
                        )
                    del value, braw, fraw
                    ops[item.name] = ReplaceTensor(
                        item.name, HeaderTensor(item.ft), "modules_to_save"
                    )
                    full.append(item.name)
                    progress(1, item.name)
                    continue
                if item.role == "same":
                    why = (
                        "a LoRA cannot express a change here (only 2-D and conv weights)"
                        if item.ft.dtype.startswith(("F", "BF"))
                        else "a non-float tensor differs"
                    )
                    not_extracted.append(
                        {"name": item.name, "shape": list(item.ft.shape), "reason": why}
                    )
                    progress(1, item.name)
                    continue
                wb = tensor_from_bytes(item.base, braw)
                wf = tensor_from_bytes(item.ft, fraw)
                del braw, fraw
                work = torch.float64 if torch.float64 in (wb.dtype, wf.dtype) else torch.float32
                # ΔW in the work dtype on the device; when the fine-tuned tensor already is
                # that dtype on the CPU, its buffer becomes ΔW in place (no extra copy).
                delta = wf.to(plan.device, work)
                del wf
                delta.sub_(wb.to(plan.device))
                del wb
                # ‖ΔW‖² in one pass: the error's denominator, and the NaN/Inf and zero tests.
                total_sq = frobenius_sq(delta)
                if not math.isfinite(total_sq):
                    raise ValidationError(
                        "the difference holds NaN or Inf", file=item.ft.file, tensor=item.name
                    )
                if total_sq == 0.0:  # e.g. -0.0 vs 0.0: equal values, different bytes
                    progress(1, item.name)
                    continue
                kind = item.role
                if kind in ("embedding", "linear_fifo"):
                    mat = delta.T  # PEFT keeps B·A = ΔWᵀ for these
                elif kind == "conv2d":
                    mat = delta.flatten(1)
                else:
                    mat = delta
                f = factor_dense(
                    mat,
                    plan.rule,
                    exact=plan.exact,
                    oversample=plan.oversample,
                    niter=plan.niter,
                    seed=plan.seed,
                    out_dtype=_out_dtype(plan, item.ft),
                    total_sq=total_sq,
                )
                del mat, delta
                B, A = f.B.to("cpu"), f.A.to("cpu")
                k = A.shape[0]
                if kind == "conv2d":
                    A = A.reshape(k, *item.ft.shape[1:])
                    B = B.reshape(item.ft.shape[0], k, 1, 1)
                modules[item.name] = LoraModule(
                    item.name, kind, A.contiguous(), B.contiguous(), float(k)
                )
                report[item.name] = {
                    "kind": kind,
                    "rank": k,
                    "relative_error": f.error,
                    "method": f.method,
                    "q": f.q,
                }
                progress(1, item.name)
    finally:
        reader.close()
    if not modules and not ops:
        raise ValidationError(
            "the two models are identical in every 2-D tensor: nothing to extract",
            file=plan.ft.root,
        )
    meta = AdapterMeta(
        base_model=plan.base_model, source=f"extract {plan.ft.root}", format="loratool"
    )
    adapter = Adapter(modules, meta, {"format": "loratool"}, ops=ops)
    # The PEFT config that describes these modules, with what peft needs to load it on its
    # own (AutoPeftModelForCausalLM reads task_type and base_model_name_or_path).
    config = build_config(adapter)
    config["task_type"] = plan.task_type
    config["base_model_name_or_path"] = plan.base_model
    config["revision"] = plan.revision
    if ops:  # peft matches these against module names' last component, as mergekit writes them
        config["modules_to_save"] = sorted(
            {n.removesuffix(".weight").rsplit(".", 1)[-1] for n in ops}
        )
    adapter.origin["peft_config"] = config
    adapter.origin["extract_not_extracted"] = not_extracted
    return ExtractResult(
        adapter,
        report,
        full,
        not_extracted,
        time.perf_counter() - t0,
        plan.device,
    )
