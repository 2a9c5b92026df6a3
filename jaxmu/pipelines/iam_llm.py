"""IAM's language-model audit end to end (Tables 6 and 7; iam-spec 3.6, 4.4, 9.5, 10.6), as
resumable stages over a workdir (``config.stop_after`` names the last one to run):

1. ``data``: the corpus cut into fixed-length token chunks and their roles (``data.npz``,
   ``tokenizer.json``). ``pydoc_topics``: CPython's ``pydoc_data.topics`` help texts, a byte-level
   BPE tokenizer trained on them offline, chunks of ``corpus.chunk_len`` tokens (BOS first) shuffled
   with ``split.seed`` into disjoint roles: per run a forget set, the retained query chunks,
   retained extra chunks, the OUT LM's chunks and a population. ``files``: forget / retain /
   population text files cut into chunks of ``corpus.words_per_chunk`` whitespace words (the
   reference's MUSE-News chunks), tokenised with the checkpoints' ``tokenizer.json``.
2. ``train`` (``pydoc_topics`` only): one stack, one compiled epoch program (`jaxmu.engine`,
   vmapped params): the original LM (every forget set + the retained chunks), one exact-unlearning
   retrained LM per run (the original's data without that run's forget set) and the OUT LM
   (disjoint chunks); Llama-style (`jaxmu.models.llama`), AdamW, next-token cross-entropy over the
   real tokens, cosine learning rate over epochs (``models/lm``; each LM also as a Hugging Face
   checkpoint directory under ``models/hf/<name>``, which ``corpus.name=files`` can read back).
3. ``signals``: per-chunk signals (`jaxmu.lm_signals`) of every model; writes the reference's loss
   files (``losses/<setting>/<prefix>-label.txt``, ``-nlloss.txt``, ``-fitRef_nlloss.txt``,
   ``-ref_nlloss.txt``, the population's ``-pop_*nlloss.txt`` and ``-tokens.npz``), which
   ``jaxmu audit-llm --nll_dir=<workdir>/losses/<setting>`` re-reads. Settings: ``exact_run<r>``
   (Table 6: target = run r's retrained LM, fit = the original, ref = the OUT LM; label 0 = run
   r's forget chunks, 1 = the retained query chunks) and, for Table 7, ``refusal`` and
   ``negative_label`` (target = the original with a refusal prompt, or a corrupted-text prefix,
   before every forget chunk of every run, the prefix excluded from the loss; retained chunks
   unprompted).
4. ``audit``: every attack of `jaxmu.attacks.llm` on each setting's files (`llm.audit_files`, the
   bootstrap of iam-spec 9.5); ``audit/<setting>/`` (results.csv, report.md), ``results.csv`` (all
   rows, with a ``setting`` column) and ``report.md`` with Tables 6 and 7.

With ``corpus.name=files`` the three models are Hugging Face checkpoint directories
(``models.target_dir`` / ``fit_dir`` / ``ref_dir``), evaluated one at a time; there is one run,
and Table 7 prompts the fit (original) model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxmu import checkpoint, engine, lm_signals, parallel, report, stages, validate
from jaxmu.attacks import llm
from jaxmu.models import llama

STAGES = ("data", "train", "signals", "audit")
PAD, BOS = 0, 1  # the trained tokenizer's special ids (<pad>, <bos>, <eos>)
PROMPTED = ("refusal", "negative_label")  # Table 7's settings
# Model ids (PRNG streams): the original, run r's retrained LM (+ r) and the OUT LM.
_IDS = {"original": 0, "retrain": 100, "out": 200}


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
  """Runs (or resumes) every stage up to ``config.stop_after``; returns the last output's path.
  A config that `jaxmu.validate` finds wrong raises its `ConfigError` before anything runs."""
  validate.check("iam_llm", config)
  wd = stages.Workdir(workdir)
  wd.write_config(config, owner="iam_llm")
  pipe = _Pipeline(config, wd)
  return stages.run_stages([getattr(pipe, name) for name in STAGES], config.stop_after)


# ----------------------------------------------------------------------------- the LM trainer


@dataclasses.dataclass(frozen=True)
class AdamW:
  """AdamW's static hyper-parameters (the learning rate is per model, in ``hp``)."""
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  weight_decay: float = 0.01
  clip_norm: float = 1.0  # global-norm gradient clipping (0 = off)

  def transform(self) -> optax.GradientTransformation:
    """The update direction; the step is ``-lr * lr_factor * direction`` (decoupled decay)."""
    parts = [optax.clip_by_global_norm(self.clip_norm)] if self.clip_norm else []
    return optax.chain(*parts, optax.scale_by_adam(self.b1, self.b2, self.eps),
                       optax.add_decayed_weights(self.weight_decay))


