"""`jaxmu iam-llm` (jaxmu.pipelines.iam_llm): the LM trainer (the loss falls, a stack equals its
models trained alone), HF export, the saved loss files through `llm.audit_files`, the config's
validation; end to end (e2e) on CPython's help texts, resumed, re-read by `jaxmu audit-llm` and
run again from the exported Hugging Face checkpoints."""

import csv

import jax
import numpy as np
import pytest
from conftest import run_command

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from jaxmu import stages, validate
from jaxmu.attacks import llm
from jaxmu.configs import iam_llm as iam_llm_config
from jaxmu.models import llama
from jaxmu.pipelines import iam_llm

TINY = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)


def _corpus(n=24, length=12, seed=0):
  """Chunks of a few repeated token patterns (learnable), right-padded, BOS first."""
  rng = np.random.default_rng(seed)
  patterns = rng.integers(3, TINY.vocab_size, (4, length))
  tokens = patterns[rng.integers(0, 4, n)].astype(np.int32)
  tokens[:, 0] = iam_llm.BOS
  mask = np.arange(length)[None, :] < rng.integers(length - 3, length + 1, n)[:, None]
  return np.where(mask, tokens, iam_llm.PAD), mask


def _train(index_sets, ids, epochs=3, **kwargs):
  """4 steps per epoch for every model (the pipeline's train.equal_steps: shorter sets cycle)."""
  tokens, mask = _corpus()
  return iam_llm.train_lms(TINY, tokens, mask, index_sets, ids, epochs=epochs, batch_size=4,
                           learning_rate=1e-2, steps_per_epoch=4, **kwargs)


@pytest.fixture(scope="module")
def stacked():
  """Two LMs trained as one stack, on sets of 16 and 10 chunks."""
  sets, ids = [np.arange(0, 16), np.arange(14, 24)], [0, 200]
  losses = []
  carry = _train(sets, ids, on_epoch=lambda e, c, nll: losses.append(nll))
  return sets, ids, carry["params"], np.array(losses)


def test_lm_training_lowers_the_loss(stacked):
  losses = stacked[3]  # [epochs, models]: mean training NLL per epoch
  assert losses.shape == (3, 2) and (losses[-1] < losses[0] - 0.3).all(), losses


def test_stack_equals_models_trained_alone(stacked):
  sets, ids, stack, _ = stacked
  for m, (s, i) in enumerate(zip(sets, ids)):
    alone = _train([s], [i])["params"]
    for a, b in zip(jax.tree.leaves(stack), jax.tree.leaves(alone)):
      np.testing.assert_allclose(np.asarray(a)[m], np.asarray(b)[0], atol=2e-5, rtol=1e-4)


def test_killed_training_resumes_from_its_checkpoint(stacked, tmp_path):
  """Killed after the checkpoint of epoch 1, resumed from it: the same LMs as one straight run
  (the pipeline's train stage restores the same way)."""
  from jaxmu import checkpoint
  sets, ids, straight, _ = stacked
  ckpts = checkpoint.TrainingCheckpoints(tmp_path / "ckpt")

  def kill_after_1(epoch, carry, nll):
    if epoch == 1:
      ckpts.save(epoch, jax.device_get(carry))
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    _train(sets, ids, on_epoch=kill_after_1)
  like = jax.eval_shape(lambda: iam_llm.init_stack(TINY, jax.random.split(jax.random.key(0), 2),
                                                   iam_llm.AdamW()))
  carry = ckpts.restore(ckpts.latest(), like)
  resumed = _train(sets, ids, carry=carry, first_epoch=ckpts.latest() + 1)["params"]
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_hf_export_round_trips(tmp_path):
  params = llama.init_params(TINY, jax.random.key(3))
  tokenizer = tmp_path / "tokenizer.json"
  tokenizer.write_text("{}")
  iam_llm.save_hf(tmp_path / "ckpt", TINY, params, tokenizer)
  config, loaded = llama.load_hf_checkpoint(str(tmp_path / "ckpt"))
  assert config.hidden_size == TINY.hidden_size and config.kv_heads == TINY.kv_heads
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), b)


