"""Perturb the weights, then train: CFW (a noisy stem conv, class-weighted training;
deepunlearn-spec 4.16, ``kgltop3``) and CT (transposed conv kernels, then fine-tuning; 4.18,
``kgltop5``).

Per-model decisions (CFW's class weights and noise) are made inside the stack with
`base.stack_map`; the training runs on `common.run_loss` (CFW) and `common.masked_finetune` (CT).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxmu import train
from jaxmu.methods import base
from jaxmu.methods.kaggle import common


# --------------------------------------------------------------------------------------------
# CFW (kgltop3)
# --------------------------------------------------------------------------------------------


def confuse(params: Any, std, key: jax.Array) -> Any:
  """CFW's ``vision_confuser`` on ONE model: w <- N(w, std^2) for every top-level module whose
  name contains "conv" and that has a kernel (ResNet/small CNN: ``stem_conv`` only; TinyViT: none,
  as in the reference, deepunlearn-spec 10.20)."""
  out = dict(params)
  for i, name in enumerate(sorted(params)):
    if "conv" in name and "kernel" in params[name]:
      kernel = params[name]["kernel"]
      noise = jax.random.normal(jax.random.fold_in(key, i), kernel.shape, kernel.dtype)
      out[name] = {**params[name], "kernel": kernel + std * noise}
  return out


def balanced_class_weights(num_classes, index_set, labels):
  """sklearn ``compute_class_weight("balanced")`` over one model's retain labels:
  w_c = n / (C_present * n_c) (absent classes: 0, they never occur in a retain batch)."""
  counts = common.class_counts(index_set, labels, num_classes)
  present = (counts > 0).sum()
  return jnp.where(counts > 0, counts.sum() / (present * jnp.maximum(counts, 1)), 0.0)


def _confuse_stack(ctx, params, std, key):
  return base.stack_map(ctx, confuse, (), params, jnp.broadcast_to(std, (ctx.num_models,)),
                        ctx.keys(key))


def _cfw(ctx: base.Context, hp, key) -> dict:
  """CFW (deepunlearn-spec 4.16, reference ``kgltop3``).

  Confuser N(w, start_std^2) on the stem conv (the reference's "top-level child whose name
  contains conv": ResNet ``conv1`` = our ``stem_conv``; TinyViT has none, so the confuser is a
  no-op there, as in the reference, deepunlearn-spec 10.20); balanced class weights from each
  model's retain labels; per retain batch loss = CE_mean x mean_batch(w_y) (the reference's
  scalar rescaling, kept); SGD with ``CosineAnnealingLR(T_max = num_epochs)`` per epoch, BN in
  train mode; after the training of epoch index E-2 the confuser again with final_std (never
  for E = 1). ``class_weight`` is unused, as in the reference.
  """
  n, epochs = ctx.num_models, hp.num_epochs
  stds = base.per_model(hp, ("start_confuser_std", "final_confuser_std"), n)
  params = _confuse_stack(ctx, ctx.originals["params"], stds["start_confuser_std"],
                          jax.random.fold_in(key, 0))
  weights = base.stack_map(ctx, balanced_class_weights, (ctx.num_classes,),
                           jnp.asarray(ctx.retain), shared=(ctx.data.labels,))
  floats = {**base.per_model(hp, ("learning_rate", "weight_decay", "momentum"), n),
            "class_weights": weights}
  spec = common.LossSpec("cfw", hp.batch_size)
  state = base.TrainCarry.create(train.as_variables(params, ctx.originals.get("batch_stats", {})))
  first = epochs - 1 if epochs >= 2 else epochs
  train_key = jax.random.fold_in(key, 1)
  state = common.run_loss(ctx, None, floats, train_key, spec, first,
                          lr_factor=base.cosine(epochs), state=state)
  if epochs >= 2:
    state = state.replace(params=_confuse_stack(ctx, state.params, stds["final_confuser_std"],
                                                jax.random.fold_in(key, 2)))
    state = common.run_loss(ctx, None, floats, train_key, spec, 1,
                            lr_factor=base.cosine(epochs), first_epoch=epochs - 1, state=state)
  return state.variables


CFW = base.register(base.Method(
    name="cfw", paper_name="CFW", reference="deepunlearn-spec 4.16 (kgltop3)",
    defaults={"num_epochs": 4, "batch_size": 64, "learning_rate": 7e-4, "momentum": 0.9,
              "weight_decay": 5e-4, "start_confuser_std": 0.6, "final_confuser_std": 0.005,
              "class_weight": 0.05},
    space={"start_confuser_std": "normal_sigma", "final_confuser_std": "normal_sigma",
           **base.COMMON5},
    uses=("retain",), unlearn=_cfw, aliases=("kgltop3",)))


# --------------------------------------------------------------------------------------------
# CT (kgltop5): Convolution Transpose
# --------------------------------------------------------------------------------------------


def transpose_conv_kernels(params: Any) -> Any:
  """CT's structural edit on ONE model: every conv kernel [kh, kw, in, out] -> [kw, kh, in, out]
  (PyTorch ``weight.swapaxes(2, 3)`` on [out, in, kh, kw]); 1x1 kernels are unchanged."""
  return common.map_with_path(
      lambda p, x: jnp.swapaxes(x, 0, 1) if common.is_conv_kernel(p, x) else x, params)


def _ct(ctx: base.Context, hp, key) -> dict:
  """CT (deepunlearn-spec 4.18, reference ``kgltop5``): every conv kernel's spatial axes swapped
  (JAX [kh, kw, in, out] -> [kw, kh, in, out]; 7x7 stem, 3x3 and depthwise convs; 1x1 unchanged),
  then fine-tuning on the retain set (plain inputs, BN train mode, SGD, per-epoch cosine)."""
  params = base.stack_map(ctx, transpose_conv_kernels, (), ctx.originals["params"])
  variables = train.as_variables(params, base.copy_tree(ctx.originals.get("batch_stats", {})))
  return common.masked_finetune(ctx, variables, hp, key, hp.batch_size, hp.num_epochs,
                                lr_factor=base.cosine(hp.num_epochs))


CT = base.register(base.Method(
    name="ct", paper_name="CT", reference="deepunlearn-spec 4.18 (kgltop5, Convolution Transpose)",
    defaults={"num_epochs": 3, "batch_size": 64, "learning_rate": 1e-3, "momentum": 0.9,
              "weight_decay": 5e-4},
    space=base.COMMON5, uses=("retain",), unlearn=_ct, aliases=("kgltop5",)))