def lm_loss(model, params, tokens, mask):
  """(sum of next-token NLLs over the real predicted tokens, their count)."""
  logits = model.apply({"params": params}, tokens, train=True, mask=mask)[:, :-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  keep = mask[:, 1:] & mask[:, :-1]
  return -jnp.sum(jnp.where(keep, target, 0.0)), keep.sum()


def lm_step(model, adamw: AdamW, batch_size: int, cycle: bool, carry, orders, key, hp, tokens,
            masks, step_index, epoch, lr_factor):
  """One AdamW step of one LM on batch ``step_index`` of its epoch order (`jaxmu.engine`'s step
  signature; ``tokens`` / ``masks`` are the shared chunk arrays; ``cycle``: a model with fewer
  batches wraps around its own). An all-padding batch changes nothing. Metrics: the summed token
  NLL and the token count."""
  del key, epoch
  idx = engine.batch(orders["train"], step_index, batch_size, cycle=cycle)
  valid = idx >= 0
  rows = jnp.maximum(idx, 0)
  batch_tokens, batch_mask = tokens[rows], masks[rows] & valid[:, None]

  def mean_loss(params):
    total, count = lm_loss(model, params, batch_tokens, batch_mask)
    return total / jnp.maximum(count, 1), (total, count)

  grads, (total, count) = jax.grad(mean_loss, has_aux=True)(carry["params"])
  direction, opt = adamw.transform().update(grads, carry["opt"], carry["params"])
  lr = hp["learning_rate"] * lr_factor
  params = jax.tree.map(lambda p, d: p - lr * d, carry["params"], direction)
  new = {"params": params, "opt": opt}
  carry = jax.tree.map(lambda a, b: jnp.where(valid.any(), a, b), new, carry)
  return carry, {"nll_sum": total, "tokens": count.astype(jnp.float32)}


def init_stack(lm_config: llama.LlamaConfig, keys: jax.Array, adamw: AdamW) -> dict:
  """Stacked ``{"params", "opt"}`` of fresh LMs, one per key (``init_params(config, key)``)."""
  return _init_program(lm_config, adamw)(keys)


@functools.lru_cache(maxsize=16)
def _init_program(lm_config: llama.LlamaConfig, adamw: AdamW):
  """One compiled initialisation per architecture (`llama.init_params`, vmapped)."""
  model, tokens = llama.build(lm_config), jnp.zeros((1, 8), jnp.int32)

  def init(keys):
    params = jax.vmap(lambda k: model.init(k, tokens)["params"])(keys)
    return {"params": params, "opt": jax.vmap(adamw.transform().init)(params)}
  return jax.jit(init)


def cosine_factor(epochs: int, min_ratio: float):
  """Host-side learning-rate factor of epoch e: cosine from 1 to ``min_ratio`` over ``epochs``."""
  def factor(epoch):
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))
  return factor


def train_lms(lm_config: llama.LlamaConfig, tokens, mask, index_sets, model_ids, *, epochs: int,
              batch_size: int, learning_rate, adamw: AdamW = AdamW(), seed: int = 0,
              min_lr_ratio: float = 0.1, shared_init: bool = False, strategy="auto",
              epoch_mode="auto", steps_per_epoch: int | None = None, carry=None,
              first_epoch: int = 0, on_epoch=None):
  """Trains a stack of LMs (one per index set; model m's data order comes from
  ``fold_in(key(seed), model_ids[m])`` and so does its initialisation, or with ``shared_init``
  every model starts from ``init_params(fold_in(key(seed), 7))``: a model trained in a stack
  equals it trained alone); ``steps_per_epoch``: every model takes that many steps per epoch,
  cycling through its own shuffled set (None: the longest set's batches, shorter sets stop
  early). Returns the stacked ``{"params", "opt"}``. ``carry`` /
  ``first_epoch`` resume; ``on_epoch(epoch, carry, metrics)`` is called after each epoch
  (metrics: per-model mean training NLL)."""
  keys = engine.model_keys(jax.random.key(seed), model_ids)
  if carry is None:
    init_keys = jax.vmap(lambda k: jax.random.fold_in(k, 7))(keys)
    if shared_init:
      init_keys = jnp.stack([jax.random.fold_in(jax.random.key(seed), 7)] * len(model_ids))
    carry = init_stack(lm_config, init_keys, adamw)
  sets = _pad_sets(index_sets)
  n = len(model_ids)
  lrs = np.broadcast_to(np.asarray(learning_rate, np.float32), (n,))
  hp = {"learning_rate": jnp.asarray(lrs)}
  strat = parallel.Strategy.create(strategy, epoch_mode)
  for epoch, carry, metrics in engine.epochs(
      lm_step, (llama.build(lm_config), adamw, batch_size, steps_per_epoch is not None), carry,
      {"train": engine.Source(sets, batch_size)}, hp, jnp.asarray(tokens, jnp.int32),
      jnp.asarray(mask, bool), keys, strat, range(first_epoch, epochs),
      lr_factor=cosine_factor(epochs, min_lr_ratio), num_steps=steps_per_epoch,
      streams=engine.TRAINING):
    if on_epoch is not None:
      on_epoch(epoch, carry, metrics["nll_sum"] / np.maximum(metrics["tokens"], 1))
  return carry


