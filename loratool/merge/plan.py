"""Planning a merge: every adapter resolved against the base, every output tensor's steps,
shapes, dtypes and offsets fixed, the output path and free space checked — before a byte is
written (STYLE.md, "frozen plans"). The engine (``engine.py``) only executes plans.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..adapter import Adapter, AddToTensor, Module, ReplaceRows, ReplaceTensor, TensorOp
from ..bases import (
    INPUT_EMBEDDINGS,
    OUTPUT_EMBEDDINGS,
    PROVENANCE_KEY,
    BaseFacts,
    base_identity,
    base_name,
    merge_history,
    read_facts,
    tied_pair,
)
from ..errors import ValidationError
from ..formats.resolve import resolve
from ..fsutil import check_destination, contained_target
from ..image import ResolvedParts, resolve_parts
from ..quant import QuantizedBase, detect_base, logical_shapes
from ..tensors.header import DTYPE_SIZES, FLOAT_DTYPES, BaseIndex, TensorInfo, read_base
from ..tensors.io import header_bytes
from ..tensors.pipeline import PipelineIndex, component_indexes, extra_candidates, out_name
from ..weights import check_weight
from .ops import (
    AddStep,
    DeltaStep,
    DoraStep,
    ReplaceStep,
    RestoreStep,
    RowsStep,
    Step,
    UndoraStep,
)
from .quant import QuantGroup, anchor, group_outputs, plan_groups
from .records import (
    ORIGINALS_KEY,
    RECORDS_KEY,
    SIDECAR,
    UnmergeSources,
    dump_records,
    float32_from,
    read_records,
)

DTYPE_CHOICES = {"same": None, "float16": "F16", "bfloat16": "BF16", "float32": "F32"}


@dataclass(frozen=True)
class AdapterInput:
    adapter: Adapter
    weight: float
    label: str
    sha256: str


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where its input lies, how it is made, where it goes.

    ``src`` is the base tensor read as input (None when the steps alone make it); ``steps``
    are applied in order to a float32 copy of it, rounded once to ``out_dtype``. No steps and
    the same dtype and shape: the tensor is copied byte for byte.
    """

    name: str
    src: TensorInfo | None
    out_dtype: str
    out_start: int  # offset within the output file's data section
    steps: tuple[Step, ...] = ()
    out_shape: tuple[int, ...] | None = None  # None: the input's shape

    @property
    def shape(self) -> tuple[int, ...]:
        return self.out_shape if self.out_shape is not None else self.src.shape

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def out_nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.out_dtype]

    @property
    def steps_read_input(self) -> bool:
        """Whether the steps start from W (a replace does not)."""
        return self.src is not None and (not self.steps or self.steps[0].reads_input)

    @property
    def keeps_original(self) -> bool:
        """A merge that replaces this tensor records (and may keep) the original."""
        return self.src is not None and any(
            isinstance(s, ReplaceStep) and s.record for s in self.steps
        )

    @property
    def reads_input(self) -> bool:
        return self.steps_read_input or self.keeps_original

    @property
    def in_nbytes(self) -> int:
        return self.src.nbytes if self.reads_input else 0

    @property
    def raw_copy(self) -> bool:
        return (
            not self.steps
            and self.src is not None
            and self.out_dtype == self.src.dtype
            and self.shape == self.src.shape
        )

    @property
    def op(self) -> str:
        ops: list[str] = []
        for s in self.steps:
            if s.op not in ops:
                ops.append(s.op)
        return "+".join(ops) if ops else "cast"

    def audit(self) -> dict:
        d = {"name": self.name, "op": self.op}
        if self.steps:
            d["steps"] = [s.describe() for s in self.steps]
        if self.src is not None and self.out_dtype != self.src.dtype:
            d["dtype"] = [self.src.dtype, self.out_dtype]
        if self.src is not None and self.shape != self.src.shape:
            d["shape"] = [list(self.src.shape), list(self.shape)]
        return d