def _signals(rng, n, t, nll):
  mask = np.arange(t)[None, :] < rng.integers(t // 2, t + 1, n)[:, None]
  mask[:, 0] = False
  return {"nll": nll, "mask": mask, "token_logp": np.where(mask, -rng.gamma(2, 1, (n, t)), 0),
          "token_entropy": rng.gamma(2, 1, (n, t)), "vocab_mean": -rng.gamma(20, 1, (n, t)),
          "vocab_std": rng.gamma(10, 0.3, (n, t))}


def test_saved_losses_round_trip_through_audit_files(tmp_path):
  rng = np.random.default_rng(0)
  n, pop, t = 60, 20, 10
  fit = rng.gamma(2.0, 0.5, n + pop)
  ref = fit + rng.gamma(2.0, 0.4, n + pop)
  labels = np.r_[np.zeros(20, int), np.ones(40, int)]
  target = fit + np.r_[rng.gamma(2.0, 0.4, 20), np.zeros(40 + pop)]
  sig = {k: _signals(rng, n + pop, t, v) for k, v in (("t", target), ("f", fit), ("r", ref))}
  words = np.array(["alpha", "beta", "gamma", "delta", "eps"])
  texts = [" ".join(rng.choice(words, 8)) for _ in range(n + pop)]
  pipe = iam_llm._Pipeline.__new__(iam_llm._Pipeline)
  pipe.config = iam_llm_config.get_config()
  rows = np.arange(n)
  pipe._write(tmp_path, labels, sig["t"], rows, np.arange(n, n + pop), texts, sig["f"], sig["r"],
              sig["t"])
  result = llm.audit_files(tmp_path, rounds=50, seed=1)
  assert not result.skipped and [r["attack"] for r in result.rows] == list(llm.ATTACKS)
  by = {r["attack"]: r for r in result.rows}
  direct = {"iam_on": llm.iam_on(target[:n], fit[:n], ref[:n], raw=True),
            "lira_on": llm.lira_on(target[:n], fit[:n], ref[:n], raw=True),
            "rmia_on": llm.rmia_on(target[:n], fit[:n], ref[:n], target[n:], fit[n:], ref[n:],
                                   raw=True),
            "zlib": llm.zlib_score(target[:n], texts[:n], raw=True),
            "min_k": llm.min_k(sig["t"]["token_logp"][:n].astype(np.float32),
                               sig["t"]["mask"][:n], raw=True)}
  for name, raw in direct.items():
    expect = llm.bootstrap_metrics(labels, raw, rounds=50, seed=1, membership=True)
    assert by[name]["auc"] == pytest.approx(expect["auc"], abs=1e-12), name


def test_config_validates_and_bad_fields_are_named():
  c = iam_llm_config.get_config()
  assert validate.validate("iam_llm", c) == []
  c.split.forget = 0
  c.corpus.name = "nope"
  c.models.target_dir = "somewhere"
  fields = [p.field for p in validate.validate("iam_llm", c)]
  assert "split.forget" in fields and "corpus.name" in fields
  hf = iam_llm_config.get_config("hf")
  fields = [p.field for p in validate.validate("iam_llm", hf)]
  assert {"corpus.forget_file", "corpus.retain_file", "models.target_dir", "models.fit_dir",
          "models.ref_dir", "models.tokenizer_dir"} <= set(fields)
  with pytest.raises(ValueError, match="unknown variant"):
    iam_llm_config.get_config("gpu")


# ------------------------------------------------------------------------------------------ e2e


def small_config(**extra):
  """The CPU config shrunk by overrides only (the e2e test's budget)."""
  c = iam_llm_config.get_config()
  c.corpus.chunk_len = 32
  c.corpus.vocab_size = 300
  c.split.update(runs=2, forget=24, retain_query=48, retain_extra=8, out=64, population=24)
  c.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
  c.train.update(epochs=3, batch_size=16)
  c.audit.rounds = 60
  c.signals.batch_size = 64
  for key, value in extra.items():
    section, field = key.split("__")
    c[section][field] = value
  return c


def _csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.mark.e2e
def test_cpu_pipeline_end_to_end(tmp_path, monkeypatch):
  wd = tmp_path / "run"
  c = small_config()
  iam_llm.run(c, wd)  # stop_after="" : every stage
  report = (wd / "report.md").read_text()
  assert "## Table 6" in report and "## Table 7" in report and "bootstrap rounds" in report
  rows = _csv(wd / "results.csv")
  settings = {r["setting"] for r in rows}
  assert settings == {"exact_run0", "exact_run1", "refusal", "negative_label"}
  assert {r["attack"] for r in rows} == set(llm.ATTACKS)
  # resumed: nothing runs again
  w = stages.Workdir(wd)
  iam_llm._Pipeline(c, w).audit()
  assert w.ran == {"audit": "reused"}
  # killed right after its first training checkpoint, then resumed: the same LMs
  from jaxmu import checkpoint
  save = checkpoint.TrainingCheckpoints.save

  def save_then_die(self, epoch, tree, metadata=None):
    save(self, epoch, tree, metadata)
    raise KeyboardInterrupt

  killed = small_config()
  killed.update(checkpoint_every=1, stop_after="train")
  monkeypatch.setattr(checkpoint.TrainingCheckpoints, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    iam_llm.run(killed, tmp_path / "killed")
  monkeypatch.undo()
  train_lms, firsts = iam_llm.train_lms, []
  monkeypatch.setattr(iam_llm, "train_lms", lambda *a, **k: firsts.append(k["first_epoch"])
                      or train_lms(*a, **k))
  iam_llm.run(killed, tmp_path / "killed")
  assert firsts == [1]  # resumed after the epoch-0 checkpoint
  params = [iam_llm._Pipeline(killed, stages.Workdir(d)).trained_params()
            for d in (wd, tmp_path / "killed")]
  for a, b in zip(*map(jax.tree.leaves, params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the saved files give the same table through `jaxmu audit-llm`
  out = tmp_path / "reread"
  run_command("audit-llm", nll_dir=wd / "losses" / "exact_run0", out=out, bootstrap_rounds=60,
              seed=c.audit.seed, iam_batch=c.audit.iam_batch)
  assert _csv(out / "results.csv") == _csv(wd / "audit" / "exact_run0" / "results.csv")
  # the exported Hugging Face checkpoints through the `files` corpus (the MUSE-News path)
  texts = tmp_path / "texts"
  texts.mkdir()
  topics = iam_llm.pydoc_texts()
  (texts / "forget.txt").write_text(" ".join(topics[:3]))
  (texts / "retain.txt").write_text(" ".join(topics[3:8]))
  hf = iam_llm_config.get_config("hf")
  hf.corpus.update(forget_file=str(texts / "forget.txt"), retain_file=str(texts / "retain.txt"),
                   words_per_chunk=16, chunk_len=32)
  hf.models.update(target_dir=str(wd / "models/hf/retrain_0"),
                   fit_dir=str(wd / "models/hf/original"), ref_dir=str(wd / "models/hf/out"),
                   dtype="float32")
  hf.audit.rounds = 20
  iam_llm.run(hf, tmp_path / "hf")
  hf_rows = _csv(tmp_path / "hf" / "results.csv")
  assert {r["setting"] for r in hf_rows} == {"exact_run0", "refusal", "negative_label"}
  assert "rmia_on" not in {r["attack"] for r in hf_rows}  # no population file given