def _pad_sets(index_sets) -> np.ndarray:
  width = max(len(s) for s in index_sets)
  out = np.full((len(index_sets), width), -1, np.int32)
  for i, s in enumerate(index_sets):
    out[i, :len(s)] = s
  return out


# ----------------------------------------------------------------------------- HF export


def params_to_hf(lm_config: llama.LlamaConfig, params) -> dict[str, np.ndarray]:
  """The inverse of `llama.hf_to_params`: HF ``state_dict`` names -> float32 arrays."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  out = {"model.embed_tokens.weight": p["stem_embed"]["embedding"],
         "model.norm.weight": p["norm_head"]["scale"]}
  for i in range(lm_config.num_hidden_layers):
    layer, prefix = p[f"layer{i}_0"], f"model.layers.{i}."
    out[prefix + "input_layernorm.weight"] = layer["input_layernorm"]["scale"]
    out[prefix + "post_attention_layernorm.weight"] = layer["post_attention_layernorm"]["scale"]
    for group in ("self_attn", "mlp"):
      for name, dense in layer[group].items():
        out[f"{prefix}{group}.{name}.weight"] = dense["kernel"].T
        if "bias" in dense:
          out[f"{prefix}{group}.{name}.bias"] = dense["bias"]
  if not lm_config.tie_word_embeddings:
    out["lm_head.weight"] = p["head"]["kernel"].T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_hf(directory: Path, lm_config: llama.LlamaConfig, params, tokenizer_json: Path) -> None:
  """A Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer.json)."""
  from safetensors.numpy import save_file
  directory.mkdir(parents=True, exist_ok=True)
  c = lm_config
  hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.kv_heads,
        "head_dim": c.dim_per_head, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings, "hidden_act": "silu",
        "tie_word_embeddings": c.tie_word_embeddings, "initializer_range": c.initializer_range,
        "bos_token_id": BOS, "eos_token_id": 2, "pad_token_id": PAD, "torch_dtype": "float32"}
  (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  save_file(params_to_hf(c, params), str(directory / "model.safetensors"))
  (directory / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())


# ----------------------------------------------------------------------------- data


def pydoc_texts() -> list[str]:
  """CPython's bundled help texts (``pydoc_data.topics.topics``), in sorted topic order."""
  from pydoc_data.topics import topics
  return [topics[k] for k in sorted(topics)]


def word_chunks(text: str, words: int) -> list[str]:
  """``text`` cut into consecutive chunks of ``words`` whitespace-separated words."""
  parts = text.split()
  return [" ".join(parts[i:i + words]) for i in range(0, len(parts), words)]


def corrupt(text: str, seed: int) -> str:
  """``text`` with its characters shuffled (``default_rng(seed)``): Table 7's corrupted prefix."""
  chars = np.array(list(text))
  return "".join(np.random.default_rng(seed).permutation(chars))