@dataclass(frozen=True)
class FilePlan:
    name: str  # file name inside the output (or the output file itself for a single file)
    header: bytes  # the complete 8-byte length + JSON header
    tensors: tuple[TensorPlan, ...]
    # quantized logical weights written through their codec (merge/quant.py)
    groups: tuple[QuantGroup, ...] = ()
    # what the header was made from: it is made again, the same length, once the records
    # (records.py) hold their values
    entries: tuple = ()
    metadata: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return (
            len(self.header)
            + sum(t.out_nbytes for t in self.tensors)
            + sum(g.out_nbytes for g in self.groups)
        )

    @property
    def names(self) -> list[str]:
        """Every tensor name the file holds, in the order of the plan."""
        return [t.name for t in self.tensors] + [o.name for g in self.groups for o in g.outputs]


@dataclass(frozen=True)
class MergePlan:
    base: BaseIndex
    out: Path
    single_file: bool
    files: tuple[FilePlan, ...]
    inputs: tuple[AdapterInput, ...]
    device: str
    extra_files: tuple[Path, ...]
    index: dict | None
    warnings: tuple[str, ...] = ()
    # keys of config.json to set in the output (vocab_size, tie_word_embeddings…)
    config_updates: dict = field(default_factory=dict)
    force: bool = False  # replace an existing OUT (never an input: see plan_merge)
    keep_originals: bool = False  # write the replaced tensors' originals to SIDECAR
    sidecar: BaseIndex | None = None  # the base's own sidecar (its originals are carried over)
    # a pipeline's per-component indexes: (path inside OUT, index JSON)
    indexes: tuple[tuple[str, dict], ...] = ()
    # keys of config.json to drop (quantization_config when every weight is dequantized)
    config_drop: tuple[str, ...] = ()
    quant: QuantizedBase | None = None  # the base's quantization scheme, if any

    @property
    def groups(self) -> list[QuantGroup]:
        return [g for f in self.files for g in f.groups]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def tensor_plans(self) -> list[TensorPlan]:
        return [t for f in self.files for t in f.tensors]

    @property
    def touched(self) -> int:
        return sum(1 for t in self.tensor_plans if t.steps) + sum(1 for g in self.groups if g.steps)

    def audit(self) -> list[dict]:
        """One entry per tensor that is not a raw copy: its name and the operation(s)."""
        return [t.audit() for t in self.tensor_plans if not t.raw_copy] + [
            g.audit() for g in self.groups
        ]


# -- the base's identity and history -------------------------------------------------------


def pick_device(device: str) -> str:
    import torch

    if device in ("auto", None):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValidationError(
                f"--device {device}: no CUDA device is available here", hint="use --device cpu"
            )
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise ValidationError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)"
            )
        return f"cuda:{idx}"
    if device != "cpu":
        raise ValidationError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


# -- steps ---------------------------------------------------------------------------------


def module_step(mod: Module, inp: AdapterInput, sources: UnmergeSources | None = None) -> Step:
    """The step that merges (or, at weight −1 with ``sources``, unmerges) one module."""
    if mod.magnitude is not None:
        if inp.weight == 1.0:
            return DoraStep(mod, inp.label, inp.sha256)
        if inp.weight == -1.0:
            rec = sources.latest(mod.name, inp.sha256, "dora") if sources else None
            if rec is None:
                raise _Missing(mod.name, "DoRA: the norms recorded when it was merged")
            try:
                norms = float32_from(rec["norms"], mod.magnitude.numel())
            except (KeyError, ValueError) as exc:
                raise ValidationError(
                    f"the recorded DoRA norms are damaged ({exc})", tensor=mod.name
                ) from None
            return UndoraStep(mod, norms, inp.label)
        raise ValidationError(
            f"a DoRA module merges at weight 1 only (DoRA re-normalises the weight), not {inp.weight}",
            file=inp.label,
            tensor=mod.name,
        )
    return DeltaStep(mod, inp.weight, inp.label)


class _Missing(Exception):
    """An unmerge needs something it does not have (collected, then one line for all)."""

    def __init__(self, tensor: str, what: str):
        self.tensor, self.what = tensor, what


