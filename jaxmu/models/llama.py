"""Llama-style decoder-only language model in Flax Linen, and a Hugging Face checkpoint loader.

Follows ``transformers``' ``LlamaForCausalLM`` (``models/llama/modeling_llama.py``, v5): token
embedding; per layer pre-RMSNorm -> grouped-query self-attention with rotary embeddings ->
residual, pre-RMSNorm -> SwiGLU MLP (``down(silu(gate(x)) * up(x))``) -> residual; final RMSNorm
and the LM head (or the embedding transposed with ``tie_word_embeddings``). RMSNorm normalises in
float32 and multiplies by its weight after casting back. RoPE is the half-split (``rotate_half``)
layout of HF checkpoints, ``inv_freq = theta ** (-arange(0, d, 2) / d)``, optionally rescaled
("linear", "llama3"); other scaling types raise. Attention scores and softmax are float32, scaled
by ``head_dim ** -0.5``; key/value head ``j`` serves query heads ``j * G .. j * G + G - 1``.

Used as ``model.apply({"params": params}, tokens, train=False, mask=attention_mask)``: ``tokens``
int [B, T], ``mask`` bool [B, T] (True on real tokens, the HF ``attention_mask``; None: all real),
optional ``positions`` int [B, T] (default ``arange(T)``, as HF's forward); returns float32
logits [B, T, vocab]. A query attends to earlier-or-equal positions whose key is a real token; the
outputs at padding positions are meaningless. ``train`` is accepted for the house signature and
unused (no dropout). Params are float32; ``dtype`` is the compute dtype (bf16 on GPU).

Layout (params), named for ``jaxmu.models.param_groups`` / ``last_blocks``: ``stem_embed``
(``embedding`` [V, D]); ``layer{i}_0`` = HF ``model.layers.{i}`` with children
``input_layernorm``, ``self_attn`` {``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``},
``post_attention_layernorm``, ``mlp`` {``gate_proj``, ``up_proj``, ``down_proj``} (Dense kernels
[in, out], the transposed HF weights); ``norm_head`` (final RMSNorm, ``scale``) and ``head`` (LM
head; absent with tied embeddings). The LM is not in the image-model registry (``models.get``):
build it with ``build(config, dtype)`` and load weights with ``load_hf_checkpoint(directory)``.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_ROPE_TYPES = ("default", "linear", "llama3")
_MODEL_TYPES = ("llama", "mistral")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The architecture fields of a HF ``LlamaConfig`` (flat and hashable, so a Module field)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int | None = None  # None: num_attention_heads (no GQA)
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"  # "default", "linear" or "llama3"
  rope_factor: float = 1.0  # linear / llama3
  rope_low_freq_factor: float = 1.0  # llama3
  rope_high_freq_factor: float = 4.0  # llama3
  rope_original_max_position_embeddings: int = 8192  # llama3
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.rope_type not in _ROPE_TYPES:
      raise ValueError(f"rope type {self.rope_type!r} is not implemented (only {', '.join(_ROPE_TYPES)})")
    if self.num_attention_heads % self.kv_heads:
      raise ValueError(f"{self.num_attention_heads} attention heads are not a multiple of {self.kv_heads} kv heads")

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """float32 [head_dim // 2] inverse frequencies, as HF's ``ROPE_INIT_FUNCTIONS`` compute them."""
  dim = config.dim_per_head
  inv_freq = (1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
  if config.rope_type == "linear":
    inv_freq = inv_freq / np.float32(config.rope_factor)
  elif config.rope_type == "llama3":
    factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    old = config.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class RMSNorm(nn.Module):
  """HF ``LlamaRMSNorm``: ``scale * (x / sqrt(mean(x^2) + eps))`` normalised in float32."""
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


class Attention(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, allowed):
    c = self.config
    heads, kv_heads, d = c.num_attention_heads, c.kv_heads, c.dim_per_head
    dense = lambda n, name: _dense(c, n, c.attention_bias, self.dtype, name)
    b, t, _ = x.shape
    q = dense(heads * d, "q_proj")(x).reshape(b, t, kv_heads, heads // kv_heads, d)
    k = dense(kv_heads * d, "k_proj")(x).reshape(b, t, kv_heads, d)
    v = dense(kv_heads * d, "v_proj")(x).reshape(b, t, kv_heads, d)
    q = q * cos[:, :, None, None] + rotate_half(q) * sin[:, :, None, None]
    k = k * cos[:, :, None] + rotate_half(k) * sin[:, :, None]
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * d ** -0.5
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, heads * d)
    return dense(c.hidden_size, "o_proj")(out)


class MLP(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = lambda n, name: _dense(c, n, c.mlp_bias, self.dtype, name)
    h = nn.silu(dense(c.intermediate_size, "gate_proj")(x)) * dense(c.intermediate_size, "up_proj")(x)
    return dense(c.hidden_size, "down_proj")(h)


class DecoderLayer(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, allowed):
    eps = self.config.rms_norm_eps
    x = x + Attention(self.config, self.dtype, name="self_attn")(
        RMSNorm(eps, self.dtype, name="input_layernorm")(x), cos, sin, allowed)
    return x + MLP(self.config, self.dtype, name="mlp")(RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x))


class Llama(nn.Module):
  """``LlamaForCausalLM``; params ``stem_embed``, ``layer{i}_0``, ``norm_head``, ``head``."""
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None, positions=None):
    del train  # no dropout
    c = self.config
    b, t = x.shape
    if mask is None:
      mask = jnp.ones((b, t), bool)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                     embedding_init=nn.initializers.normal(c.initializer_range), name="stem_embed")
    h = embed(x)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(c))
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(freqs).astype(self.dtype), jnp.sin(freqs).astype(self.dtype)
    causal = jnp.tril(jnp.ones((t, t), bool))
    allowed = causal[None] & mask.astype(bool)[:, None, :]  # [B, T query, T key]
    for i in range(c.num_hidden_layers):
      h = DecoderLayer(c, self.dtype, name=f"layer{i}_0")(h, cos, sin, allowed)
    h = RMSNorm(c.rms_norm_eps, self.dtype, name="norm_head")(h)
    if c.tie_word_embeddings:
      logits = embed.attend(h)
    else:
      logits = _dense(c, c.vocab_size, False, self.dtype, "head")(h)
    return logits.astype(jnp.float32)