def encode_texts(tokenizer_path: Path, checkpoint: Path, texts, length: int):
  """(tokens [N, length], mask, bos, pad) of ``texts`` under a checkpoint's tokenizer: its BOS
  (``bos_token_id`` of its config.json; -1 = none) then the text's tokens, capped at ``length``,
  right-padded with its pad id (0 when it has none)."""
  tokenizer = lm_signals.load_tokenizer(str(tokenizer_path))
  hf = json.loads((checkpoint / "config.json").read_text())
  first = lambda v: v[0] if isinstance(v, list) else v
  bos, pad = first(hf.get("bos_token_id")), first(hf.get("pad_token_id"))
  bos, pad = (-1 if bos is None else bos), (0 if pad is None else pad)
  body = length - (bos >= 0)
  tokens = np.full((len(texts), length), pad, np.int32)
  mask = np.zeros((len(texts), length), bool)
  for i, enc in enumerate(tokenizer.encode_batch(list(texts), add_special_tokens=False)):
    row = ([bos] if bos >= 0 else []) + enc.ids[:body]
    tokens[i, :len(row)], mask[i, :len(row)] = row, True
  return tokens, mask, bos, pad


def lm_config_of(c: ml_collections.ConfigDict, vocab_size: int, max_len: int) -> llama.LlamaConfig:
  m = c.model
  return llama.LlamaConfig(
      vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
      num_key_value_heads=m.num_key_value_heads or None, initializer_range=m.initializer_range,
      max_position_embeddings=max_len, bos_token_id=BOS, eos_token_id=2, pad_token_id=PAD)