def op_step(op: TensorOp, inp: AdapterInput, sources: UnmergeSources | None = None) -> Step:
    """The step that applies one full-tensor operation at the input's weight (at −1 with
    ``sources``: puts back what it replaced)."""
    if isinstance(op, AddToTensor):
        return AddStep(op, inp.weight, inp.label)
    if inp.weight == -1.0 and sources is not None:
        return _undo_step(op, inp, sources)
    if isinstance(op, ReplaceTensor) and op.why == "embedding" and inp.weight > 0:
        # save_embedding_layers: peft loads the saved layer into the base whatever weight the
        # LoRA factors are then given (usually it is the base's own embedding, unchanged)
        return ReplaceStep(op, inp.label, inp.sha256, True)
    if inp.weight != 1.0:
        what = "unmerging" if inp.weight == -1.0 else f"weight {inp.weight} for"
        raise ValidationError(
            f"{what} a tensor the adapter replaces ({op.why}) needs the original tensor",
            file=inp.label,
            tensor=op.target,
        )
    if isinstance(op, ReplaceTensor):
        return ReplaceStep(op, inp.label, inp.sha256, True)
    if isinstance(op, ReplaceRows):
        return RowsStep(op, inp.label, inp.sha256, True)
    raise ValidationError(
        f"no merge step for operation {op.op!r}", file=inp.label, tensor=op.target
    )


def _undo_step(op: TensorOp, inp: AdapterInput, sources: UnmergeSources) -> Step:
    if isinstance(op, ReplaceRows):
        rec = sources.latest(op.target, inp.sha256, "rows")
        if rec is None:
            raise _Missing(op.target, "the token rows recorded when it was merged")
        values = float32_from(rec["rows"], op.values.numel()).reshape(tuple(op.values.shape))
        return RowsStep(ReplaceRows(op.target, op.indices, values, op.why), inp.label)
    if isinstance(op, ReplaceTensor):
        rec = sources.latest(op.target, inp.sha256, "replace")
        want = rec.get("sha256") if rec else None
        info = sources.original_of(op.target, want)
        if info is not None:
            return RestoreStep(info, inp.label)
        if want is not None and value_sha256(op.value) == want:
            # the adapter saved the base's own tensor (save_embedding_layers): it is the original
            return ReplaceStep(op, inp.label)
        raise _Missing(op.target, f"the original tensor ({op.why})")
    raise ValidationError(f"cannot unmerge a {op.op!r}", file=inp.label, tensor=op.target)


def value_sha256(t) -> str:
    import hashlib

    from ..tensors.header import HeaderTensor

    if isinstance(t, HeaderTensor):
        return hashlib.sha256(t.raw()).hexdigest()
    t = t.detach().cpu().contiguous()
    import torch

    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def adapter_steps(
    adapter: Adapter, inp: AdapterInput, sources: UnmergeSources | None = None
) -> dict[str, list[Step]]:
    """One (resolved) adapter's steps per tensor; see ``parts_steps``."""
    return parts_steps(list(adapter.modules.items()), list(adapter.ops.items()), inp, sources)


def parts_steps(
    modules: list, ops: list, inp: AdapterInput, sources: UnmergeSources | None = None
) -> dict[str, list[Step]]:
    """Steps per base tensor for (tensor, module) and (tensor, operation) pairs of one
    adapter, in the order peft applies them: a tensor it saved in full is loaded first (the
    base layer's weight, e.g. an embedding saved beside its LoRA), then the modules' updates,
    then token rows and bias additions. An unmerge (weight −1 with ``sources``) undoes them
    in the reverse order. What an unmerge lacks is refused in one line naming every tensor."""
    out: dict[str, list[Step]] = {}
    missing: list[_Missing] = []

    def add(name, make):
        try:
            out.setdefault(name, []).append(make())
        except _Missing as m:
            missing.append(m)

    replaces = [(t, o) for t, o in ops if isinstance(o, ReplaceTensor)]
    others = [(t, o) for t, o in ops if not isinstance(o, ReplaceTensor)]
    undo = inp.weight < 0 and sources is not None
    order = (
        [("op", others), ("mod", modules), ("op", replaces)]
        if undo
        else [("op", replaces), ("mod", modules), ("op", others)]
    )
    for what, pairs in order:
        for name, part in pairs:
            if what == "mod":
                add(name, lambda part=part: module_step(part, inp, sources))
            else:
                add(name, lambda part=part: op_step(part, inp, sources))
    if missing:
        names = ", ".join(sorted({m.tensor for m in missing}))
        whats = "; ".join(sorted({m.what for m in missing}))
        raise ValidationError(
            f"cannot unmerge {names} by subtraction and has nothing to restore them from ({whats})",
            file=inp.label,
            hint="pass --base ORIGINAL, or merge with --keep-originals next time",
        )
    return out