def _dense(c: LlamaConfig, features: int, bias: bool, dtype, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(c.initializer_range), name=name)


def build(config: LlamaConfig, dtype=jnp.float32) -> Llama:
  """The model for ``config`` computing in ``dtype`` (params stay float32)."""
  return Llama(config, dtype)


def init_params(config: LlamaConfig, key: jax.Array, seq_len: int = 8) -> dict:
  """Randomly initialised float32 params (normal(initializer_range) weights, unit norms)."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return jax.jit(lambda k: build(config).init(k, tokens)["params"])(key)


# --- Hugging Face checkpoints -------------------------------------------------------------------


def config_from_hf(hf: dict) -> LlamaConfig:
  """``LlamaConfig`` from a parsed HF ``config.json``.

  RoPE: ``rope_scaling`` (legacy) or ``rope_parameters`` (transformers >= 5; may also carry
  ``rope_theta``), else the top-level ``rope_theta`` (default 10000); the type is ``rope_type``
  (or legacy ``type``). Types other than default / linear / llama3 raise ``ValueError``.
  """
  model_type = hf.get("model_type", "llama")
  if model_type not in _MODEL_TYPES:
    raise ValueError(f"model_type {model_type!r} is not a Llama-style model ({', '.join(_MODEL_TYPES)})")
  if hf.get("sliding_window") is not None:
    raise ValueError(f"sliding-window attention ({hf['sliding_window']}) is not implemented")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act {hf['hidden_act']!r} is not implemented (only silu)")
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  if any(key in rope for key in ("full_attention", "sliding_attention")):
    raise ValueError("per-layer-type rope_parameters are not implemented")
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in _ROPE_TYPES:
    raise ValueError(f"rope type {rope_type!r} is not implemented (only {', '.join(_ROPE_TYPES)})")
  if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError("partial_rotary_factor != 1 is not implemented")
  if hf.get("pretraining_tp", 1) not in (1, None):
    raise ValueError(f"pretraining_tp {hf['pretraining_tp']} is not implemented")
  max_pos = hf.get("max_position_embeddings", 2048)
  first = lambda v: v[0] if isinstance(v, (list, tuple)) else v
  return LlamaConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
      num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
      num_key_value_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=float(rope.get("rope_theta") or hf.get("rope_theta") or 10000.0), rope_type=rope_type,
      rope_factor=float(rope.get("factor", 1.0)),
      rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
      rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
      rope_original_max_position_embeddings=int(rope.get("original_max_position_embeddings", max_pos)),
      max_position_embeddings=max_pos, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
      initializer_range=hf.get("initializer_range", 0.02), bos_token_id=first(hf.get("bos_token_id")),
      eos_token_id=first(hf.get("eos_token_id")), pad_token_id=first(hf.get("pad_token_id")))


def hf_to_params(config: LlamaConfig, tensors: dict[str, np.ndarray], dtype=np.float32) -> dict:
  """The Flax param tree from HF ``state_dict`` names (``model.layers.0.self_attn.q_proj.weight``...).

  Linear weights [out, in] become Dense kernels [in, out]; every array is cast to ``dtype``.
  Missing tensors raise ``KeyError`` naming them; ``lm_head.weight`` is ignored when tied.
  """
  used = set()

  def get(name, transpose=False):
    if name not in tensors:
      raise KeyError(f"checkpoint has no tensor {name!r}")
    used.add(name)
    x = np.asarray(tensors[name])
    return np.ascontiguousarray((x.T if transpose else x).astype(dtype))

  def linear(prefix, bias):
    out = {"kernel": get(prefix + ".weight", transpose=True)}
    if bias:
      out["bias"] = get(prefix + ".bias")
    return out

  params = {"stem_embed": {"embedding": get("model.embed_tokens.weight")}}
  for i in range(config.num_hidden_layers):
    p = f"model.layers.{i}."
    params[f"layer{i}_0"] = {
        "input_layernorm": {"scale": get(p + "input_layernorm.weight")},
        "self_attn": {n: linear(p + "self_attn." + n, config.attention_bias) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "post_attention_layernorm": {"scale": get(p + "post_attention_layernorm.weight")},
        "mlp": {n: linear(p + "mlp." + n, config.mlp_bias) for n in ("gate_proj", "up_proj", "down_proj")},
    }
  params["norm_head"] = {"scale": get("model.norm.weight")}
  if config.tie_word_embeddings:
    used.add("lm_head.weight")
  else:
    params["head"] = {"kernel": get("lm_head.weight", transpose=True)}
  unused = sorted(set(tensors) - used - {n for n in tensors if n.endswith("rotary_emb.inv_freq")})
  if unused:
    raise ValueError(f"checkpoint tensors not used by the model: {', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")
  return params


def load_hf_checkpoint(directory: str, dtype=np.float32) -> tuple[LlamaConfig, dict]:
  """``(config, params)`` from a HF checkpoint directory: ``config.json`` and ``*.safetensors``.

  Sharded checkpoints are read through ``model.safetensors.index.json`` (its ``weight_map``),
  otherwise every ``*.safetensors`` file in the directory. Params are numpy arrays of ``dtype``
  (put them on device with ``jax.device_put``). Any problem raises ``ValueError`` with a one-line
  message naming the file.
  """
  from safetensors.numpy import load_file  # optional dependency: the ``llm`` extra

  config_path = os.path.join(directory, "config.json")
  try:
    with open(config_path) as f:
      hf = json.load(f)
    config = config_from_hf(hf)
  except FileNotFoundError:
    raise ValueError(f"{config_path}: not found (not a Hugging Face checkpoint directory)") from None
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{config_path}: {type(e).__name__}: {_one_line(e)}") from None
  index_path = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index_path):
    try:
      with open(index_path) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{index_path}: {type(e).__name__}: {_one_line(e)}") from None
    files = [os.path.join(directory, name) for name in files]
  else:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
      raise ValueError(f"{os.path.join(directory, 'model.safetensors')}: not found (no *.safetensors in {directory})")
  tensors = {}
  for path in files:
    try:
      tensors.update(load_file(path))
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
      raise ValueError(f"{path}: {type(e).__name__}: {_one_line(e)}") from None
  try:
    params = hf_to_params(config, tensors, dtype)
  except (KeyError, ValueError) as e:
    raise ValueError(f"{files[0] if len(files) == 1 else directory}: {_one_line(e)}") from None
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  bad = [(p, a.shape, b.shape) for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(shapes))
         if a.shape != b.shape]
  if jax.tree.structure(params) != jax.tree.structure(shapes) or bad:
    detail = f"{jax.tree_util.keystr(bad[0][0])} has shape {bad[0][1]}, expected {bad[0][2]}" if bad else "tree mismatch"
    raise ValueError(f"{files[0] if len(files) == 1 else directory}: {detail} (from {config_path})")
  return config, params


def _one_line(e: BaseException) -> str:
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  return " ".join(text.split())
