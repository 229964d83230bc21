"""What a merge records so that it can be unmerged where subtraction is not enough.

- A DoRA merge divides each output row (or column) by ‖W + ΔW‖: the merged weight alone does
  not give those norms back (peft keeps them in memory, so it cannot unmerge DoRA after a
  reload). They are recorded, float32, base64, in the safetensors metadata of the file that
  holds the tensor (``loratool.unmerge``).
- A replaced tensor (modules_to_save, a bias, a saved embedding) loses its original: the
  original's sha256 is recorded, and the original itself comes from ``unmerge --base
  ORIGINAL`` or from the sidecar ``loratool-originals.safetensors`` that ``merge
  --keep-originals`` writes beside the merged shards. Either is checked against the sha256.
- Replaced token rows are few: their original values are recorded outright.

``loratool.unmerge`` maps a tensor name to a list of records, one per merge step that needs
one: ``{"op", "adapter": <the adapter's canonical sha256>, …}``. The header is written before
the tensors are computed, so each record is planned with placeholders of the exact length of
its values (base64 of a known number of bytes, a 64-hex sha256) and the header is rewritten,
the same length, once the file's tensors are done.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

from ..errors import ValidationError
from ..tensors.header import BaseIndex, TensorInfo

RECORDS_KEY = "loratool.unmerge"
ORIGINALS_KEY = "loratool.originals"
SIDECAR = "loratool-originals.safetensors"
SHA_PLACEHOLDER = "0" * 64


def b64_placeholder(nbytes: int) -> str:
    return "A" * (4 * ((nbytes + 2) // 3))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def float32_bytes(t) -> bytes:
    return t.detach().to("cpu").float().contiguous().numpy().astype("<f4").tobytes()


def float32_from(text: str, n: int):
    import torch

    raw = unb64(text)
    if len(raw) != 4 * n:
        raise ValueError(f"{len(raw)} bytes, not {4 * n}")
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()


def read_records(base: BaseIndex) -> dict[str, list[dict]]:
    """Every record in the base's files (a merged model), by tensor."""
    out: dict[str, list[dict]] = {}
    for f, meta in base.file_metadata.items():
        if RECORDS_KEY not in meta:
            continue
        try:
            recs = json.loads(meta[RECORDS_KEY])
            if not isinstance(recs, dict):
                raise ValueError
        except ValueError as exc:
            raise ValidationError(f"{RECORDS_KEY} is not valid JSON", file=f) from exc
        for name, lst in recs.items():
            out.setdefault(name, []).extend(r for r in lst if isinstance(r, dict))
    return out


@dataclass
class UnmergeSources:
    """Where an unmerge finds what subtraction cannot give back."""

    records: dict[str, list[dict]] = field(default_factory=dict)
    original: BaseIndex | None = None  # unmerge --base ORIGINAL
    sidecar: BaseIndex | None = None  # loratool-originals.safetensors beside the merged files

    def latest(self, name: str, sha: str, op: str) -> dict | None:
        for rec in reversed(self.records.get(name, [])):
            if rec.get("adapter") == sha and rec.get("op") == op:
                return rec
        return None

    def original_of(self, name: str, want_sha: str | None) -> TensorInfo | None:
        """The original tensor from --base or the sidecar, if its bytes hash to ``want_sha``
        (any, when nothing was recorded)."""
        for where in (self.original, self.sidecar):
            if where is None or name not in where.tensors:
                continue
            info = where.tensors[name]
            if want_sha is None or sha256_of(info) == want_sha:
                return info
            raise ValidationError(
                "is not the tensor the merge replaced (its sha256 differs from the one recorded)",
                file=info.file,
                tensor=name,
            )
        return None


def sha256_of(info: TensorInfo) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(info.file, "rb") as fh:
        fh.seek(info.start)
        left = info.nbytes
        while left:
            chunk = fh.read(min(left, 16 << 20))
            if not chunk:
                raise ValidationError("truncated", file=info.file, tensor=info.name)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def fill_records(template_json: str, actual: dict[str, list[dict]]) -> str:
    """The planned records with their placeholders replaced by the values computed; the result
    has the same length (asserted by the caller through the header's length)."""
    recs = json.loads(template_json)
    for name, values in actual.items():
        if not values:
            continue
        planned = recs[name][-len(values) :]  # this merge's records come last
        for rec, val in zip(planned, values, strict=True):
            rec.update(val)
    return dump_records(recs)


def dump_records(recs: dict) -> str:
    return json.dumps(recs, sort_keys=True, separators=(",", ":"))
