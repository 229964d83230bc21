"""Storage arithmetic from a Hugging Face ``config.json`` alone: no weights, no torch.

``loratool savings --config CONFIG.json --rank R --targets a,b`` answers "how big would a LoRA
of rank R on these modules be, and how big is the model it adapts?" before anything is
downloaded. The answer needs every weight matrix of the model with its shape, named the way
the transformers implementation names its modules (so that PEFT's ``target_modules`` match the
same names here as on the real model), and every other parameter (norms, biases, position
embeddings) for the base's size.

This module mirrors transformers 5.x's modelling code for a handful of families, including
the defaults of their config classes: ``save_pretrained`` writes only the values that differ
from those defaults, so a key missing from a config.json means "the class default", not
"absent". Stdlib only; it must stay importable in the fast commands, which never load torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ValidationError

__all__ = [
    "ALL_LINEAR",
    "DTYPE_BYTES",
    "SUPPORTED_MODEL_TYPES",
    "ModuleShape",
    "base_param_count",
    "config_module_shapes",
    "config_parameters",
    "hypothetical_adapter",
    "match_targets",
]

ModuleKind = Literal["linear", "conv1d", "embedding"]

#: Bytes per element of the storage dtypes an adapter or a base may be kept in.
DTYPE_BYTES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8": 1,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    # the short spellings people type
    "fp32": 4,
    "fp16": 2,
    "bf16": 2,
    "fp8": 1,
}

#: PEFT's shorthand for "every Linear / Conv1D but the output layer".
ALL_LINEAR = "all-linear"

_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
_ENCODERS = ("bert", "roberta", "deberta-v2")

#: The ``model_type`` values this module knows the layout of.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = (*_LLAMA_LIKE, "gpt2", "gpt_neox", *_ENCODERS)

# transformers 5.24's config-class defaults for the keys that shape parameters. A key
# missing from config.json takes these values (None: derived, as the config class derives it).
# fmt: off
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None,
                  tie_word_embeddings=False, attention_bias=False, mlp_bias=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None, tie_word_embeddings=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=None, tie_word_embeddings=False),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128, tie_word_embeddings=False,
                  attention_bias=False),
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256, tie_word_embeddings=True,
                  attention_bias=False),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, tie_word_embeddings=True,
                   attention_bias=False),
    "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, head_dim=None, tie_word_embeddings=False),
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 tie_word_embeddings=True, add_cross_attention=False),
    "gpt_neox": dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                     intermediate_size=24576, tie_word_embeddings=False, attention_bias=True),
    "bert": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
                 tie_word_embeddings=True, add_cross_attention=False),
    "roberta": dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
                    tie_word_embeddings=True, add_cross_attention=False),
    "deberta-v2": dict(vocab_size=128100, hidden_size=1536, num_hidden_layers=24, num_attention_heads=24,
                       intermediate_size=6144, max_position_embeddings=512, type_vocab_size=0,
                       relative_attention=False, max_relative_positions=-1, position_buckets=-1,
                       position_biased_input=True, pos_att_type=None, share_att_key=False,
                       norm_rel_ebd="none", conv_kernel_size=0, conv_groups=1, legacy=True,
                       tie_word_embeddings=True, embedding_size=None, attention_head_size=None,
                       pooler_hidden_size=None),
}
# fmt: on

# GPT2Config's attribute_map: a config.json may spell its sizes either way.
_GPT2_ALIASES = {
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_positions": "max_position_embeddings",
}
_GPT2_ALIASES.update({v: k for k, v in list(_GPT2_ALIASES.items())})

# Where the backbone lives inside the task models, as their state dicts name it.
_BACKBONE_PREFIX = {
    **{t: "model." for t in _LLAMA_LIKE},
    "gpt2": "transformer.",
    "gpt_neox": "gpt_neox.",
    "bert": "bert.",
    "roberta": "roberta.",
    "deberta-v2": "deberta.",
}


@dataclass(frozen=True)
class ModuleShape:
    """One weight matrix a LoRA could adapt.

    ``name`` is the module path as the model's state dict names it, without ``.weight``
    (``model.layers.0.self_attn.q_proj``). ``in_features`` / ``out_features`` are the sides
    LoRA's A (r × in) and B (out × r) attach to:

    - ``linear``: ``nn.Linear``, weight stored out × in;
    - ``conv1d``: GPT-2's ``Conv1D``, a linear layer whose weight is stored transposed, in × out
      (PEFT's ``fan_in_fan_out``);
    - ``embedding``: ``nn.Embedding``; ``in_features`` is num_embeddings and ``out_features``
      the embedding dim, matching PEFT's lora_embedding_A (r × num_embeddings) and
      lora_embedding_B (dim × r); the weight is stored num_embeddings × dim.

    ``tied_to`` names the module whose weight this one shares (a tied ``lm_head`` shares the
    input embedding's); a tied module is still a module LoRA can target, but its weight is not
    a separate parameter of the base.
    """

    name: str
    out_features: int
    in_features: int
    kind: ModuleKind
    tied_to: str | None = None

    @property
    def leaf(self) -> str:
        """The last component of the name (``q_proj``), what target lists usually say."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The weight's shape as stored in the state dict."""
        if self.kind == "linear":
            return (self.out_features, self.in_features)
        return (self.in_features, self.out_features)  # Conv1D and Embedding store in × out

    @property
    def dense_params(self) -> int:
        """Elements of the full ΔW a LoRA on this module stands for."""
        return self.in_features * self.out_features

    def lora_params(self, rank: int) -> int:
        """Elements of A and B at rank ``rank``: r·(in + out)."""
        return rank * (self.in_features + self.out_features)


@dataclass
class _Model:
    """Everything one config describes: its modules, its parameters, its output layer."""

    modules: list[ModuleShape] = field(default_factory=list)
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tied weights left out
    output_module: str | None = None  # what get_output_embeddings() returns, for all-linear

    def linear(
        self, name: str, in_f: int, out_f: int, *, bias: bool = True, tied_to: str | None = None
    ) -> None:
        self.modules.append(ModuleShape(name, out_f, in_f, "linear", tied_to))
        if tied_to is None:
            self.params[f"{name}.weight"] = (out_f, in_f)
        if bias:
            self.params[f"{name}.bias"] = (out_f,)

    def conv1d(self, name: str, in_f: int, out_f: int) -> None:
        self.modules.append(ModuleShape(name, out_f, in_f, "conv1d"))
        self.params[f"{name}.weight"] = (in_f, out_f)
        self.params[f"{name}.bias"] = (out_f,)

    def embedding(self, name: str, num: int, dim: int) -> None:
        self.modules.append(ModuleShape(name, dim, num, "embedding"))
        self.params[f"{name}.weight"] = (num, dim)

    def norm(self, name: str, dim: int, *, bias: bool = True) -> None:
        self.params[f"{name}.weight"] = (dim,)
        if bias:
            self.params[f"{name}.bias"] = (dim,)

    def param(self, name: str, shape: tuple[int, ...]) -> None:
        self.params[name] = shape


#: The most layers a config may describe (the deepest released models have a few hundred);
#: each is enumerated, so a config saying 1e12 would take memory without bound.
MAX_LAYERS = 10_000
_LAYER_KEYS = ("num_hidden_layers", "n_layer")


class _Config:
    """Typed reads from a config dict with the family's defaults; errors name the key."""

    def __init__(self, config: Mapping[str, Any], model_type: str, source: str | None) -> None:
        self.raw = config
        self.defaults = _DEFAULTS[model_type]
        self.aliases = _GPT2_ALIASES if model_type == "gpt2" else {}
        self.source = source

    def get(self, key: str) -> Any:
        """The config's value for ``key`` (or its GPT-2 alias), else the class default."""
        if key in self.raw:
            return self.raw[key]
        alias = self.aliases.get(key)
        if alias is not None and alias in self.raw:
            return self.raw[alias]
        return self.defaults.get(key)

    def int(self, key: str, *, default: int | None = None, minimum: int | None = 1) -> int:
        """An integer value; None (absent, or null in the file) takes ``default``. A layer
        count is at most :data:`MAX_LAYERS`: every layer is described, one by one."""
        value = self.get(key)
        if value is None:
            value = default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(
                f"config key {key!r} must be an integer, got {value!r}", file=self.source
            )
        if minimum is not None and value < minimum:
            raise ValidationError(
                f"config key {key!r} must be at least {minimum}, got {value}", file=self.source
            )
        if key in _LAYER_KEYS and value > MAX_LAYERS:
            raise ValidationError(
                f"config key {key!r} is {value}: more layers than any model has (at most "
                f"{MAX_LAYERS} are described)",
                file=self.source,
            )
        return value

    def flag(self, key: str) -> bool:
        return bool(self.get(key))

    def num_labels(self) -> int:
        """transformers' rule: len(id2label) when the config has one, else num_labels, else 2."""
        id2label = self.raw.get("id2label")
        if isinstance(id2label, Mapping) and id2label:
            return len(id2label)
        n = self.raw.get("num_labels")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 2


def _head_of(config: Mapping[str, Any], model_type: str) -> str:
    """Which task model the config's ``architectures`` names: base, causal_lm, masked_lm, seq_cls.

    The head decides the prefix of every name and the extra modules on top. Without an
    architecture, decoders are taken as their CausalLM model and encoders as the bare model
    (what ``AutoModel`` builds); an architecture not modelled here is taken the same way.
    """
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    encoder = model_type in _ENCODERS
    if arch.endswith("ForSequenceClassification"):
        return "seq_cls"
    if arch.endswith("ForMaskedLM") and encoder:
        return "masked_lm"
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        # BertLMHeadModel and RobertaForCausalLM carry the same head as their MaskedLM models
        return "masked_lm" if encoder else "causal_lm"
    if arch.endswith("Model") and not arch.endswith(("LMHeadModel", "PreTrainedModel")):
        return "base"
    return "base" if encoder else "causal_lm"


def _build(config: Mapping[str, Any], source: str | None) -> _Model:
    if not isinstance(config, Mapping):
        raise ValidationError("a config must be a JSON object", file=source)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        what = (
            "no model_type" if model_type is None else f"model_type {model_type!r} is not supported"
        )
        raise ValidationError(f"{what}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}", file=source)
    cfg = _Config(config, model_type, source)
    head = _head_of(config, model_type)
    prefix = "" if head == "base" else _BACKBONE_PREFIX[model_type]
    m = _Model()
    if model_type in _LLAMA_LIKE:
        _llama_like(m, cfg, model_type, prefix, head)
    elif model_type == "gpt2":
        _gpt2(m, cfg, prefix, head)
    elif model_type == "gpt_neox":
        _gpt_neox(m, cfg, prefix, head)
    elif model_type == "deberta-v2":
        _deberta_v2(m, cfg, prefix, head)
    else:
        _bert_like(m, cfg, model_type, prefix, head)
    return m


def _decoder_head(m: _Model, cfg: _Config, head: str, hidden: int, vocab: int, embed: str) -> None:
    if head == "causal_lm":
        m.linear(
            "lm_head",
            hidden,
            vocab,
            bias=False,
            tied_to=embed if cfg.flag("tie_word_embeddings") else None,
        )
        m.output_module = "lm_head"
    elif head == "seq_cls":
        m.linear("score", hidden, cfg.num_labels(), bias=False)


def _llama_like(m: _Model, cfg: _Config, model_type: str, p: str, head: str) -> None:
    """llama, mistral, qwen2, qwen3, gemma, gemma2, phi3: pre-norm blocks with gated MLPs."""
    hidden, vocab = cfg.int("hidden_size"), cfg.int("vocab_size")
    layers, inter = cfg.int("num_hidden_layers", minimum=0), cfg.int("intermediate_size")
    heads = cfg.int("num_attention_heads")
    kv_heads = cfg.int("num_key_value_heads", default=heads)  # None: no grouped-query attention
    head_dim = cfg.int("head_dim", default=hidden // heads)  # gemma's 256 is not hidden/heads
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    # qwen2 always has q/k/v biases and no o bias; llama-family models follow attention_bias
    qkv_bias = True if model_type == "qwen2" else cfg.flag("attention_bias")
    o_bias = False if model_type == "qwen2" else cfg.flag("attention_bias")
    mlp_bias = cfg.flag("mlp_bias")
    embed = f"{p}embed_tokens"
    m.embedding(embed, vocab, hidden)
    for i in range(layers):
        lp = f"{p}layers.{i}"
        if model_type == "phi3":  # fused: q, k and v in one projection
            m.linear(f"{lp}.self_attn.qkv_proj", hidden, q_out + 2 * kv_out, bias=False)
        else:
            m.linear(f"{lp}.self_attn.q_proj", hidden, q_out, bias=qkv_bias)
            m.linear(f"{lp}.self_attn.k_proj", hidden, kv_out, bias=qkv_bias)
            m.linear(f"{lp}.self_attn.v_proj", hidden, kv_out, bias=qkv_bias)
        m.linear(f"{lp}.self_attn.o_proj", q_out, hidden, bias=o_bias)
        if model_type == "qwen3":  # RMSNorm over each head's dim
            m.norm(f"{lp}.self_attn.q_norm", head_dim, bias=False)
            m.norm(f"{lp}.self_attn.k_norm", head_dim, bias=False)
        if model_type == "phi3":  # fused gate and up
            m.linear(f"{lp}.mlp.gate_up_proj", hidden, 2 * inter, bias=False)
        else:
            m.linear(f"{lp}.mlp.gate_proj", hidden, inter, bias=mlp_bias)
            m.linear(f"{lp}.mlp.up_proj", hidden, inter, bias=mlp_bias)
        m.linear(f"{lp}.mlp.down_proj", inter, hidden, bias=mlp_bias)
        m.norm(f"{lp}.input_layernorm", hidden, bias=False)
        m.norm(f"{lp}.post_attention_layernorm", hidden, bias=False)
        if model_type == "gemma2":  # sandwich norms around the MLP too
            m.norm(f"{lp}.pre_feedforward_layernorm", hidden, bias=False)
            m.norm(f"{lp}.post_feedforward_layernorm", hidden, bias=False)
    m.norm(f"{p}norm", hidden, bias=False)
    _decoder_head(m, cfg, head, hidden, vocab, embed)


def _gpt2(m: _Model, cfg: _Config, p: str, head: str) -> None:
    """GPT-2: Conv1D layers (weights stored in × out), fused c_attn d → 3d, learned positions."""
    d, vocab = cfg.int("n_embd"), cfg.int("vocab_size")
    layers, positions = cfg.int("n_layer", minimum=0), cfg.int("n_positions")
    inner = cfg.int("n_inner", default=4 * d)
    m.embedding(f"{p}wte", vocab, d)
    m.embedding(f"{p}wpe", positions, d)
    for i in range(layers):
        lp = f"{p}h.{i}"
        m.norm(f"{lp}.ln_1", d)
        m.conv1d(f"{lp}.attn.c_attn", d, 3 * d)
        m.conv1d(f"{lp}.attn.c_proj", d, d)
        m.norm(f"{lp}.ln_2", d)
        if cfg.flag("add_cross_attention"):  # k and v fused from the encoder, q separate
            m.conv1d(f"{lp}.crossattention.c_attn", d, 2 * d)
            m.conv1d(f"{lp}.crossattention.q_attn", d, d)
            m.conv1d(f"{lp}.crossattention.c_proj", d, d)
            m.norm(f"{lp}.ln_cross_attn", d)
        m.conv1d(f"{lp}.mlp.c_fc", d, inner)
        m.conv1d(f"{lp}.mlp.c_proj", inner, d)
    m.norm(f"{p}ln_f", d)
    _decoder_head(m, cfg, head, d, vocab, f"{p}wte")


def _gpt_neox(m: _Model, cfg: _Config, p: str, head: str) -> None:
    """GPT-NeoX / Pythia: fused query_key_value d → 3d, LayerNorms with biases.

    transformers 5 names the output layer ``lm_head``; checkpoints written by earlier versions
    call it ``embed_out`` (renamed on load).
    """
    d, vocab = cfg.int("hidden_size"), cfg.int("vocab_size")
    layers, inter = cfg.int("num_hidden_layers", minimum=0), cfg.int("intermediate_size")
    bias = cfg.flag("attention_bias")
    m.embedding(f"{p}embed_in", vocab, d)
    for i in range(layers):
        lp = f"{p}layers.{i}"
        m.norm(f"{lp}.input_layernorm", d)
        m.norm(f"{lp}.post_attention_layernorm", d)
        m.linear(f"{lp}.attention.query_key_value", d, 3 * d, bias=bias)
        m.linear(f"{lp}.attention.dense", d, d, bias=bias)
        m.linear(f"{lp}.mlp.dense_h_to_4h", d, inter)
        m.linear(f"{lp}.mlp.dense_4h_to_h", inter, d)
    m.norm(f"{p}final_layer_norm", d)
    _decoder_head(m, cfg, head, d, vocab, f"{p}embed_in")


def _bert_attention(
    m: _Model, name: str, d: int, all_head: int, q: str = "query", k: str = "key", v: str = "value"
) -> None:
    m.linear(f"{name}.self.{q}", d, all_head)
    m.linear(f"{name}.self.{k}", d, all_head)
    m.linear(f"{name}.self.{v}", d, all_head)
    m.linear(f"{name}.output.dense", d, d)
    m.norm(f"{name}.output.LayerNorm", d)


def _bert_like(m: _Model, cfg: _Config, model_type: str, p: str, head: str) -> None:
    """BERT and RoBERTa: post-norm encoder, learned positions and token types, optional pooler."""
    d, vocab = cfg.int("hidden_size"), cfg.int("vocab_size")
    layers, inter = cfg.int("num_hidden_layers", minimum=0), cfg.int("intermediate_size")
    heads = cfg.int("num_attention_heads")
    all_head = heads * (d // heads)
    e = f"{p}embeddings"
    m.embedding(f"{e}.word_embeddings", vocab, d)
    m.embedding(f"{e}.position_embeddings", cfg.int("max_position_embeddings"), d)
    m.embedding(f"{e}.token_type_embeddings", cfg.int("type_vocab_size"), d)
    m.norm(f"{e}.LayerNorm", d)
    for i in range(layers):
        lp = f"{p}encoder.layer.{i}"
        _bert_attention(m, f"{lp}.attention", d, all_head)
        if cfg.flag("add_cross_attention"):
            _bert_attention(m, f"{lp}.crossattention", d, all_head)
        m.linear(f"{lp}.intermediate.dense", d, inter)
        m.linear(f"{lp}.output.dense", inter, d)
        m.norm(f"{lp}.output.LayerNorm", d)
    tied = f"{e}.word_embeddings" if cfg.flag("tie_word_embeddings") else None
    # BERT keeps its pooler in the bare model and for classification; RoBERTa's classifier
    # has its own dense layer instead
    if head == "base" or (head == "seq_cls" and model_type == "bert"):
        m.linear(f"{p}pooler.dense", d, d)
    if head == "masked_lm":
        mlm = "cls.predictions" if model_type == "bert" else "lm_head"
        dense, ln = (
            (f"{mlm}.transform.dense", f"{mlm}.transform.LayerNorm")
            if model_type == "bert"
            else (f"{mlm}.dense", f"{mlm}.layer_norm")
        )
        m.linear(dense, d, d)
        m.norm(ln, d)
        # decoder.weight is the word embedding and decoder.bias the head's bias, when tied
        m.linear(f"{mlm}.decoder", d, vocab, bias=tied is None, tied_to=tied)
        m.param(f"{mlm}.bias", (vocab,))
        m.output_module = f"{mlm}.decoder"
    elif head == "seq_cls":
        if model_type == "bert":
            m.linear("classifier", d, cfg.num_labels())
        else:
            m.linear("classifier.dense", d, d)
            m.linear("classifier.out_proj", d, cfg.num_labels())


def _deberta_v2(m: _Model, cfg: _Config, p: str, head: str) -> None:
    """DeBERTa-v2/v3: disentangled attention (query_proj/key_proj/value_proj), relative positions."""
    d, vocab = cfg.int("hidden_size"), cfg.int("vocab_size")
    layers, inter = cfg.int("num_hidden_layers", minimum=0), cfg.int("intermediate_size")
    heads = cfg.int("num_attention_heads")
    all_head = heads * cfg.int("attention_head_size", default=d // heads)
    emb = cfg.int("embedding_size", default=d)
    e = f"{p}embeddings"
    m.embedding(f"{e}.word_embeddings", vocab, emb)
    if cfg.flag("position_biased_input"):
        m.embedding(f"{e}.position_embeddings", cfg.int("max_position_embeddings"), emb)
    if cfg.int("type_vocab_size", minimum=0) > 0:
        m.embedding(f"{e}.token_type_embeddings", cfg.int("type_vocab_size"), emb)
    if emb != d:
        m.linear(f"{e}.embed_proj", emb, d, bias=False)
    m.norm(f"{e}.LayerNorm", d)
    relative = cfg.flag("relative_attention")
    pos_att = cfg.get("pos_att_type") or []
    if isinstance(pos_att, str):
        pos_att = [x.strip() for x in pos_att.lower().split("|")]
    separate_pos = relative and not cfg.flag("share_att_key")
    for i in range(layers):
        lp = f"{p}encoder.layer.{i}"
        _bert_attention(m, f"{lp}.attention", d, all_head, "query_proj", "key_proj", "value_proj")
        if separate_pos and "c2p" in pos_att:
            m.linear(f"{lp}.attention.self.pos_key_proj", d, all_head)
        if separate_pos and "p2c" in pos_att:
            m.linear(f"{lp}.attention.self.pos_query_proj", d, all_head)
        m.linear(f"{lp}.intermediate.dense", d, inter)
        m.linear(f"{lp}.output.dense", inter, d)
        m.norm(f"{lp}.output.LayerNorm", d)
    if relative:
        max_rel = cfg.int("max_relative_positions", minimum=None)
        if max_rel < 1:
            max_rel = cfg.int("max_position_embeddings")
        buckets = cfg.int("position_buckets", minimum=None)
        m.embedding(f"{p}encoder.rel_embeddings", 2 * (buckets if buckets > 0 else max_rel), d)
    norm_rel = [x.strip() for x in str(cfg.get("norm_rel_ebd") or "none").lower().split("|")]
    if "layer_norm" in norm_rel:
        m.norm(f"{p}encoder.LayerNorm", d)
    if cfg.int("conv_kernel_size", minimum=0) > 0:
        # an nn.Conv1d (hidden → hidden over 3 positions in DeBERTa-v2-xlarge/xxlarge): a base
        # parameter, not listed as a LoRA target (its ΔW is not a d×k matrix)
        kernel, groups = cfg.int("conv_kernel_size"), cfg.int("conv_groups")
        m.param(f"{p}encoder.conv.conv.weight", (d, d // groups, kernel))
        m.param(f"{p}encoder.conv.conv.bias", (d,))
        m.norm(f"{p}encoder.conv.LayerNorm", d)
    if head == "masked_lm":
        if cfg.get("legacy") is None or cfg.flag("legacy"):
            tied = f"{e}.word_embeddings" if cfg.flag("tie_word_embeddings") else None
            m.linear("cls.predictions.transform.dense", d, emb)
            m.norm("cls.predictions.transform.LayerNorm", emb)
            m.linear("cls.predictions.decoder", emb, vocab, bias=tied is None, tied_to=tied)
            m.param("cls.predictions.bias", (vocab,))
            m.output_module = "cls.predictions.decoder"
        else:  # the logits are a matmul with the word embeddings, no decoder module
            m.linear("lm_predictions.lm_head.dense", d, d)
            m.norm("lm_predictions.lm_head.LayerNorm", d)
            m.param("lm_predictions.lm_head.bias", (vocab,))
            # what DebertaV2ForMaskedLM.get_output_embeddings() returns, so all-linear skips it
            m.output_module = "lm_predictions.lm_head.dense"
    elif head == "seq_cls":
        pooled = cfg.int("pooler_hidden_size", default=d)
        m.linear("pooler.dense", pooled, pooled)
        m.linear("classifier", d, cfg.num_labels())


def config_module_shapes(
    config: Mapping[str, Any], *, source: str | None = None
) -> list[ModuleShape]:
    """Every weight matrix a LoRA could target in the model ``config`` describes, in model order.

    Names are the transformers implementation's module paths for the task model the config's
    ``architectures`` names (``LlamaForCausalLM`` → ``model.layers.0.self_attn.q_proj``,
    ``lm_head``; ``RobertaForMaskedLM`` → ``roberta.encoder.layer.0.attention.self.query``).
    Modelled: the bare model, CausalLM, MaskedLM and SequenceClassification; with no
    architecture, or another one, decoders are their CausalLM model and encoders the bare one. Handles
    grouped-query attention (k/v project to num_key_value_heads × head_dim), an explicit
    head_dim (gemma's 256), fused projections (GPT-2's Conv1D c_attn d → 3d, gpt_neox's
    query_key_value d → 3d, phi3's qkv_proj and gate_up_proj), the MLP sizes (intermediate_size,
    GPT-2's n_inner defaulting to 4·n_embd), embeddings and the output layer. A tied
    ``lm_head`` is listed with ``tied_to`` set: LoRA can target it, but it is not a separate
    weight of the base.

    ``source`` (the config's path) is named in errors. An unknown ``model_type`` is a
    ValidationError listing :data:`SUPPORTED_MODEL_TYPES`.
    """
    return list(_build(config, source).modules)


def config_parameters(
    config: Mapping[str, Any], *, source: str | None = None
) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model ``config`` describes: state-dict name → shape.

    Tied weights appear once, under the name of the weight they share (the input embedding).
    Non-persistent buffers (rotary tables, position ids) are not parameters and are left out.
    """
    return dict(_build(config, source).params)


def base_param_count(config: Mapping[str, Any], *, source: str | None = None) -> int:
    """Total parameters of the base model ``config`` describes: matrices, embeddings, norms, biases.

    Exact — equal to ``sum(p.numel() for p in model.parameters())`` of the transformers 5
    model built from the same config (tested for every supported family) — for the task
    models modelled here: the bare model, CausalLM, MaskedLM and SequenceClassification. A
    tied lm_head (``tie_word_embeddings``) is not counted twice. Other task heads
    (token classification, question answering, …) are counted as the family's default model
    (CausalLM for decoders, the bare model for encoders), so their few head parameters are
    approximate.
    """
    return sum(math.prod(shape) for shape in _build(config, source).params.values())


def match_targets(names: Iterable[str], targets: Iterable[str]) -> list[str]:
    """The names PEFT's list-valued ``target_modules`` would adapt, in the order given.

    A module matches when its name equals a target or ends with ``"." + target``
    (``q_proj`` and ``self_attn.q_proj`` both match ``model.layers.0.self_attn.q_proj``;
    ``query_proj`` does not match ``pos_query_proj``).
    """
    wanted = [t for t in targets if t]
    suffixes = tuple("." + t for t in wanted)
    exact = set(wanted)
    return [n for n in names if n in exact or n.endswith(suffixes)]


def hypothetical_adapter(
    config: Mapping[str, Any],
    rank: int,
    targets: Sequence[str] | str,
    dtype: str = "float16",
    *,
    source: str | None = None,
) -> dict[str, Any]:
    """The size of a rank-``rank`` LoRA on ``targets`` of the model ``config`` describes.

    ``targets`` follow PEFT's list-valued ``target_modules`` (see :func:`match_targets`), or
    ``"all-linear"`` (alone, as a string or a one-item list): every Linear / Conv1D but the
    output layer, as PEFT expands it.

    Returns ``params`` (A and B elements: r·(in + out) per matched module, r·(num_embeddings +
    dim) for an embedding), ``dense_params`` (Σ in·out: the ΔW they stand for), ``bytes``
    (params × the dtype's size), ``base_params`` and ``base_bytes`` (the base stored in the same
    dtype), ``modules`` (how many matched) and ``compression`` (dense_params / params).

    A target that matches no module is a ValidationError listing the module leaf names there
    are; a dtype not in :data:`DTYPE_BYTES` or a rank below 1 is one too.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValidationError(f"rank must be a positive integer, got {rank!r}", file=source)
    size = DTYPE_BYTES.get(dtype)
    if size is None:
        raise ValidationError(
            f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}", file=source
        )
    model = _build(config, source)
    names = [s.name for s in model.modules]
    target_list = [targets] if isinstance(targets, str) else [t for t in targets if t]
    # PEFT takes the shorthand only as a bare string; a list holding just it (what a CLI's
    # comma-split gives) means the same, as no module name can contain "-"
    if [t.lower() for t in target_list] == [ALL_LINEAR]:
        hits = {
            s.name for s in model.modules if s.kind != "embedding" and s.name != model.output_module
        }
    else:
        if not target_list:
            raise ValidationError("no target modules given", file=source)
        leaves = sorted({s.leaf for s in model.modules})
        for t in target_list:
            if not match_targets(names, [t]):
                raise ValidationError(
                    f"target {t!r} matches no module; modules here: {', '.join(leaves)}",
                    file=source,
                )
        hits = set(match_targets(names, target_list))
    chosen = [s for s in model.modules if s.name in hits]
    params = sum(s.lora_params(rank) for s in chosen)
    dense = sum(s.dense_params for s in chosen)
    base = sum(math.prod(shape) for shape in model.params.values())
    return {
        "params": params,
        "dense_params": dense,
        "bytes": params * size,
        "base_params": base,
        "base_bytes": base * size,
        "modules": len(chosen),
        "compression": dense / params,
    }
