"""The decoder-only LLM behind CPRec and its HF-layout checkpoints.

One hand-written Llama-family decoder (Llama 1/2/3, TinyLlama, Mistral, Qwen2/2.5): RMSNorm, rotate-half RoPE,
grouped-query attention through F.scaled_dot_product_attention and a SwiGLU MLP. Parameter names are Hugging Face's
minus the leading "model.", so loading a checkpoint is a strict, shape-checked rename rather than a guessing game.
Parity with transformers' logits is proven in tests/test_model.py; the shape and its config.json live in
infra/config.py, the weight files in infra/weights.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from infra.config import ModelConfig, config_from_hf, config_to_hf
from infra.files import UserError, atomic_dir, read_json, write_json
from infra.tokenizer import Tokenizer, check_fits
from infra.weights import read_weights, weight_shapes, write_peft_adapter


# --------------------------------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under autocast: the mean of squares overflows/underflows in half precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of rotate-half RoPE, with Llama 3.1's wavelength-dependent rescaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if config.rope_scaling is None:
        return inv_freq
    s = config.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    context = s["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, the band between interpolated.
    slowed = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    in_band = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(in_band, blended, slowed)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=c.o_bias)

    def forward(self, x, cos, sin, mask, cache, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = (q * cos + rotate_half(q) * sin).to(v.dtype)
        k = (k * cos + rotate_half(k) * sin).to(v.dtype)
        if cache is not None:
            y = cache.attend(layer, q, k, v, mask)
        else:  # no mask means plain causal attention, which lets SDPA pick its flash kernel
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        # A cache may hand on fewer positions than it attended: eval's prompt pass keeps only the last one.
        return self.o_proj(y.transpose(1, 2).reshape(B, y.shape[2], -1))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.dim, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.dim, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: ModelConfig, dropout: float = 0.0):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MLP(c)
        self.dropout = dropout  # on each sublayer's output in training: SASRec's (extras/baseline.py); the LLM: 0

    def forward(self, x, cos, sin, mask, cache, layer):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        if h.shape[1] < x.shape[1]:  # the cache handed on the last positions only (see Attention)
            x = x[:, -h.shape[1]:]
        x = x + self.drop(h)
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))

    def drop(self, h: torch.Tensor) -> torch.Tensor:
        return F.dropout(h, self.dropout, self.training) if self.dropout else h  # 0: no call, no random draw


def padding_causal_mask(valid: torch.Tensor, start: int = 0) -> torch.Tensor:
    """(B, 1, T, L) boolean mask for the queries in slots start..L-1 over keys 0..L-1 (`valid`: (B, L) real tokens).
    Each query sees the valid keys up to its own slot. A padding query also sees itself: its output is ignored, but a
    fully masked row would fill the attention with NaNs."""
    slots = torch.arange(valid.shape[1], device=valid.device)
    query = slots[start:, None]
    return ((valid.bool()[:, None, :] & (slots <= query)) | (slots == query))[:, None]


class KVCache:
    """A static key/value cache for batched incremental decoding (gpt-fast style: preallocated, written in place).

    Slots fill left to right in lockstep for all rows; `valid` marks real tokens, so left-padded prompts of different
    lengths share one cache, and `next_pos` keeps each row's own next RoPE position."""

    def __init__(self, c: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        shape = (c.n_layers, batch, c.n_kv_heads, max_len, c.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0

    def extend(self, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Claim slots for T new tokens and return the (B, 1, T, length) boolean attention mask for them."""
        B, T = attention_mask.shape
        start, self.length = self.length, self.length + T
        if self.length > self.valid.shape[1]:
            raise ValueError(f"KV cache overflow: {self.length} > {self.valid.shape[1]} slots")
        self.valid[:, start:self.length] = attention_mask.bool()
        # A row whose new tokens are all padding keeps its next position (a long left pad spans several calls).
        self.next_pos = torch.maximum(self.next_pos, ((position_ids + 1) * attention_mask).amax(1))
        return padding_causal_mask(self.valid[:, :self.length], start)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        """Store the new keys/values in their slots, then attend over every slot so far."""
        start = self.length - k.shape[2]
        self.k[layer, :, :, start:self.length] = k
        self.v[layer, :, :, start:self.length] = v
        return F.scaled_dot_product_attention(q, self.k[layer, :, :, :self.length], self.v[layer, :, :, :self.length],
                                              attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


# --------------------------------------------------------------------------------------------------- decoder
class Decoder(nn.Module):
    def __init__(self, config: ModelConfig, dropout: float = 0.0):
        super().__init__()
        self.config = config
        # On the meta device (from_pretrained) nothing is drawn: Embedding's meta normal_ imports torch._dynamo, 1.5 s.
        meta = torch.empty(config.vocab_size, config.dim) if torch.get_default_device().type == "meta" else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim, _weight=meta)
        self.layers = nn.ModuleList(Block(config, dropout) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin tables; built on first use

    def rope(self, position_ids: torch.Tensor, need: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (B, 1, T, head_dim) for these positions, from a fp32 table grown on demand to `need`
        rows (default: the largest position + 1, which reads a value off the device)."""
        if torch.compiler.is_compiling():  # in the graph, fused: no table to grow (a state change would recompile)
            freqs = position_ids[..., None].float() * rope_frequencies(self.config).to(position_ids.device)
            angles = torch.cat((freqs, freqs), dim=-1)[:, None]
            return angles.cos(), angles.sin()
        need = need or int(position_ids.max()) + 1
        if self._rope_cache is None or self._rope_cache[0].shape[0] < need or \
                self._rope_cache[0].device != position_ids.device:
            n = max(need, 2 * (self._rope_cache[0].shape[0] if self._rope_cache else 256))
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), rope_frequencies(self.config))
            angles = torch.cat((freqs, freqs), dim=-1).to(position_ids.device)
            self._rope_cache = angles.cos(), angles.sin()
        cos, sin = self._rope_cache
        return cos[position_ids][:, None], sin[position_ids][:, None]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, kv_cache = None, *,
                select: torch.Tensor | None = None, hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, V), or only at `select` (a boolean (B, T) mask or an index) -> (N, V).

        `hidden=True` returns the final normed hidden states instead, for a loss that applies lm_head in chunks.
        Without a mask or cache attention is causal; `attention_mask` (B, T) marks real tokens (1) vs padding (0).
        """
        (B, T), device, need = input_ids.shape, input_ids.device, None
        if position_ids is None:
            first = kv_cache.next_pos[:, None] if kv_cache is not None else 0
            position_ids = first + torch.arange(T, device=device)[None, :].expand(B, T)
            need = T if kv_cache is None else None  # known from the shape: no device sync, no torch.compile break
        mask = None
        if kv_cache is not None:
            valid = attention_mask if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            mask = kv_cache.extend(valid, position_ids)
        elif attention_mask is not None:
            mask = padding_causal_mask(attention_mask)
        cos, sin = self.rope(position_ids, need)
        x = self.embed_tokens(input_ids)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, kv_cache, i)
        x = self.norm(x) if select is None else self.norm(x)[select]
        return x if hidden else self.lm_head(x)

    # ------------------------------------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> Decoder:
        """Load an HF-layout directory: config.json plus one or many (indexed) *.safetensors files.

        The model is built on the meta device and the loaded tensors are assigned in place, so weights are never
        allocated twice. Keys are matched strictly and mismatches are reported by name. A broken folder (config,
        tokenizer, weight files, non-finite weights) is refused here with a UserError naming the file.
        device="meta" checks the folder but reads nothing: FSDP reads each part right before sharding it (materialize).
        """
        path = Path(path)
        config = config_from_hf(read_json(path / "config.json"), source=str(path / "config.json"))
        check_fits(path, config.vocab_size)
        with torch.device("meta"):
            model = cls(config)
        stored = weight_shapes(path)  # checked from the headers, before any weight is read
        if problems := model.mismatches(shapes := model.ours(stored)):
            raise UserError(f"{path}: weights do not match config.json: {problems}")
        model.source = (path, dtype)
        if torch.device(device).type == "meta":
            return model
        names = {k for k in stored if hf_to_ours(k) in shapes}  # not a tied lm_head's copy: never read
        model.assign(model.ours(read_weights(path, device, dtype, names)))
        return model

    def materialize(self, part: nn.Module) -> None:
        """Read the weights of `part` (this model or one of its modules) still on the meta device, from the folder
        from_pretrained(device="meta") checked, in its dtype, on the CPU. FSDP calls it on each layer, then on the
        rest, right before sharding each: a process holds its shards and one part whole, never the whole model."""
        prefix = next(name for name, m in self.named_modules() if m is part)
        meta = {name.replace(WRAPPED, ""): p for name, p in part.named_parameters(prefix=prefix) if p.is_meta}
        path, dtype = self.source
        tensors = read_weights(path, "cpu", dtype, {ours_to_hf(k) for k in meta})
        filled = {id(p): nn.Parameter(tensors[ours_to_hf(k)], requires_grad=p.requires_grad) for k, p in meta.items()}
        for module in part.modules():  # every module holding one: a tied lm_head shares the embedding's
            for name, p in list(module.named_parameters(recurse=False)):
                if id(p) in filled:
                    setattr(module, name, filled[id(p)])

    def blank(self) -> Decoder:
        """This architecture, LoRA adapters included, on the meta device: what a gathered state dict is assigned to."""
        with torch.device("meta"):
            copy = Decoder(self.config)
        if settings := lora_settings(self):
            apply_lora(copy, *settings)
        return copy

    def assign(self, state: dict[str, torch.Tensor]) -> None:
        """Take these tensors as the parameters (no copy), e.g. into a model built on the meta device."""
        self.load_state_dict(state, strict=False, assign=True)
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # assign=True replaced the shared Parameter

    def ours(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF-named tensors (or shapes) under our names; a tied lm_head's copy and old Llama rotary buffers dropped."""
        state = {hf_to_ours(k): v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight", None)  # tied checkpoints may or may not store the shared matrix twice
        return state

    def mismatches(self, shapes: dict[str, tuple[int, ...]]) -> str:
        """What keeps tensors of these shapes from being exactly this model's weights, by HF name ("" when nothing)."""
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()
                    if not (self.config.tie_embeddings and k == "lm_head.weight")}
        problems = [f"missing {ours_to_hf(k)}" for k in expected if k not in shapes]
        problems += [f"unexpected {ours_to_hf(k)}" for k in shapes if k not in expected]
        problems += [f"{ours_to_hf(k)} has shape {tuple(v)}, expected {expected[k]}"
                     for k, v in shapes.items() if k in expected and tuple(v) != expected[k]]
        return "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint's HF-named tensors into this model in place (resume); ValueError when they differ."""
        state = self.ours(tensors)
        if problems := self.mismatches({k: v.shape for k, v in state.items()}):
            raise ValueError(problems)
        self.load_state_dict(state, strict=not self.config.tie_embeddings)

    def save_pretrained(self, path: str | Path, tokenizer: Tokenizer | None = None,
                        dtype: torch.dtype | None = None) -> None:
        """Write config.json + model.safetensors (+ tokenizer files) in HF layout, atomically."""
        with atomic_dir(path) as tmp:
            self.write_checkpoint(tmp, tokenizer, dtype)

    def write_checkpoint(self, directory: Path, tokenizer: Tokenizer | None = None,
                         dtype: torch.dtype | None = None) -> None:
        """The files of save_pretrained, written into an existing (temporary) directory."""
        dtype = dtype or self.embed_tokens.weight.dtype
        state = {ours_to_hf(k): v.detach().to(dtype).contiguous().cpu() for k, v in self.state_dict().items()
                 if not (self.config.tie_embeddings and k == "lm_head.weight")}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        write_json(directory / "config.json", config_to_hf(self.config, dtype))
        if tokenizer is not None:
            tokenizer.save(directory)