_ADDITIVE = ("delta", "slice", "add")


def check_steps(name: str, steps: list[Step]) -> None:
    """Steps on one tensor from different adapters must commute: only additive ones may meet.

    A replace, a DoRA re-normalisation or replaced rows would silently undo or distort what
    another adapter adds, depending on the order of the command line.
    """
    labels = {s.label for s in steps}
    if len(labels) < 2:
        return
    for s in steps:
        if s.op not in _ADDITIVE:
            others = sorted(labels - {s.label})
            raise ValidationError(
                f"{s.label} changes this tensor with {s.op!r}, which does not combine with "
                f"{', '.join(others)} on the same tensor; merge them in separate runs",
                tensor=name,
            )


# -- planning ------------------------------------------------------------------------------


def plan_merge(
    base_path: str | os.PathLike,
    inputs: list[AdapterInput],
    out: str | os.PathLike,
    *,
    dtype: str = "same",
    device: str = "auto",
    force: bool = False,
    strict: bool = False,
    onto_dequantized: str | os.PathLike | None = None,
    original: str | os.PathLike | None = None,
    keep_originals: bool = False,
    only_files: Collection[str] | None = None,
) -> MergePlan:
    """Validate everything a merge needs and freeze it into a plan; writes nothing.

    ``onto_dequantized``: a 4-bit quantization of ``base_path`` (the base a QLoRA adapter was
    trained on); the merge then goes into its dequantized weights, written in the 16-bit base's
    dtype (or ``dtype``), as the QLoRA authors advise.

    An unmerge (negative weights) of what subtraction cannot undo takes the originals from
    ``original`` (the base before the merge) or from the sidecar a ``keep_originals`` merge
    wrote; DoRA norms and replaced token rows come from the merged files' records.

    ``base_path`` may be a BaseIndex already read (a Hub base's headers, to check a merge
    before its weights are downloaded). ``only_files``: the names of the base directory's
    other files to copy (a Hub snapshot's folder may hold files another command downloaded);
    None copies every one.
    """
    out = Path(out)
    # What the merge reads may never be what it writes, checked before the base is read and
    # again once its files are known (a shard may be a link to elsewhere). --force replaces
    # only an earlier output.
    adapter_paths = [i.label for i in inputs if os.path.exists(i.label)]
    given = base_path.root if isinstance(base_path, BaseIndex) else base_path
    check_destination(out, inputs=[given, *adapter_paths], force=force)
    base = base_path if isinstance(base_path, BaseIndex) else read_base(base_path)
    check_destination(
        out, inputs=[base.root, *base.files, base.index_path], force=force, exists_check=False
    )
    if onto_dequantized is not None:
        base, dtype = onto_quantized(base, read_base(onto_dequantized), dtype)
        check_destination(
            out, inputs=[base.root, *base.files, base.index_path], force=force, exists_check=False
        )
    if dtype not in DTYPE_CHOICES:
        raise ValidationError(
            f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}"
        )
    forced = DTYPE_CHOICES[dtype]
    if not inputs:
        raise ValidationError("no adapter to merge")
    # "auto" is settled when the engine imports torch, which it does while the copy runs;
    # an explicit CUDA device is checked now.
    dev = device if device in ("auto", None, "cpu") else pick_device(device)
    dev = dev or "auto"
    warnings: list[str] = []
    ident = base_identity(base)
    history = merge_history(base)
    sources = None
    if any(i.weight < 0 for i in inputs):
        sidecar = base.root / SIDECAR if base.root.is_dir() else None
        sources = UnmergeSources(
            read_records(base),
            read_base(original) if original is not None else None,
            read_base(sidecar) if sidecar is not None and sidecar.is_file() else None,
        )
    if keep_originals and base.root.is_file():
        raise ValidationError(
            "--keep-originals writes a sidecar beside the merged shards: the base must be a directory",
            file=base.root,
        )
    facts = read_facts(base.root)
    tied = tied_embeddings(base, facts)
    virtual = {}
    if tied is not None and tied[0] not in base.tensors:
        virtual[tied[0]] = base.tensors[tied[1]].shape  # the lm_head tied to the embedding
    by_tensor: dict[str, list[Step]] = {}
    # a quantized base is resolved against its logical weights (what the model's parameters
    # hold), not the stored values and scales; a scheme loratool cannot merge stops here
    qb = detect_base(base)
    against = logical_shapes(base, qb) if qb is not None else base
    for inp in inputs:
        # per base tensor: the modules and operations that change it (an image base maps
        # components, original layouts and fused tensors; see loratool/image); a quantized
        # base's logical weights stand in for its stored values and scales
        if qb is not None:
            resolved = resolve(inp.adapter, against, source=inp.label, facts=facts)
            parts = ResolvedParts(list(resolved.modules.items()), list(resolved.ops.items()))
        else:
            parts = resolve_parts(
                inp.adapter, base, source=inp.label, strict=strict, facts=facts, virtual=virtual
            )
        warnings += parts.warnings
        adapter = inp.adapter
        declared = adapter.meta.base_model
        trained_on = four_bit_base(declared)
        if trained_on and (qb is None or not qb.codec.four_bit):
            warnings.append(
                f"{inp.label} was trained on a 4-bit base ({trained_on}): merged into "
                f"{'8-bit' if qb is not None else '16-bit'} weights it carries that base's "
                "quantization error; --onto-dequantized Q4BASE merges into the weights it was trained on"
            )
        if declared:
            short = declared.rstrip("/").rsplit("/", 1)[-1].lower()
            if short not in ident:
                msg = f"{inp.label} was made for {declared!r}, but the base is {base_name(base)!r}"
                if strict:
                    raise ValidationError(msg, hint="drop --strict to merge anyway")
                warnings.append(msg)
        net = sum(h.get("weight", 0) for h in history if h.get("sha256") == inp.sha256)
        if inp.weight < 0 and net <= 0:
            warnings.append(
                f"{inp.label} is not recorded as merged into {base_name(base)}; subtracting it anyway"
            )
        if inp.weight > 0 and net > 0:
            warnings.append(
                f"{inp.label} is already merged into {base_name(base)} (its provenance records it "
                f"at weight {net:g}); merging it again adds it twice"
            )
        check_weight(inp.weight, ((n, m.scale) for n, m in parts.modules), label=inp.label)
        for name, steps in parts_steps(parts.modules, parts.ops, inp, sources).items():
            by_tensor.setdefault(name, []).extend(steps)
    for name, steps in by_tensor.items():
        check_steps(name, steps)
    config_updates: dict = {}
    new_tensors: dict[str, tuple[str, TensorInfo]] = {}  # name → (after tensor, its source)
    untie_records: dict[str, dict] = {}
    if tied is not None:
        lm_name, emb_name = tied
        changed = [n for n in tied if any(s.op != "rows" for s in by_tensor.get(n, ()))]
        if changed:
            msg = (
                f"{', '.join(changed)} changes an embedding tied to {emb_name if changed == [lm_name] else lm_name} "
                "(tie_word_embeddings): the merged model gets an untied lm_head and "
                "tie_word_embeddings false, so that the one change does not silently become two"
            )
            if strict:
                raise ValidationError(msg, hint="--strict refuses to untie; drop it to merge")
            warnings.append(msg)
            config_updates.update(_tie_config(facts, False))
            if lm_name not in base.tensors:
                new_tensors[lm_name] = (emb_name, base.tensors[emb_name])
                labels = {s.label for n in changed for s in by_tensor[n]}
                sha = next(i.sha256 for i in inputs if i.label in labels)
                untie_records[lm_name] = {"op": "untie", "adapter": sha}
    # an unmerge of the adapter that untied them ties them again
    dropped: set[str] = set()
    if sources is not None:
        unmerged = {i.sha256 for i in inputs if i.weight < 0}
        for name, recs in sources.records.items():
            if any(r.get("op") == "untie" and r.get("adapter") in unmerged for r in recs):
                dropped.add(name)
        if dropped:
            config_updates.update(_tie_config(facts, True))
    new_history = history + [
        {"adapter": i.label, "sha256": i.sha256, "weight": i.weight} for i in inputs
    ]
    groups = plan_groups(qb, by_tensor, forced) if qb is not None else {}
    in_group: dict[str, str] = {}  # stored part → its group's logical weight
    anchors: dict[str, str] = {}  # the stored part where a group's outputs are laid out
    for lname in groups:
        lw = qb.weights[lname]
        for part in lw.stored_names:
            in_group[part] = lname
        anchors[anchor(lw, list(base.files)).name] = lname
    files: list[FilePlan] = []
    for f in base.files:
        src_meta = dict(base.file_metadata.get(f, {}))
        src_meta.setdefault("format", "pt")
        src_meta[PROVENANCE_KEY] = json.dumps(new_history, separators=(",", ":"))
        records = _carried_records(src_meta, {i.sha256 for i in inputs if i.weight < 0})
        src_meta["loratool.version"] = __version__
        src_meta.setdefault("loratool.base_model", base_name(base))
        # keyed as the base names them (a pipeline's ``unet.…``), stored as the file names them
        infos = sorted(
            ((k, t) for k, t in base.tensors.items() if t.file == f), key=lambda kt: kt[1].start
        )
        items = [(key, info.name, info) for key, info in infos if key not in dropped]
        items += [(n, n, src) for n, (_, src) in new_tensors.items() if src.file == f]
        entries, plans, fgroups, pos = [], [], [], 0
        for key, stored, info in items:
            if key in in_group:
                lname = anchors.get(key)
                if lname is None:
                    continue  # written by its group, at the group's anchor
                mode, gsteps = groups[lname]
                lw = qb.weights[lname]
                outs = group_outputs(lw, mode, forced, pos, qb.codec)
                for o in outs:
                    entries.append((o.name, o.dtype, o.shape, o.out_start, o.out_start + o.nbytes))
                    pos += o.nbytes
                fgroups.append(QuantGroup(lw, qb.scheme, mode, tuple(gsteps), tuple(outs)))
                continue
            steps = tuple(by_tensor.get(key, ()))
            shape = info.shape
            for s in steps:
                shape = s.out_shape(shape)
            out_dtype = forced if (forced and info.dtype in FLOAT_DTYPES) else info.dtype
            size = DTYPE_SIZES[out_dtype]
            for d in shape:
                size *= d
            entries.append((stored, out_dtype, shape, pos, pos + size))
            planned = [t for t in (s.record_template() for s in steps) if t is not None]
            if key in untie_records:  # no value to fill: before those that have (records.py)
                planned.insert(0, untie_records[key])
            if planned:
                records.setdefault(key, []).extend(planned)
            plans.append(
                TensorPlan(key, info, out_dtype, pos, steps, shape if shape != info.shape else None)
            )
            pos += size
        name = out.name if base.index_path is None and base.root.is_file() else out_name(base, f)
        src_meta.pop(RECORDS_KEY, None)
        if records:
            src_meta[RECORDS_KEY] = dump_records(records)
        if keep_originals:
            src_meta[ORIGINALS_KEY] = SIDECAR
        files.append(
            FilePlan(
                name,
                header_bytes(entries, src_meta),
                tuple(plans),
                tuple(fgroups),
                entries=tuple(entries),
                metadata=src_meta,
            )
        )
    config_updates.update(_vocab_update(files, facts, tied))
    index = None
    if base.index_path is not None:
        index = {
            "metadata": {
                **base.index_metadata,
                "total_size": sum(f.size - len(f.header) for f in files),
            },
            "weight_map": {n: f.name for f in files for n in f.names},
        }
    indexes: tuple = ()
    if isinstance(base, PipelineIndex):
        sizes = {f: fp.size - len(fp.header) for f, fp in zip(base.files, files, strict=True)}
        where = {t.name: f for f, fp in zip(base.files, files, strict=True) for t in fp.tensors}
        indexes = tuple(component_indexes(base, sizes, where))
    extra: list[Path] = []
    single = base.root.is_file()
    if not single:
        skip = {f.resolve() for f in base.files}
        if base.index_path is not None:
            skip.add(base.index_path.resolve())
        found = (
            extra_candidates(base)
            if isinstance(base, PipelineIndex)
            else sorted(base.root.iterdir())
        )
        for p in found:
            if only_files is not None and p.relative_to(base.root).as_posix() not in only_files:
                continue
            if p.name.startswith(".") or not p.is_file() or p.resolve() in skip:
                continue
            if keep_originals and p.name == SIDECAR:
                continue  # written anew, with the originals it holds carried over
            if contained_target(p, base_file_roots(base)) is None:
                # tokenizer.json → ~/.ssh/id_rsa would put the secret in the output
                msg = f"{p} is a link to outside the base directory; not copied"
                if strict:
                    raise ValidationError(msg, hint="drop --strict to skip it")
                warnings.append(msg)
                continue
            extra.append(p)
    config_drop: tuple[str, ...] = ()
    if qb is not None and forced:
        # every quantized weight is written dequantized: an ordinary model in that dtype
        config_drop = ("quantization_config",)
    if not single:
        config_updates = dtype_config_updates(base, dtype, config_updates)
    if config_updates and not any(p.name == "config.json" for p in extra):
        warnings.append(
            f"the merged model needs config.json changes ({', '.join(sorted(config_updates))}) "
            "but the base has no config.json beside it"
        )
    plan = MergePlan(
        base,
        out,
        single,
        tuple(files),
        tuple(inputs),
        dev,
        tuple(extra),
        index,
        tuple(warnings),
        config_updates,
        force=force,
        keep_originals=keep_originals,
        sidecar=sources.sidecar if sources is not None else _old_sidecar(base),
        indexes=indexes,
        config_drop=config_drop,
        quant=qb,
    )
    _check_space(plan)
    return plan