class _Pipeline:

  def __init__(self, config, wd):
    self.config, self.wd = config, wd
    self.hf = config.corpus.name == "files"

  # -- data ------------------------------------------------------------------------------------
  def data(self):
    c = self.config
    inputs = {"corpus": c.corpus, "split": c.split, "prefix": c.prefix}
    if self.hf:
      inputs["tokenizer"] = str(self._tokenizer_path())
    with self.wd.stage("data", config=inputs, outputs=("data.npz", "tokenizer.json")) as st:
      if not st.done:
        out = self._files_data(st.tmp) if self.hf else self._pydoc_data(st.tmp)
        np.savez(st.tmp / "data.npz", **out)
        st.commit()
    return self.wd.path("data.npz")

  def _tokenizer_path(self) -> Path:
    m = self.config.models
    return Path(m.tokenizer_dir or m.target_dir) / "tokenizer.json"

  def _pydoc_data(self, tmp: Path) -> dict:
    c = self.config
    texts = pydoc_texts()
    tokenizer = lm_signals.train_bpe_tokenizer(texts, c.corpus.vocab_size)
    tokenizer.save(str(tmp / "tokenizer.json"))
    chunks = lm_signals.chunk_texts(tokenizer, texts, c.corpus.chunk_len, pad_id=PAD, bos_id=BOS,
                                    min_tokens=c.corpus.chunk_len - 1)  # whole chunks only
    s = c.split
    sizes = {"forget": s.runs * s.forget, "retain_query": s.retain_query,
             "retain_extra": s.retain_extra, "out": s.out, "population": s.population}
    need = sum(sizes.values())
    if need > len(chunks.tokens):
      raise ValueError(f"split: {need} chunks asked for ({sizes}) but the corpus has "
                       f"{len(chunks.tokens)} of {c.corpus.chunk_len} tokens; fix: lower the "
                       "split sizes or corpus.chunk_len")
    order = np.random.default_rng(s.seed).permutation(len(chunks.tokens))
    roles, start = {}, 0
    for name, size in sizes.items():
      roles[name] = order[start:start + size].astype(np.int32)
      start += size
    return {"tokens": chunks.tokens, "mask": chunks.mask, "bos": np.int32(BOS),
            "forget": roles["forget"].reshape(s.runs, s.forget),
            **{k: v for k, v in roles.items() if k != "forget"}}

  def _files_data(self, tmp: Path) -> dict:
    c = self.config
    tokenizer_path = self._tokenizer_path()
    (tmp / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())
    groups = {"forget": c.corpus.forget_file, "retain_query": c.corpus.retain_file,
              "population": c.corpus.population_file}
    texts, roles = [], {}
    for name, path in groups.items():
      if not path:
        roles[name] = np.zeros(0, np.int32)
        continue
      pieces = word_chunks(Path(path).read_text(), c.corpus.words_per_chunk)
      # the reference shuffles the chunks with seed 42 (iam-spec 9.5); each role keeps its own
      pieces = [pieces[i] for i in np.random.default_rng(c.split.seed).permutation(len(pieces))]
      roles[name] = np.arange(len(texts), len(texts) + len(pieces), dtype=np.int32)
      texts += pieces
    tokens, mask, bos, pad = encode_texts(tokenizer_path, Path(c.models.target_dir), texts,
                                          c.corpus.chunk_len)
    return {"tokens": tokens, "mask": mask, "bos": np.int32(bos), "pad": np.int32(pad),
            "texts": np.array(texts), "forget": roles["forget"][None],
            "retain_query": roles["retain_query"], "retain_extra": np.zeros(0, np.int32),
            "out": np.zeros(0, np.int32), "population": roles["population"]}

  @functools.cached_property
  def arrays(self) -> dict:
    with np.load(self.wd.path("data.npz")) as f:
      return {k: f[k] for k in f.files}

  @functools.cached_property
  def tokenizer(self):
    return lm_signals.load_tokenizer(str(self.wd.path("tokenizer.json")))

  @property
  def runs(self) -> int:
    return self.arrays["forget"].shape[0]

  def lm_config(self) -> llama.LlamaConfig:
    c = self.config
    return lm_config_of(c, self.tokenizer.get_vocab_size(),
                        c.corpus.chunk_len + 4 * c.corpus.chunk_len)

  def names(self) -> list[str]:
    return ["original"] + [f"retrain_{r}" for r in range(self.runs)] + ["out"]

  # -- train -----------------------------------------------------------------------------------
  def train(self):
    c = self.config
    if self.hf:
      return None
    t = c.train
    with self.wd.stage("train", config={"train": t, "model": c.model, "parallel": c.parallel},
                       deps=("data",), outputs=("models/lm", "models/hf")) as st:
      if not st.done:
        a, lm_config = self.arrays, self.lm_config()
        forget_all = a["forget"].reshape(-1)
        original = np.concatenate([forget_all, a["retain_query"], a["retain_extra"]])
        index_sets = [original] + [np.setdiff1d(original, a["forget"][r])
                                   for r in range(self.runs)] + [a["out"]]
        ids = [_IDS["original"]] + [_IDS["retrain"] + r for r in range(self.runs)] + [_IDS["out"]]
        adamw = AdamW(t.b1, t.b2, 1e-8, t.weight_decay, t.clip_norm)
        ckpts = checkpoint.TrainingCheckpoints(self.wd.path("checkpoints", "train"))
        tag = st.hash
        carry, first = None, 0
        latest = ckpts.latest()
        if latest is not None and ckpts.metadata(latest).get("stage_hash") == tag:
          like = jax.eval_shape(lambda: init_stack(lm_config, jax.random.split(
              jax.random.key(0), len(ids)), adamw))
          carry, first = ckpts.restore(latest, like), latest + 1
        names = self.names()

        def on_epoch(epoch, carry, nll):
          self.wd.append_metrics({"stage": "train", "epoch": epoch, "models": names,
                                  "train_nll": nll})
          if (epoch + 1) % c.checkpoint_every == 0 and epoch + 1 < t.epochs:
            ckpts.save(epoch, jax.device_get(carry), metadata={"stage_hash": tag})

        carry = train_lms(lm_config, a["tokens"], a["mask"], index_sets, ids, epochs=t.epochs,
                          batch_size=t.batch_size, learning_rate=t.learning_rate, adamw=adamw,
                          seed=t.seed, min_lr_ratio=t.min_lr_ratio, shared_init=t.shared_init,
                          steps_per_epoch=(-(-len(original) // t.batch_size)
                                           if t.equal_steps else None),
                          strategy=c.parallel.strategy, epoch_mode=c.parallel.epoch,
                          carry=carry, first_epoch=first, on_epoch=on_epoch)
        params = jax.device_get(carry["params"])
        checkpoint.save(st.tmp / "models" / "lm", params, metadata={"names": names})
        for i, name in enumerate(names):
          save_hf(st.tmp / "models" / "hf" / name, lm_config,
                  jax.tree.map(lambda x: x[i], params), self.wd.path("tokenizer.json"))
        st.commit()
        shutil.rmtree(self.wd.path("checkpoints", "train"), ignore_errors=True)
    return self.wd.path("models/lm")

  def trained_params(self):
    like = jax.eval_shape(lambda: jax.vmap(lambda k: llama.init_params(self.lm_config(), k))(
        jax.random.split(jax.random.key(0), len(self.names()))))
    return checkpoint.restore(self.wd.path("models/lm"), like)

  # -- signals ---------------------------------------------------------------------------------
  def signals(self):
    c = self.config
    deps = ("data",) if self.hf else ("data", "train")
    inputs = {"signals": c.signals, "prompts": c.prompts, "prefix": c.prefix,
              "models": c.models if self.hf else None}
    settings = [f"exact_run{r}" for r in range(self.runs)] + list(PROMPTED)
    with self.wd.stage("signals", config=inputs, deps=deps,
                       outputs=tuple(f"losses/{s}" for s in settings)) as st:
      if not st.done:
        self._signals(st.tmp)
        st.commit()
    return self.wd.path("losses")

  def _prompt_ids(self, tokenizer) -> dict[str, list[int]]:
    p = self.config.prompts
    texts = {"refusal": p.refusal, "negative_label": corrupt(p.negative_label, p.corrupt_seed)}
    return {k: tokenizer.encode(v, add_special_tokens=False).ids for k, v in texts.items()}

  def _model_groups(self):
    """(model, params stack, {role: index in the stack}, (tokens, mask, bos, pad, tokenizer)):
    the models whose signals are needed, with the chunks under their tokenizer. Trained LMs: one
    stack; checkpoints: one directory at a time (deduplicated), each with its own tokenizer.json
    when it has one (the paper's OUT model, CroissantLLM, has its own), else the shared one."""
    a = self.arrays
    if not self.hf:
      names = self.names()
      roles = {"fit": 0, **{f"target_{r}": 1 + r for r in range(self.runs)}, "ref": len(names) - 1}
      yield (llama.build(self.lm_config()), self.trained_params(), roles,
             (a["tokens"], a["mask"], int(a["bos"]), PAD, self.tokenizer))
      return
    m = self.config.models
    dtype = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
    dirs = {"target_0": m.target_dir, "fit": m.fit_dir, "ref": m.ref_dir}
    for directory in dict.fromkeys(dirs.values()):
      own = Path(directory) / "tokenizer.json"
      shared = self.wd.path("tokenizer.json")
      if own.is_file() and own.read_bytes() != shared.read_bytes():
        encoded = encode_texts(own, Path(directory), a["texts"].tolist(),
                               self.config.corpus.chunk_len)
        encoded += (lm_signals.load_tokenizer(str(own)),)
      else:
        encoded = (a["tokens"], a["mask"], int(a["bos"]), int(a["pad"]), self.tokenizer)
      lm_config, params = llama.load_hf_checkpoint(directory, np.dtype(dtype))
      stack = jax.tree.map(lambda x: jnp.asarray(x)[None], params)
      yield (llama.build(lm_config, dtype), stack,
             {role: 0 for role, d in dirs.items() if d == directory}, encoded)
      del params, stack

  def _signals(self, tmp: Path) -> None:
    c, a = self.config, self.arrays
    forget_all = a["forget"].reshape(-1)
    query = np.unique(np.concatenate([forget_all, a["retain_query"]]))  # every audited chunk
    pop = a["population"]
    # Unprompted: query + population chunks under every model; prompted: the fit model on the
    # forget chunks.
    rows = np.concatenate([query, pop])
    out = {}  # role -> signals of `rows`; (role, setting) -> signals of the forget chunks
    for model, stack, roles, (tokens, mask, bos, pad, tokenizer) in self._model_groups():
      res = lm_signals.signals(model, stack, tokens[rows], mask[rows],
                               batch_size=c.signals.batch_size)
      for role, i in roles.items():
        out[role] = {k: (v if k == "mask" else v[i]) for k, v in res.items()}
      if "fit" not in roles:
        continue
      fit_stack = stack if parallel.num_models(stack) == 1 else jax.tree.map(
          lambda x, i=roles["fit"]: x[i:i + 1], stack)  # a 7B checkpoint is not copied
      skip = 1 if bos >= 0 else 0  # the chunk's own BOS moves before the prompt
      for name, ids in self._prompt_ids(tokenizer).items():
        head = ([bos] if bos >= 0 else []) + list(ids)
        toks, pmask, plen = lm_signals.prepend_prompt(tokens[forget_all][:, skip:],
                                                      mask[forget_all][:, skip:], head, pad_id=pad)
        res = lm_signals.signals(model, fit_stack, toks, pmask, plen,
                                 batch_size=c.signals.batch_size)
        out[("fit", name)] = {k: (v if k == "mask" else v[0]) for k, v in res.items()}
    bos = int(a["bos"])
    position = {int(x): i for i, x in enumerate(rows)}
    at = lambda idx: np.array([position[int(x)] for x in idx])
    pop_at = at(pop)
    if "texts" in a:  # the chunks' own text
      texts = a["texts"][rows].tolist()
    else:
      texts = lm_signals.decode_chunks(self.tokenizer, lm_signals.Chunks(
          a["tokens"][rows], a["mask"][rows], np.zeros(len(rows), np.int32)),
          skip_ids=[bos] if bos >= 0 else [])
    for r in range(self.runs):
      idx = np.concatenate([a["forget"][r], a["retain_query"]])
      labels = np.r_[np.zeros(len(a["forget"][r]), int), np.ones(len(a["retain_query"]), int)]
      target = out[f"target_{r}"]
      self._write(tmp / "losses" / f"exact_run{r}", labels, target, at(idx), pop_at, texts,
                  out["fit"], out["ref"], target)
    idx = np.concatenate([forget_all, a["retain_query"]])
    labels = np.r_[np.zeros(len(forget_all), int), np.ones(len(a["retain_query"]), int)]
    for name in PROMPTED:
      # the original's signals, with the prompted ones on the forget chunks (first in `idx`)
      merged = _merge_rows(out["fit"], at(idx), out[("fit", name)], len(forget_all))
      self._write(tmp / "losses" / name, labels, merged, np.arange(len(idx)), pop_at, texts,
                  out["fit"], out["ref"], out["fit"], rows_of_fit=at(idx))

  def _write(self, directory: Path, labels, target, rows, pop_rows, texts, fit, ref, pop_target,
             rows_of_fit=None):
    """The reference's per-chunk files (and ``-tokens.npz``) of one setting."""
    directory.mkdir(parents=True, exist_ok=True)
    p = self.config.prefix
    fit_rows = rows if rows_of_fit is None else rows_of_fit
    columns = {"label": labels, "nlloss": target["nll"][rows],
               "fitRef_nlloss": fit["nll"][fit_rows], "ref_nlloss": ref["nll"][fit_rows]}
    if len(pop_rows):
      columns.update({"pop_nlloss": pop_target["nll"][pop_rows],
                      "pop_fitRef_nlloss": fit["nll"][pop_rows],
                      "pop_ref_nlloss": ref["nll"][pop_rows]})
    for key, values in columns.items():
      fmt = "%d" if key == "label" else "%.17g"
      np.savetxt(directory / f"{p}-{key}.txt", np.asarray(values), fmt=fmt)
    mask = target["mask"][rows]
    np.savez(directory / f"{p}-tokens.npz", text=np.array([texts[i] for i in fit_rows]),
             token_mask=mask,
             **{k: np.where(mask, target[k][rows], 0.0).astype(np.float32)
                for k in lm_signals.SIGNALS})

  # -- audit -----------------------------------------------------------------------------------
  def audit(self):
    c = self.config
    settings = [f"exact_run{r}" for r in range(self.runs)] + list(PROMPTED)
    with self.wd.stage("audit", config={"audit": c.audit}, deps=("signals",),
                       outputs=("audit", "results.csv", "report.md")) as st:
      if not st.done:
        results, rows = {}, []
        for s in settings:
          res = llm.audit_files(self.wd.path("losses", s), rounds=c.audit.rounds,
                                seed=c.audit.seed, batch_size=c.audit.iam_batch or None)
          llm.write_results(res, st.tmp / "audit" / s, c.audit.rounds)
          results[s] = res
          rows += [{"setting": s, **{k: v for k, v in r.items()}} for r in res.rows]
        report.write_csv(st.tmp / "results.csv", rows)
        (st.tmp / "report.md").write_text(render_report(c, results, self.hf))
        st.commit()
    return self.wd.path("report.md")


def _merge_rows(base: dict, rows, prompted: dict, count: int) -> dict:
  """``base``'s signals at ``rows`` with the first ``count`` replaced by ``prompted``'s (padded
  to the wider of the two token widths)."""
  width = max(base["token_logp"].shape[-1], prompted["token_logp"].shape[-1])
  pad = lambda x: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
  out = {}
  for k in base:
    b = base[k][rows]
    q = prompted[k]
    if b.ndim == 2:
      b, q = pad(b), pad(q)
    b = b.copy()
    b[:count] = q
    out[k] = b
  return out


# ----------------------------------------------------------------------------- report


def _cell(mean, std, digits=4):
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def render_report(c, results: dict, hf: bool) -> str:
  """report.md: Table 6 (exact unlearning, per run) and Table 7 (prompted unlearning)."""
  exact = [s for s in results if s.startswith("exact_run")]
  rounds = c.audit.rounds
  first = results[exact[0]]
  lines = ["# IAM LLM audit (Tables 6 and 7)", ""]
  if hf:
    lines += [f"Checkpoints: target `{c.models.target_dir}`, fit (original) `{c.models.fit_dir}`, "
              f"OUT reference `{c.models.ref_dir}`.", ""]
  else:
    lines += [f"Corpus: CPython's `pydoc_data.topics`, chunks of {c.corpus.chunk_len} tokens "
              f"(BPE vocab {c.corpus.vocab_size}); LMs trained as one stack: the original, "
              f"{len(exact)} retrained (one per run) and the OUT LM ({c.train.epochs} epochs, "
              "AdamW).", ""]
  lines += [f"AUC and TPRs: mean ± std over {rounds} balanced bootstrap rounds (the std is over "
            "rounds, iam-spec 9.5); positive class = retained chunk (label 1). Files: "
            "`losses/<setting>/` (re-read with `jaxmu audit-llm --nll_dir=...`).", "",
            "## Table 6: exact unlearning (target = the retrained LM)", ""]
  head = "| attack | " + " | ".join(f"AUC ({s})" for s in exact) + " | TPR@FPR≈0.1 (run 0) | " \
         "TPR@FPR≈0.01 (run 0) |"
  lines += [head, "|---" * (len(exact) + 3) + "|"]
  by = {s: {r["attack"]: r for r in results[s].rows} for s in results}
  for row in first.rows:
    a = row["attack"]
    aucs = " | ".join(_cell(by[s][a]["auc"], by[s][a]["auc_std"]) if a in by[s] else "—"
                      for s in exact)
    lines.append(f"| {row['name']} | {aucs} | "
                 f"{_cell(row['tpr_at_fpr_0.1'], row['tpr_at_fpr_0.1_std'])} | "
                 f"{_cell(row['tpr_at_fpr_0.01'], row['tpr_at_fpr_0.01_std'])} |")
  lines += ["", "## Table 7: \"unlearning\" by prompting the original", "",
            "Target = the original LM with a refusal prompt (refusal) or a corrupted-text prefix "
            "(negative-label) before every forget chunk, the prefix excluded from the loss; "
            "column retrain = Table 6's setting (run 0's retrained LM). Cells: the raw membership "
            "score, "
            "min-max normalised over all chunks, mean ± std over chunks (the paper's notebook).",
            ""]
  cols = [("retrain", exact[0])] + [(s.replace("_", "-"), s) for s in PROMPTED]
  lines += ["| attack | " + " | ".join(f"{n}: y=0" for n, _ in cols) + " | "
            + " | ".join(f"{n}: y=1" for n, _ in cols) + " |", "|---" * (2 * len(cols) + 1) + "|"]
  for row in first.rows:
    a = row["attack"]
    cells = [_cell(by[s][a][f"mean_{y}"], by[s][a][f"std_{y}"], 2) if a in by[s] else "—"
             for y in (0, 1) for _, s in cols]
    lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
  lines += ["", "| attack | " + " | ".join(f"AUC ({n})" for n, _ in cols) + " |",
            "|---" * (len(cols) + 1) + "|"]
  for row in first.rows:
    a = row["attack"]
    lines.append(f"| {row['name']} | " + " | ".join(
        _cell(by[s][a]["auc"], by[s][a]["auc_std"]) if a in by[s] else "—" for _, s in cols)
        + " |")
  shares = [(n, results[s].iam_shares) for n, s in cols if results[s].iam_shares]
  if shares:
    lines += ["", "IAM-On thresholds (normalised): "
              + "; ".join(f"{n}: {100 * sh['forget_above']:.1f}% of forget chunks > "
                          f"{llm.IAM_THRESHOLDS[0]}, {100 * sh['retain_below']:.1f}% of retain "
                          f"chunks < {llm.IAM_THRESHOLDS[1]}" for n, sh in shares) + "."]
  lines += ["", "Paper (MUSE-News, Llama-2-7B, iam-spec 10.6), Table 6 AUC: IAM-On "
            "0.9355 ± 0.0033, "
            "LiRA-On 0.9299 ± 0.0037, RMIA-On 0.9278 ± 0.0034, Ratio 0.9126, Zlib 0.8928, "
            "Min-K% 0.8784, Loss 0.8746, SURP 0.8719, Min-K%++ 0.8469, Bag-of-words 0.5411."]
  return "\n".join(lines) + "\n"
