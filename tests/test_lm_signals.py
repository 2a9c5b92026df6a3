"""jaxmu.lm_signals on the tiny Llama fixture: NLL / token signals against float64 NumPy, masks, stacks, tokenizer."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")

from jaxmu import lm_signals
from jaxmu.models import llama

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_llama")


@pytest.fixture(scope="module")
def setup():
  config, params = llama.load_hf_checkpoint(FIXTURE)
  other = jax.tree.map(lambda x: x * 1.1, params)  # a second model of the same architecture
  e = np.load(os.path.join(FIXTURE, "expected_logits.npz"))
  return llama.build(config), params, other, e["input_ids"].astype(np.int32), e["attention_mask"].astype(bool)


def _numpy_signals(logits, tokens, counted):
  """float64 reference: per-position signals aligned with tokens, and the mean NLL per row."""
  z = logits.astype(np.float64)[:, :-1]
  logp_all = z - z.max(-1, keepdims=True)
  logp_all -= np.log(np.exp(logp_all).sum(-1, keepdims=True))
  logp = np.take_along_axis(logp_all, tokens[:, 1:, None].astype(np.int64), -1)[..., 0]
  keep = counted[:, 1:]
  nll = -(logp * keep).sum(1) / keep.sum(1)
  pad = lambda x: np.pad(np.where(keep, x, 0.0), ((0, 0), (1, 0)))
  return nll, {"token_logp": pad(logp), "token_entropy": pad(-(np.exp(logp_all) * logp_all).sum(-1)),
               "vocab_mean": pad(logp_all.mean(-1)), "vocab_std": pad(logp_all.std(-1, ddof=1))}


def test_signals_match_float64_numpy(setup):
  model, params, _, tokens, mask = setup
  out = lm_signals.signals(model, lm_signals.stack_params([params]), tokens, mask, batch_size=2)
  counted = mask.copy()
  counted[:, 0] = False
  np.testing.assert_array_equal(out["mask"], counted)
  logits = np.load(os.path.join(FIXTURE, "expected_logits.npz"))["logits"]  # PyTorch's
  nll, ref = _numpy_signals(logits, tokens, counted)
  np.testing.assert_allclose(out["nll"][0], nll, rtol=1e-5, atol=1e-5)
  for key in lm_signals.SIGNALS:
    np.testing.assert_allclose(out[key][0], ref[key], rtol=1e-4, atol=1e-4, err_msg=key)
  assert out["token_logp"].shape == (1, *tokens.shape)


def test_padding_and_prompt_excluded(setup):
  model, params, _, tokens, mask = setup
  stack = lm_signals.stack_params([params])
  base = lm_signals.signals(model, stack, tokens, mask)
  # what sits in padded positions does not matter
  noisy = np.where(mask, tokens, (tokens + 7) % 64)
  np.testing.assert_array_equal(lm_signals.signals(model, stack, noisy, mask)["nll"], base["nll"])
  # a prompt before each chunk: only the chunk's tokens count, and the first of them now does
  prompt = [1, 5, 9, 13]
  ptok, pmask, plen = lm_signals.prepend_prompt(tokens, mask, prompt)
  assert ptok.shape == (3, 16) and (plen == 4).all()
  np.testing.assert_array_equal(ptok[1, 4:13], tokens[1, :9])
  out = lm_signals.signals(model, stack, ptok, pmask, plen)
  np.testing.assert_array_equal(out["mask"][:, :4], False)
  np.testing.assert_array_equal(out["mask"][:, 4:], pmask[:, 4:])
  logits = np.asarray(model.apply({"params": params}, jnp.asarray(ptok), mask=jnp.asarray(pmask)))
  nll, _ = _numpy_signals(logits, ptok, out["mask"])
  np.testing.assert_allclose(out["nll"][0], nll, rtol=1e-5)
  # an empty prompt is no prompt; per-chunk prompts of different lengths
  t0, m0, l0 = lm_signals.prepend_prompt(tokens, mask, [])
  np.testing.assert_array_equal(t0, np.where(mask, tokens, 0))
  np.testing.assert_array_equal(m0, mask)
  np.testing.assert_array_equal(l0, 0)
  t2, m2, l2 = lm_signals.prepend_prompt(tokens, mask, [[1], [1, 2, 3], []])
  np.testing.assert_array_equal(l2, [1, 3, 0])
  np.testing.assert_array_equal(lm_signals.count_mask(m2, l2).sum(1), mask.sum(1) - (l2 == 0))


def test_stack_equals_each_model_alone(setup):
  model, params, other, tokens, mask = setup
  both = lm_signals.signals(model, lm_signals.stack_params([params, other]), tokens, mask, batch_size=2)
  for i, p in enumerate((params, other)):
    alone = lm_signals.signals(model, lm_signals.stack_params([p]), tokens, mask, batch_size=2)
    for key in ("nll", *lm_signals.SIGNALS):
      np.testing.assert_allclose(both[key][i], alone[key][0], rtol=1e-6, atol=1e-6, err_msg=key)
  assert np.abs(both["nll"][0] - both["nll"][1]).max() > 1e-3
  empty = lm_signals.signals(model, lm_signals.stack_params([params]), tokens[:1], np.zeros_like(mask[:1]))
  assert np.isnan(empty["nll"]).all()


TEXTS = ["The quick brown fox jumps over the lazy dog.", "Unlearning: forget the forget set, keep the rest!",
         "Zoë's café — naïve façade, 東京 🙂", "def f(x):\n  return x * 2  # tabs\tand  spaces"] * 3


def test_tokenizer_round_trip_and_chunks():
  tok = lm_signals.train_bpe_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
  assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("<bos>") == 1
  for text in TEXTS[:4] + ["unseen text, with ümlauts and ✓ symbols"]:
    assert tok.decode(tok.encode(text).ids) == text
  chunks = lm_signals.chunk_texts(tok, TEXTS[:4], 8, bos_id=1)
  assert chunks.tokens.shape[1] == 8 and chunks.tokens.dtype == np.int32
  assert (chunks.tokens[:, 0] == 1).all() and (chunks.tokens[~chunks.mask] == 0).all()
  for i, text in enumerate(TEXTS[:4]):
    pieces = lm_signals.decode_chunks(tok, lm_signals.Chunks(*(x[chunks.doc == i] for x in chunks)), skip_ids=[1])
    assert "".join(pieces).encode() == text.encode() or "\ufffd" in "".join(pieces)
    ids = [t for row, m in zip(chunks.tokens[chunks.doc == i], chunks.mask[chunks.doc == i]) for t in row[m][1:]]
    assert tok.decode(ids) == text
  again = lm_signals.train_bpe_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
  assert again.encode(TEXTS[2]).ids == tok.encode(TEXTS[2]).ids