# --dtype → the name transformers gives that dtype in config.json
_CONFIG_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def dtype_config_updates(base: BaseIndex, dtype: str, updates: dict | None = None) -> dict:
    """config.json keys to rewrite when --dtype changes the weights' dtype, so that
    ``from_pretrained(dtype="auto")`` loads what was written: ``dtype`` (transformers ≥ 4.56
    reads it first) and ``torch_dtype`` (older releases), at the top and in every sub-config
    that states one (a VLM's text_config, vision_config). ``updates``: changes already
    planned (tie_word_embeddings…), kept; a sub-config both change gets both."""
    updates = dict(updates or {})
    name = _CONFIG_DTYPES.get(dtype)
    if name is None:
        return updates
    try:
        config = json.loads((base.root / "config.json").read_text())
    except (OSError, ValueError):
        return updates
    if not isinstance(config, dict):
        return updates
    updates.update({"dtype": name, "torch_dtype": name})
    for key, sub in config.items():
        if isinstance(sub, dict) and ("dtype" in sub or "torch_dtype" in sub):
            planned = updates.get(key)
            updates[key] = {
                **(planned if isinstance(planned, dict) else sub),
                **{k: name for k in ("dtype", "torch_dtype") if k in sub},
            }
    return updates


def base_file_roots(base: BaseIndex) -> list[Path]:
    """Where a base directory's files may really lie: the directory, and for a snapshot in
    the Hugging Face cache (whose files are links to ``../../blobs/<hash>``) that repo's blobs."""
    root = base.root
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        roots.append(root.parent.parent / "blobs")
    return roots


