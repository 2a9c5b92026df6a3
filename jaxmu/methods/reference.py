"""The two references every table needs: ``original`` (no change) and ``retrain`` (exact
unlearning: from each seed's initialisation on its retain set only, deepunlearn-spec 3 / iam-spec
6.2, through the training core)."""

from __future__ import annotations

import dataclasses

from jaxmu import train
from jaxmu.methods import base


def _original(ctx: base.Context, hp, key) -> dict:
  del hp, key
  return base.copy_tree(ctx.originals)


def _retrain(ctx: base.Context, hp, key) -> dict:
  epochs = hp.num_epochs or ctx.train_epochs
  if epochs < 1:
    raise ValueError("retrain needs num_epochs >= 1 (or the context's train_epochs)")
  recipe = dataclasses.replace(ctx.recipe, batch_size=hp.batch_size or ctx.recipe.batch_size)
  defaults = {"learning_rate": 0.1, "momentum": 0.9, "weight_decay": 5e-4, **ctx.train_hparams}
  state = train.create_state(ctx.inits, recipe, **{
      name: defaults[name] for name in ("learning_rate", "momentum", "weight_decay")})
  result = train.fit(ctx.model, state, ctx.data, ctx.retain, recipe, epochs, key,
                     model_ids=ctx.model_ids, strategy=ctx.strategy, progress=False)
  return result.state.variables


ORIGINAL = base.register(base.Method(
    name="original", paper_name="O", reference="deepunlearn-spec 3 (the model before unlearning)",
    defaults={}, space={}, uses=(), unlearn=_original))

RETRAIN = base.register(base.Method(
    name="retrain", paper_name="R",
    reference="deepunlearn-spec 3 (naive), iam-spec 6.2: retraining from the seed's "
              "initialisation on the retain set with the original recipe",
    defaults={"num_epochs": 0, "batch_size": 0},  # 0 = the original training's
    space={}, uses=("retain",), unlearn=_retrain, aliases=("naive",)))
