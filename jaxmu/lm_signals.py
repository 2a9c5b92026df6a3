"""Per-chunk and per-token language-model signals for a stack of models, and text chunking.

The inputs of the LLM attacks in `jaxmu.attacks.llm` (iam-spec 4.4, ``mia_llms_benchmark``),
computed by one jitted program for M models of one architecture (params stacked on a leading
model axis and vmapped) over a batch of tokenised chunks:

* ``nll`` [M, N]: mean next-token NLL over each chunk's counted tokens (HF's causal-LM loss);
  NaN for a chunk with none;
* ``token_logp`` [M, N, T]: ``log p(tokens[t] | tokens[:t])``;
* ``token_entropy`` [M, N, T]: entropy of that next-token distribution (SURP);
* ``vocab_mean`` / ``vocab_std`` [M, N, T]: plain mean and standard deviation (ddof 1, as
  ``torch.std``) of the log-softmax over the vocabulary at that prediction (Min-K%++, as its
  reference code: not probability-weighted);
* ``mask`` [N, T]: the counted tokens: real (``attention_mask``), not position 0 (nothing predicts
  it) and not in the chunk's prompt prefix (``prompt_len``).

Position ``t`` is aligned with ``tokens[:, t]``; uncounted positions hold 0. Prompted
unlearning: `prepend_prompt` puts a prompt before every chunk and only the chunk's tokens count
(the first one is predicted from the prompt). `signals` runs the program over any number of
chunks in fixed-size batches (one compilation); `signals_program` is the jitted batch program.

Text: `train_bpe_tokenizer` trains a byte-level BPE tokenizer offline (``tokenizers``, the
``llm`` extra); `chunk_texts` tokenises texts into fixed-length, right-padded chunks.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SIGNALS = ("token_logp", "token_entropy", "vocab_mean", "vocab_std")


def stack_params(params_list: Sequence) -> object:
  """Stack same-shaped param trees on a new leading model axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *params_list)


def count_mask(mask, prompt_len=None):
  """bool [B, T]: the tokens whose log-probability counts (see the module docstring)."""
  mask = jnp.asarray(mask, bool)
  positions = jnp.arange(mask.shape[1])[None, :]
  counted = mask & (positions >= 1)
  if prompt_len is not None:
    counted &= positions >= jnp.asarray(prompt_len)[:, None]
  return counted


def _one_model(model: nn.Module, params, tokens, mask, counted):
  logits = model.apply({"params": params}, tokens, train=False, mask=mask)[:, :-1].astype(jnp.float32)
  logp_all = jax.nn.log_softmax(logits, axis=-1)  # [B, T-1, V], row t predicts tokens[:, t+1]
  logp = jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  mean = jnp.mean(logp_all, axis=-1)
  var = jnp.sum(jnp.square(logp_all - mean[..., None]), axis=-1) / (logp_all.shape[-1] - 1)
  keep = counted[:, 1:]
  shift = lambda x: jnp.pad(jnp.where(keep, x, 0.0), ((0, 0), (1, 0)))
  n = keep.sum(axis=1)
  nll = jnp.where(n > 0, -jnp.sum(jnp.where(keep, logp, 0.0), axis=1) / jnp.maximum(n, 1), jnp.nan)
  return {"nll": nll, "token_logp": shift(logp), "token_entropy": shift(entropy), "vocab_mean": shift(mean),
          "vocab_std": shift(jnp.sqrt(var))}


@functools.lru_cache(maxsize=16)
def signals_program(model: nn.Module):
  """Jitted ``(params_stack, tokens [B, T], mask [B, T], prompt_len [B] or None) -> dict``.

  ``model.apply({"params": p}, tokens, train=False, mask=mask)`` must return logits [B, T, V]
  (`jaxmu.models.llama`). Outputs have a leading model axis M; ``mask`` (the counted tokens) not.
  """
  def program(params_stack, tokens, mask, prompt_len):
    counted = count_mask(mask, prompt_len)
    out = jax.vmap(lambda p: _one_model(model, p, tokens, mask, counted))(params_stack)
    return {**out, "mask": counted}
  return jax.jit(program)