def _carried_records(meta: dict, unmerged: set[str]) -> dict:
    """The records of earlier merges, less those of the adapters this run takes out."""
    try:
        old = json.loads(meta.get(RECORDS_KEY, "{}"))
    except ValueError:
        old = {}
    out = {}
    for name, lst in old.items() if isinstance(old, dict) else ():
        keep = [r for r in lst if isinstance(r, dict) and r.get("adapter") not in unmerged]
        if keep:
            out[name] = keep
    return out


def _old_sidecar(base: BaseIndex) -> BaseIndex | None:
    p = base.root / SIDECAR if base.root.is_dir() else None
    return read_base(p) if p is not None and p.is_file() else None


def tied_embeddings(base: BaseIndex, facts: BaseFacts) -> tuple[str, str] | None:
    """(lm_head, input embedding) when the model ties them: the config says so, or says
    nothing (transformers 4 defaulted to tying) and the checkpoint holds no lm_head."""
    shapes = {n: t.shape for n, t in base.tensors.items()}
    pair = tied_pair(base.tensors, shapes)
    tie = facts.tie_word_embeddings
    if pair is not None:
        return pair if tie is not False else None
    if tie:  # both stored, but transformers ties them at load: the stored lm_head is ignored
        for out in OUTPUT_EMBEDDINGS:
            if out in shapes:
                inputs = [
                    k for k in shapes if k.endswith(INPUT_EMBEDDINGS) and shapes[k] == shapes[out]
                ]
                if len(inputs) == 1:
                    return out, inputs[0]
    return None


