"""The three-call API (`jaxmu.api`): docs/api.md runs as written; a Linen module through the
adapter and an NNX module give the same numbers as the same network in jaxmu's convention;
evaluate's accuracies equal a NumPy count from the models' own outputs; bad inputs are one-line
errors."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.datasets

import jaxmu

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEEDS = (0, 1)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    return nn.Dense(10, name="out")(nn.relu(nn.Dense(32, name="hidden")(x)))


class PlainMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10, name="out")(nn.relu(nn.Dense(32, name="hidden")(x)))


@pytest.fixture(scope="module")
def digits():
  x, y = sklearn.datasets.load_digits(return_X_y=True)
  x, y = (x / 16.0).astype(np.float32)[:600], y[:600]
  order = np.random.default_rng(0).permutation(len(x))
  parts = {"train": order[:400], "val": order[400:500], "test": order[500:]}
  parts["forget"], parts["retain"] = parts["train"][:40], parts["train"][40:]
  return x, y, parts


@pytest.fixture(scope="module")
def originals(digits):
  x, y, parts = digits
  return jaxmu.fit(MLP(), (x, y), parts["train"], epochs=3, seeds=SEEDS)


def test_docs_api_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)
  assert len(blocks) >= 5
  namespace = {}
  for block in blocks:
    exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102
  table = namespace["table"]
  assert list(table["method"].unique()) == ["original", "retrain", "finetune", "neggrad_plus"]
  assert (table.loc[table.method == "retrain", "retdev"] == 0).all()
  assert list(namespace["scores"].columns) == ["iam_on", "lira_on"]


def test_linen_adapter_equals_the_same_network_in_jaxmu_convention(digits, originals):
  x, y, parts = digits
  plain = jaxmu.fit(jaxmu.linen_model(PlainMLP(), train_arg=None), (x, y), parts["train"],
                    epochs=3, seeds=SEEDS)
  jax.tree.map(np.testing.assert_array_equal, plain["params"], originals["params"])
  args = dict(forget=parts["forget"], retain=parts["retain"], seeds=SEEDS,
              hparams={"num_epochs": 1})
  ours = jaxmu.unlearn("neggrad_plus", MLP(), originals, (x, y), **args)
  theirs = jaxmu.unlearn("neggrad_plus", jaxmu.linen_model(PlainMLP(), None), plain, (x, y),
                         **args)
  jax.tree.map(np.testing.assert_array_equal, theirs["params"], ours["params"])
  changed = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), ours["params"],
                         originals["params"])
  assert max(jax.tree_util.tree_leaves(changed)) > 1e-4  # unlearning moved the weights


def test_nnx_module_gives_the_linen_numbers(digits, originals):
  from flax import nnx
  x, y, parts = digits

  class NNXMLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden, self.out = nnx.Linear(64, 32, rngs=rngs), nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, v):
      return self.out(nnx.relu(self.hidden(v)))

  net, _ = jaxmu.nnx_model(NNXMLP(nnx.Rngs(0)))
  start = {"params": originals["params"], "batch_stats": {}}  # the same names and layouts
  args = dict(forget=parts["forget"], retain=parts["retain"], seeds=SEEDS,
              hparams={"num_epochs": 1})
  got = jaxmu.unlearn("finetune", net, start, (x, y), **args)
  want = jaxmu.unlearn("finetune", MLP(), originals, (x, y), **args)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               got["params"], want["params"])
  with pytest.raises(ValueError, match="make=lambda rngs"):
    jaxmu.unlearn("retrain", net, start, (x, y), **{**args, "hparams": {"num_epochs": 1}})


def test_evaluate_accuracies_equal_a_numpy_count(digits, originals):
  x, y, parts = digits
  retrained = jaxmu.fit(MLP(), (x, y), parts["retain"], epochs=3, seeds=SEEDS)
  unlearned, seconds = jaxmu.unlearn("finetune", MLP(), originals, (x, y),
                                     forget=parts["forget"], retain=parts["retain"],
                                     seeds=SEEDS, hparams={"num_epochs": 1}, timed=True)
  mask = np.zeros(len(x), bool)
  mask[parts["forget"]] = True
  table = jaxmu.evaluate(MLP(), {"finetune": unlearned}, (x, y), original=originals,
                         retrained=retrained, forget=mask, retain=parts["retain"],
                         val=parts["val"], test=parts["test"], seconds={"finetune": seconds},
                         retrain_seconds=2 * seconds)
  assert list(zip(table.method, table.seed)) == [
      (m, s) for m in ("original", "retrain", "finetune") for s in range(len(SEEDS))]
  for name, variables in (("original", originals), ("retrain", retrained),
                          ("finetune", unlearned)):
    for m in range(len(SEEDS)):
      one = jax.tree.map(lambda v: v[m], variables)
      for split in ("forget", "test"):
        idx = np.sort(parts[split])
        logits = np.asarray(MLP().apply({"params": one["params"]}, x[idx]), np.float64)
        want = (logits.argmax(-1) == y[idx]).mean()
        got = table[(table.method == name) & (table.seed == m)][f"{split}_acc"].item()
        assert got == pytest.approx(want, abs=1e-12)
  row = table[table.method == "finetune"].iloc[0]
  assert row.rte == pytest.approx(2.0) and np.isnan(table[table.method == "original"].rte).all()
  assert (table[table.method == "retrain"].retdev == 0).all()


@pytest.mark.parametrize("call, message", [
    (lambda d, o: jaxmu.unlearn("finetune", MLP(), o, (d[0], d[1]), forget=np.ones(3, bool),
                                seeds=SEEDS), "boolean mask must have one entry per sample"),
    (lambda d, o: jaxmu.unlearn("scrub", MLP(), o, (d[0], d[1]), forget=d[2]["forget"],
                                seeds=SEEDS), "pass val="),
    (lambda d, o: jaxmu.unlearn("finetune", MLP(), jax.tree.map(lambda v: v[0], o),
                                (d[0], d[1]), forget=d[2]["forget"], seeds=SEEDS),
     "leading model axis of 2"),
    (lambda d, o: jaxmu.unlearn("finetun", MLP(), o, (d[0], d[1]), forget=d[2]["forget"],
                                seeds=SEEDS), "unknown unlearning method 'finetun'"),
    (lambda d, o: jaxmu.unlearn("finetune", MLP(), o, (d[0], d[1].astype(float)),
                                forget=d[2]["forget"], seeds=SEEDS), "integer labels"),
    (lambda d, o: jaxmu.unlearn("finetune", MLP(), o, (d[0], d[1]), forget=[10**6],
                                seeds=SEEDS), r"indices in \[0, 600\)"),
])
def test_bad_inputs_are_one_line_errors(digits, originals, call, message):
  with pytest.raises(ValueError, match=message) as error:
    call(digits, originals)
  assert "\n" not in str(error.value)