def signals(model: nn.Module, params_stack, tokens, mask=None, prompt_len=None, *, batch_size: int = 16) -> dict:
  """The signals (module docstring) of every chunk under every stacked model, as NumPy arrays.

  ``tokens`` int [N, T] (right-padded), ``mask`` [N, T] (None: all real), ``prompt_len`` int [N]
  (None: no prompt). Chunks go through `signals_program` ``batch_size`` at a time; the last batch
  is padded with empty rows, so every batch has the same shape.
  """
  tokens = np.asarray(tokens, np.int32)
  n = len(tokens)
  mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
  prompt = np.zeros(n, np.int32) if prompt_len is None else np.asarray(prompt_len, np.int32)
  if mask.shape != tokens.shape or prompt.shape != (n,):
    raise ValueError(f"mask {mask.shape} must match tokens {tokens.shape} and prompt_len {prompt.shape} be ({n},)")
  program = signals_program(model)
  parts = []
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    batch = [np.pad(x[start:stop], [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in (tokens, mask, prompt)]
    out = jax.device_get(program(params_stack, *batch))
    parts.append({k: v[:stop - start] if k == "mask" else v[:, :stop - start] for k, v in out.items()})
  if not parts:
    raise ValueError("no chunks")
  return {k: np.concatenate([p[k] for p in parts], axis=0 if k == "mask" else 1) for k in parts[0]}


class Chunks(NamedTuple):
  tokens: np.ndarray  # int32 [N, L], right-padded with pad_id
  mask: np.ndarray  # bool [N, L], True on real tokens
  doc: np.ndarray  # int32 [N], index of the text each chunk comes from


def prepend_prompt(tokens, mask, prompts, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(tokens, mask, prompt_len)`` with ``prompts`` before each chunk's real tokens.

  ``prompts``: one token sequence for every chunk (may be empty), or one per chunk. The result is right-padded
  to the longest prompt + chunk; pass ``prompt_len`` to `signals` so only chunk tokens count.
  """
  tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
  if len(prompts) == 0 or np.ndim(prompts[0]) == 0:
    prompts = [list(prompts)] * len(tokens)
  if len(prompts) != len(tokens):
    raise ValueError(f"{len(prompts)} prompts for {len(tokens)} chunks")
  rows = [list(p) + list(t[m]) for p, t, m in zip(prompts, tokens, mask)]
  width = max(map(len, rows), default=0)
  out = np.full((len(rows), width), pad_id, np.int32)
  out_mask = np.zeros((len(rows), width), bool)
  for i, row in enumerate(rows):
    out[i, :len(row)], out_mask[i, :len(row)] = row, True
  return out, out_mask, np.array([len(p) for p in prompts], np.int32)


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int = 1024, *, min_frequency: int = 2,
                        special_tokens: Sequence[str] = ("<pad>", "<bos>", "<eos>")):
  """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` (offline, no download).

  Special tokens get ids 0, 1, ... in order (so ``<pad>`` is 0); every byte is in the initial
  alphabet, so any text round-trips through ``decode(encode(text).ids)``.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # the ``llm`` extra

  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                special_tokens=list(special_tokens),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(list(texts), trainer)
  return tokenizer


def load_tokenizer(path: str):
  """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` (a HF checkpoint's fast tokenizer)."""
  from tokenizers import Tokenizer
  return Tokenizer.from_file(path)


def chunk_texts(tokenizer, texts: Sequence[str], chunk_len: int, *, pad_id: int = 0, bos_id: int | None = None,
                min_tokens: int = 1) -> Chunks:
  """Tokenise each text (no special tokens) and cut it into consecutive chunks of ``chunk_len``.

  With ``bos_id`` each chunk starts with it and holds ``chunk_len - 1`` text tokens. A text's last
  chunk is right-padded; chunks with fewer than ``min_tokens`` text tokens are dropped.
  """
  body = chunk_len - (bos_id is not None)
  if body < 1:
    raise ValueError(f"chunk_len {chunk_len} leaves no room for text tokens")
  rows, docs = [], []
  for i, enc in enumerate(tokenizer.encode_batch(list(texts), add_special_tokens=False)):
    ids = enc.ids
    for start in range(0, len(ids), body):
      piece = ids[start:start + body]
      if len(piece) >= min_tokens:
        rows.append(([bos_id] if bos_id is not None else []) + piece)
        docs.append(i)
  tokens = np.full((len(rows), chunk_len), pad_id, np.int32)
  mask = np.zeros((len(rows), chunk_len), bool)
  for r, row in enumerate(rows):
    tokens[r, :len(row)], mask[r, :len(row)] = row, True
  return Chunks(tokens, mask, np.asarray(docs, np.int32))


def decode_chunks(tokenizer, chunks: Chunks, skip_ids: Sequence[int] = ()) -> list[str]:
  """The text of each chunk's real tokens (without ``skip_ids``, e.g. a BOS): the attacks' ``texts``."""
  skip = set(skip_ids)
  return [tokenizer.decode([int(t) for t in row[m] if int(t) not in skip], skip_special_tokens=False)
          for row, m in zip(chunks.tokens, chunks.mask)]
