"""The unlearning framework: registry, hyper-parameters, timing, references, fine-tuning."""

import dataclasses

import jax
import numpy as np
import optuna
import pytest

from conftest import ARCH_SIZES, make_context
from jaxmu import train
from jaxmu import methods as methods_lib
from jaxmu.methods import base


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_registry_names_aliases_and_unknown():
  assert methods_lib.get("naive") is methods_lib.get("retrain")
  with pytest.raises(ValueError, match="unknown unlearning method 'finetun'"):
    methods_lib.get("finetun")
  with pytest.raises(ValueError, match="no hyper-parameter 'lr'"):
    methods_lib.get("finetune").hparams({"lr": 0.1})


def test_original_is_unchanged_and_retrain_matches_training_core(tiny_ctx):
  out = methods_lib.get("original").run(tiny_ctx)
  for a, b in zip(_leaves(out.states), _leaves(tiny_ctx.originals)):
    np.testing.assert_array_equal(a, b)
  retrained = methods_lib.get("retrain").run(tiny_ctx, {"num_epochs": 2}, jax.random.key(5))
  state = train.create_state(tiny_ctx.inits, tiny_ctx.recipe, learning_rate=0.05)
  ref = train.fit(tiny_ctx.model, state, tiny_ctx.data, tiny_ctx.retain, tiny_ctx.recipe, 2,
                  jax.random.key(5), model_ids=tiny_ctx.model_ids, strategy="loop", progress=False)
  for a, b in zip(_leaves(retrained.states), _leaves(ref.state.variables)):
    np.testing.assert_array_equal(a, b)


def test_finetune_per_model_lr_reuses_the_program_and_times_apart(tiny_ctx):
  ft = methods_lib.get("finetune")
  first = ft.run(tiny_ctx, {"num_epochs": 1, "learning_rate": [0.1, 0.01]})
  second = ft.run(tiny_ctx, {"num_epochs": 1, "learning_rate": [0.2, 0.01]})
  assert second.compile_seconds == 0.0 and first.seconds > 0
  k1, k2 = (r.states["params"]["fc"]["kernel"] for r in (first, second))
  np.testing.assert_array_equal(k1[1], k2[1])  # model 1 had the same hyper-parameters
  assert not np.array_equal(k1[0], k2[0])


def test_finetune_stack_equals_each_model_alone(tiny_ctx):
  hp = {"num_epochs": 1}
  stacked = methods_lib.get("finetune").run(tiny_ctx, hp, jax.random.key(3)).states
  for m in range(2):
    alone = dataclasses.replace(
        tiny_ctx, originals=jax.tree.map(lambda x: x[m:m + 1], tiny_ctx.originals),
        retain=tiny_ctx.retain[m:m + 1], forget=tiny_ctx.forget[m:m + 1],
        val=tiny_ctx.val[m:m + 1], model_ids=(m,))
    single = methods_lib.get("finetune").run(alone, hp, jax.random.key(3)).states
    for a, b in zip(_leaves(jax.tree.map(lambda x: x[m:m + 1], stacked)), _leaves(single)):
      np.testing.assert_allclose(a, b, atol=1e-6)


def test_cosine_factor_is_pytorch_per_epoch():
  assert [round(base.cosine(4)(e), 6) for e in range(4)] == [1.0, 0.853553, 0.5, 0.146447]


def test_suggest_uses_reference_ranges():
  study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
  trial = study.ask()
  hp = methods_lib.get("finetune").suggest(trial, e_max=7)
  assert set(hp) == {"learning_rate", "momentum", "weight_decay", "batch_size", "num_epochs"}
  dist = trial.distributions
  assert (dist["learning_rate"].low, dist["learning_rate"].high, dist["learning_rate"].log) == (
      1e-5, 1e-1, True)
  assert dist["momentum"].low == dist["momentum"].high == 0.9
  assert tuple(dist["batch_size"].choices) == (64, 128, 256)
  assert (dist["num_epochs"].low, dist["num_epochs"].high) == (1, 7)


ARCH_RUNS = {  # methods whose code reads the architecture (modes, heads, teachers), one epoch each
    "neggrad_plus": {"num_epochs": 1, "faithful": True},
    "salun": {"num_epochs": 1, "faithful": True},
    "bad_teacher": {"num_epochs": 1},
    "scrub": {"sgda_num_epochs": 1, "msteps": 1},
}


@pytest.mark.slow  # the mini variant too: compiles too long for `make test`
@pytest.mark.parametrize("size", ARCH_SIZES)
@pytest.mark.parametrize("arch", [("resnet18", {}), ("tinyvit_11m", {"img_size": 32})],
                         ids=["resnet18", "tinyvit"])
@pytest.mark.parametrize("name", sorted(ARCH_RUNS))
def test_loss_based_methods_run_on_the_paper_architectures(name, arch, size):
  ctx = _arch_context(*arch, size)
  out = methods_lib.get(name).run(ctx, ARCH_RUNS[name], jax.random.key(0)).states
  assert jax.tree.structure(out) == jax.tree.structure(ctx.originals)
  assert all(np.isfinite(leaf).all() for leaf in _leaves(out))


_ARCH_CONTEXTS = {}


def _arch_context(model_name, kw, size):
  if (model_name, size) not in _ARCH_CONTEXTS:
    _ARCH_CONTEXTS[model_name, size] = make_context(model_name, num_models=1, image_size=32,
                                                    train_epochs=0, size=size, **kw)
  return _ARCH_CONTEXTS[model_name, size]
