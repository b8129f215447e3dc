"""A decoder's shape (ModelConfig) and its translation to and from a transformers config.json; the defaults every
command starts from.

config_from_hf reads any Llama-family config.json (transformers v4 or v5 layout) and refuses, by field name, whatever
would change the math our decoder computes; config_to_hf writes the v4 layout back, keeping unknown fields as they were.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from infra.files import UserError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# In config.json: {"seed": N} marks weights that began as `init` made them, kept through training (the lineage
# that extras.options.fitting_defaults reads); "fresh": true is only in what init itself wrote, the one folder init
# may replace.
INIT_MARKER = "cprec_init"


@dataclass
class ModelConfig:
    """A Llama-family decoder's shape. The defaults are the small model `init` creates: sized so CPT on the built-in
    world fits about 10 minutes on 2 CPU cores (docs/design.md)."""
    vocab_size: int = 2048
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 64
    intermediate_size: int = 704
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # only {"rope_type": "llama3", ...}; others change the math and are refused
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v only; Llama's attention_bias puts them on o_proj too
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = True
    max_positions: int = 1024
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    init_std: float = 0.02
    extra: dict = field(default_factory=dict)  # the rest of config.json, written back unchanged on save

    @property
    def context(self) -> int:
        """Longest sequence this decoder computes exactly. Mistral's sliding window (kept in `extra`) is plain causal
        attention within the window, so we cap the context there rather than implement the window."""
        window = self.extra.get("sliding_window") if ARCHITECTURES[self.architecture] == "mistral" else None
        return min(self.max_positions, window or self.max_positions)

    @property
    def n_params(self) -> int:
        d, kv = self.dim, self.n_kv_heads * self.head_dim
        attn = d * self.n_heads * self.head_dim * 2 + d * kv * 2
        per_layer = attn + 3 * d * self.intermediate_size + 2 * d
        return self.n_layers * per_layer + self.vocab_size * d * (1 if self.tie_embeddings else 2) + d

    def lora_params(self, rank: int) -> int:
        """Adapter parameters of rank-`rank` LoRA on every attention and MLP projection: rank x (in + out) each."""
        d, q, kv = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return self.n_layers * rank * (2 * (d + q) + 2 * (d + kv) + 3 * (d + self.intermediate_size))

    def train_flops_per_token(self, seq_len: int, adapters: int = 0) -> float:
        """6N for the weights plus 12·L·d·T for attention scores (PaLM appendix B); embeddings do no matmul. With LoRA
        (`adapters` trained parameters beside a frozen base) the base's weight gradients are never computed: 4N for
        the base (forward, input gradients) and 6 per adapter parameter."""
        n = self.n_params - self.vocab_size * self.dim * (0 if self.tie_embeddings else 1)
        weights = 4 * n + 6 * adapters if adapters else 6 * n
        return weights + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


SMALL = ModelConfig()  # the default small model
DEFAULT_DATA, DEFAULT_MODEL, DEFAULT_CPT = Path("data/world"), Path("models/small"), Path("runs/pretrain")


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Read a transformers config.json (v4 or v5 layout); refuse anything that would change the math."""
    if not isinstance(hf, dict):
        raise UserError(f"{source}: expected a JSON object (a transformers config.json), found {type(hf).__name__}")
    arch = (hf.get("architectures") or [None])[0]
    if arch is None:  # transformers v5 omits `architectures` from bare configs
        arch = {v: k for k, v in ARCHITECTURES.items()}.get(hf.get("model_type"))
    if arch not in ARCHITECTURES:
        raise UserError(f"{source}: architectures={arch!r} is not supported; expected one of {sorted(ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported; expected 'silu'")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})  # v5 nests theta here
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UserError(f"{source}: rope_scaling type {rope_type!r} is not supported; expected none or 'llama3'")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{source}: partial_rotary_factor={hf['partial_rotary_factor']} is not supported")
    if rope_type == "llama3":
        _check_numbers(rope, ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                       f"{source}: rope_scaling")
    if missing := [k for k in REQUIRED if k not in hf]:
        raise UserError(f"{source}: no {', '.join(missing)}; expected a transformers config.json with "
                        f"{', '.join(REQUIRED)}")
    for key in (*REQUIRED, "num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = hf.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise UserError(f"{source}: {key}={value!r}; expected a positive integer")
    _check_numbers(hf, [k for k in ("rms_norm_eps", "rope_theta") if hf.get(k) is not None], source)
    if hf["num_attention_heads"] % (hf.get("num_key_value_heads") or hf["num_attention_heads"]):
        raise UserError(f"{source}: num_attention_heads={hf['num_attention_heads']} is not a multiple of "
                        f"num_key_value_heads={hf['num_key_value_heads']}")
    max_positions = hf.get("max_position_embeddings", 2048)
    if ARCHITECTURES[arch] == "qwen2" and hf.get("use_sliding_window"):
        raise UserError(f"{source}: use_sliding_window=true is not supported (Qwen2 windows only some layers)")
    n_heads = hf["num_attention_heads"]
    attention_bias = hf.get("attention_bias", False)
    known = {"architectures", "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling",
             "rope_parameters", "attention_bias", "mlp_bias", "tie_word_embeddings", "max_position_embeddings",
             "bos_token_id", "eos_token_id", "initializer_range", "torch_dtype", "dtype", "transformers_version",
             "hidden_act"}
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=rope if rope_type == "llama3" else None,
        qkv_bias=attention_bias or ARCHITECTURES[arch] == "qwen2", o_bias=attention_bias,
        mlp_bias=hf.get("mlp_bias", False), tie_embeddings=hf.get("tie_word_embeddings", False),
        max_positions=max_positions, architecture=arch,
        bos_token_id=_first(hf.get("bos_token_id")), eos_token_id=_first(hf.get("eos_token_id")),
        init_std=hf.get("initializer_range", 0.02), extra={k: v for k, v in hf.items() if k not in known})


def _check_numbers(d: dict, keys, where: str) -> None:
    for key in keys:
        value = d.get(key)
        if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
            raise UserError(f"{where}: {key}={value!r}; expected a positive number")


def config_to_hf(c: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The transformers v4 layout, which v5, vLLM and older tools all read. A saved model is never init's fresh one."""
    hf = dict(c.extra)
    if INIT_MARKER in hf:
        hf[INIT_MARKER] = {k: v for k, v in hf[INIT_MARKER].items() if k != "fresh"}
    hf.update(
        architectures=[c.architecture], model_type=ARCHITECTURES[c.architecture],
        vocab_size=c.vocab_size, hidden_size=c.dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        intermediate_size=c.intermediate_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        rope_scaling=c.rope_scaling, hidden_act="silu", mlp_bias=c.mlp_bias,
        tie_word_embeddings=c.tie_embeddings, max_position_embeddings=c.max_positions,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, initializer_range=c.init_std,
        torch_dtype=str(dtype).removeprefix("torch."))
    if ARCHITECTURES[c.architecture] != "qwen2":
        hf["attention_bias"] = c.o_bias
    return hf


def _first(x):
    return x[0] if isinstance(x, list) else x