def hf_to_ours(key: str) -> str:
    return key.removeprefix("model.")


def ours_to_hf(key: str) -> str:
    return key if key.startswith("lm_head.") else "model." + key


# --------------------------------------------------------------------------------------------------- LoRA
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = (".lora_A", ".lora_B")  # how the adapters' parameter names end
WRAPPED = "_checkpoint_wrapped_module."  # activation checkpointing's wrapper, in module names, not in state_dict's


class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update: y = W x + b + (alpha/rank) B A x (Hu et al., 2021).

    It keeps the layer's own `weight` and `bias`, so parameter names stay HF's; A and B are fp32 masters whatever the
    base dtype. B starts at zero: at initialisation the output is the base layer's, exactly.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        nn.Module.__init__(self)  # no fresh weight: the base layer's is taken over
        self.in_features, self.out_features, self.rank, self.alpha = base.in_features, base.out_features, rank, alpha
        self.weight, self.bias = base.weight, base.bias
        a = nn.init.kaiming_uniform_(torch.empty(rank, self.in_features), a=math.sqrt(5), generator=generator)  # PEFT's
        device = "cpu" if base.weight.is_meta else base.weight.device  # a base still to be read: A's draws are kept
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        # Under autocast the adapter runs in the compute dtype like the base; outside it (a bf16 base in eval), in fp32.
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.dtype)
        return y + (F.linear(F.linear(h, self.lora_A), self.lora_B) * (self.alpha / self.rank)).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha/rank) B A, computed in fp32, in the base weight's dtype."""
        with torch.autocast(self.weight.device.type, enabled=False):
            delta = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * (self.alpha / self.rank)
        return (self.weight.detach().float() + delta).to(self.weight.dtype)