def _tie_config(facts: BaseFacts, tie: bool) -> dict:
    cfg = facts.config
    text = cfg.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in text:
        return {"tie_word_embeddings": tie, "text_config": {**text, "tie_word_embeddings": tie}}
    return {"tie_word_embeddings": tie}


def _vocab_update(files, facts: BaseFacts, tied) -> dict:
    """A replaced input embedding of another length (new tokens) gives config.json its new
    vocab_size (in text_config where the config keeps it there)."""
    for fp in files:
        for tp in fp.tensors:
            if tp.out_shape is None or tp.src is None or tp.name != (tied[1] if tied else tp.name):
                continue
            if not tp.name.endswith(INPUT_EMBEDDINGS):
                continue
            n = tp.out_shape[0]
            cfg = facts.config
            text = cfg.get("text_config")
            if "vocab_size" not in cfg and isinstance(text, dict) and "vocab_size" in text:
                return {"text_config": {**text, "vocab_size": n}}
            return {"vocab_size": n}
    return {}


_FOUR_BIT_NAME = re.compile(r"(bnb|4bit|4-bit|nf4|fp4|int4|w4a16|gptq|awq|qlora|mxfp4)", re.I)


def four_bit_base(declared: str | None) -> str | None:
    """The adapter's declared base, when it names a 4-bit model (a QLoRA adapter): a local
    path whose config says so, or a name that does (``…-bnb-4bit``, ``…-GPTQ``)."""
    if not declared:
        return None
    path = Path(declared)
    if (path / "config.json").is_file():
        try:
            qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
        except (OSError, ValueError, AttributeError):
            qc = {}
        if qc.get("load_in_4bit") or qc.get("bits") == 4 or qc.get("quant_method") == "mxfp4":
            return declared
    return declared if _FOUR_BIT_NAME.search(declared) else None