def apply_lora(model: Decoder, rank: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS,
               seed: int = 0) -> Decoder:
    """Wrap every `targets` projection of every layer in a LoRALinear and freeze everything else, in place.

    Load the base in the compute dtype first (from_pretrained(dtype=...)): the frozen weights stay in it.
    """
    if rank < 1 or not targets or set(targets) - set(LORA_TARGETS):
        raise UserError(f"LoRA rank {rank}, targets {','.join(targets) or '(none)'}: expected a rank of at least 1 "
                        f"and targets among {','.join(LORA_TARGETS)}")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in targets:
                if type(layer := getattr(parent, name, None)) is nn.Linear:  # not a LoRALinear again
                    setattr(parent, name, LoRALinear(layer, rank, alpha, generator))
    return model


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone, under our parameter names ("layers.0.self_attn.q_proj.lora_A"): what a LoRA run trains."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(ADAPTERS)}


def merge_lora(model: Decoder, device: torch.device | str = "cpu") -> Decoder:
    """A plain Decoder on `device` whose projections hold W + (alpha/rank) B A: what save_pretrained writes as the
    usual HF layout. The LoRA model itself is left as it is (training goes on after `best/`)."""
    merged = {f"{name.replace(WRAPPED, '')}.weight": m.merged_weight() for name, m in model.named_modules()
              if isinstance(m, LoRALinear)}  # keyed as state_dict names them: without activation checkpointing's
    state = {k: merged.get(k, v.detach()).to(device) for k, v in model.state_dict().items() if not k.endswith(ADAPTERS)}
    with torch.device("meta"):
        plain = Decoder(model.config)
    plain.assign(state)
    return plain


def save_adapter(model: Decoder, path: str | Path, base_model: str) -> None:
    """The adapters alone in PEFT's layout (peft.PeftModel.from_pretrained loads them onto transformers' base model).
    Keep the folder beside, never inside, a merged model: transformers would apply the adapter a second time."""
    rank, alpha, targets = lora_settings(model)
    write_peft_adapter(Path(path), {ours_to_hf(k): v for k, v in lora_state(model).items()},
                       {"r": rank, "lora_alpha": alpha, "target_modules": list(targets),
                        "base_model_name_or_path": base_model})


def lora_settings(model: nn.Module) -> tuple[int, float, tuple[str, ...]] | None:
    """(rank, alpha, targets) of a LoRA model, as apply_lora takes them; None without adapters."""
    layers = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        return None
    first = next(iter(layers.values()))
    return first.rank, first.alpha, tuple(sorted(layers))