def onto_quantized(base16: BaseIndex, qbase: BaseIndex, dtype: str) -> tuple[BaseIndex, str]:
    """--onto-dequantized: check that ``qbase`` is a 4-bit quantization of ``base16`` (the same
    parameters, names and shapes) and pick the dtype its weights are written in."""
    qb = detect_base(qbase)
    if qb is None or not qb.codec.four_bit:
        raise ValidationError(
            "--onto-dequantized needs a 4-bit quantized base (bitsandbytes NF4/FP4, MXFP4)",
            file=qbase.root,
        )
    logical = logical_shapes(qbase, qb)
    for name, t in logical.items():
        have = base16.tensors.get(name)
        if have is None or tuple(have.shape) != tuple(t.shape):
            raise ValidationError(
                f"is not a quantization of {base16.root}: "
                + ("no such tensor there" if have is None else f"shape {list(have.shape)} there"),
                file=qbase.root,
                tensor=name,
            )
    extra = sorted(set(base16.tensors) - set(logical))
    if extra:
        raise ValidationError(
            f"is not a quantization of {base16.root}, which also holds this tensor",
            file=qbase.root,
            tensor=extra[0],
        )
    if dtype == "same":
        w = next(iter(qb.weights))
        tag = base16.tensors[w].dtype
        dtype = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(tag, "bfloat16")
    return qbase, dtype


def _check_space(plan: MergePlan) -> None:
    """Refuse up front a merge that cannot fit on OUT's filesystem, rather than fail near the end."""
    need = plan.total_bytes + sum(p.stat().st_size for p in plan.extra_files)
    parent = plan.out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    st = os.statvfs(parent)
    free = st.f_bavail * st.f_frsize
    if need > free:
        from ..units import human_size

        raise ValidationError(
            f"needs {human_size(need)} but only {human_size(free)} is free there",
            file=plan.out,
            hint="free some space or write OUT elsewhere",
        )
