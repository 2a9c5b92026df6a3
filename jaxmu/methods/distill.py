"""Distillation methods: Bad Teacher and SCRUB (deepunlearn-spec 4.7, 4.9)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxmu import train
from jaxmu.methods import base, relabel

TEACHER_TAG = 0xBAD7  # fold-in tag of the incompetent teacher's initialisation


# --------------------------------------------------------------------------------------------
# BT
# --------------------------------------------------------------------------------------------


def bad_teacher_loss(student_logits, competent_logits, incompetent_logits, is_forget, valid,
                     temperature):
  """``F.kl_div(log_softmax(s/T), p_t)`` with PyTorch's default reduction "mean" (over batch x
  classes), no T²; p_t = softmax(incompetent/T) on forget samples, softmax(competent/T) else."""
  p_t = jnp.where(is_forget[:, None], jax.nn.softmax(incompetent_logits / temperature),
                  jax.nn.softmax(competent_logits / temperature))
  log_q = jax.nn.log_softmax(student_logits / temperature)
  pointwise = jax.scipy.special.xlogy(p_t, p_t) - p_t * log_q
  return base.masked_mean(pointwise.sum(-1), valid) / student_logits.shape[-1]


@dataclasses.dataclass(frozen=True)
class BadTeacherSpec:
  batch_size: int


def bad_teacher_step(model, recipe, spec: BadTeacherSpec, carry, orders, key, hp, images, labels,
                     step_index, epoch, lr_factor):
  """One Adam step of the student (train mode) towards the teachers (eval mode)."""
  del epoch
  state, teachers = carry
  idx = base.batch(orders["combined"], step_index, spec.batch_size)
  real, is_forget = relabel.split_combined(idx, images.shape[0])
  x, _, valid = base.inputs(recipe, images, labels, real)
  t_comp, t_inc = (base.forward(model, recipe, t["params"], t.get("batch_stats", {}), x, valid,
                                training=False)[0] for t in teachers)
  new = base.descend_on_logits(
      model, recipe, state, x, valid, jax.random.fold_in(key, step_index),
      lambda logits: bad_teacher_loss(logits, t_comp, t_inc, is_forget, valid,
                                      hp["kl_temperature"]),
      {**hp, "momentum": 0.0}, lr_factor, optimizer_kind="adam")  # Adam reads no momentum
  return (new, teachers), {}


def random_model(model, input_shape, key):
  """Fresh variables of ``model`` from ``key`` with the architecture's reference initialisers."""
  return dict(model.init({"params": key}, jnp.zeros((1, *input_shape), jnp.float32), train=False))


def incompetent_teachers(ctx: base.Context, key: jax.Array) -> dict:
  """One randomly initialised model of the context's architecture per model (its own key)."""
  keys = ctx.keys(jax.random.fold_in(key, TEACHER_TAG))
  return base.stack_map(ctx, random_model, (ctx.model, ctx.input_shape), keys)


def _bad_teacher(ctx: base.Context, hp, key) -> dict:
  """BT (deepunlearn-spec 4.7): the student (the original, BatchNorm in train mode) is trained with
  Adam (coupled L2 ``weight_decay``) on shuffled retain ∪ forget to match, by KL at temperature
  ``kl_temperature``, the competent teacher (the original, eval mode) on retain samples and the
  incompetent teacher (a random model, eval mode) on forget samples; labels unused; no scheduler.

  Deviations: the incompetent teacher is a random model of the *same* architecture, initialised
  per model from the run's key, where the reference always used a random torchvision ResNet-18
  (also for TinyViT students; deepunlearn-spec 10.16); no checkpoint is written per epoch.
  The KL keeps the reference's reduction (mean over batch x classes, no T²). ``momentum`` is
  searched as in the reference and ignored by Adam.
  """
  teachers = (base.copy_tree(ctx.originals), incompetent_teachers(ctx, key))
  carry = (base.TrainCarry.create(ctx.originals, "adam"), teachers)
  sources = {"combined": (relabel.combined_sets(ctx), hp.batch_size, True)}
  hps = base.per_model(hp, ("learning_rate", "weight_decay", "kl_temperature"), ctx.num_models)
  carry = base.run_epochs(ctx, bad_teacher_step,
                          (ctx.model, ctx.recipe, BadTeacherSpec(hp.batch_size)), carry, sources,
                          hps, key, hp.num_epochs)
  return carry[0].variables


BAD_TEACHER = base.register(base.Method(
    name="bad_teacher", paper_name="BT", reference="deepunlearn-spec 4.7",
    defaults={"num_epochs": 10, "batch_size": 256, "kl_temperature": 1.0, "learning_rate": 0.01,
              "momentum": None, "weight_decay": 0.0},
    space={"kl_temperature": "temperature", **base.COMMON5}, uses=("retain", "forget"),
    unlearn=_bad_teacher))


# --------------------------------------------------------------------------------------------
# SCRUB
# --------------------------------------------------------------------------------------------


def distill_kl(student_logits, teacher_logits, temperature, valid):
  """repdistiller's ``DistillKL(T)``: Σ_c KL(softmax(t/T) ‖ softmax(s/T)) · T², batch mean."""
  p_t = jax.nn.softmax(teacher_logits / temperature)
  log_p_s = jax.nn.log_softmax(student_logits / temperature)
  kl = (jax.scipy.special.xlogy(p_t, p_t) - p_t * log_p_s).sum(-1)
  return base.masked_mean(kl, valid) * temperature ** 2


def scrub_lr_factor(epochs: int, epoch: int, decay_rate: float = 0.1) -> float:
  """Learning-rate factor of 1-based epoch ``epoch`` of ``epochs`` (repdistiller's
  ``adjust_learning_rate`` with decay epochs [int(.5E), int(.8E), int(.9E)])."""
  steps = sum(epoch > d for d in (int(epochs * 0.5), int(epochs * 0.8), int(epochs * 0.9)))
  return decay_rate ** steps if steps > 0 else 1.0


@dataclasses.dataclass(frozen=True)
class ScrubSpec:
  batch_size: int
  maximize: bool  # the forget pass (−KL) or the retain pass (γ·CE + α·KL)


def scrub_step(model, recipe, spec: ScrubSpec, carry, orders, key, hp, images, labels, step_index,
               epoch, lr_factor):
  """One SGD step of the student (train mode) against the teacher (the original, eval mode)."""
  del epoch
  state, teacher = carry
  source = "forget" if spec.maximize else "retain"
  idx = base.batch(orders[source], step_index, spec.batch_size)
  x, y, valid = base.inputs(recipe, images, labels, idx)
  t_logits, _ = base.forward(model, recipe, teacher["params"], teacher.get("batch_stats", {}), x,
                             valid, training=False)

  def loss(logits):
    kl = distill_kl(logits, t_logits, hp["kd_T"], valid)
    if spec.maximize:
      return -kl
    return hp["gamma"] * base.masked_mean(base.cross_entropy(logits, y), valid) + hp["alpha"] * kl

  new = base.descend_on_logits(model, recipe, state, x, valid, jax.random.fold_in(key, step_index),
                               loss, base.optimizer_hp(hp, "sgda_"), lr_factor)
  return (new, teacher), {}


def forget_val_sets(ctx: base.Context) -> np.ndarray:
  """Each model's val indices whose label is a class present in its forget set ([N, Lv], -1)."""
  labels = np.asarray(ctx.data.labels)
  present = np.zeros((ctx.num_models, ctx.num_classes + 1), bool)
  rows = np.arange(ctx.num_models)[:, None]
  present[rows, np.where(ctx.forget >= 0, labels[np.maximum(ctx.forget, 0)], ctx.num_classes)] = True
  keep = (ctx.val >= 0) & present[rows, labels[np.maximum(ctx.val, 0)]]
  return np.where(keep, ctx.val, -1).astype(np.int32)


def error(ctx: base.Context, variables, index_sets: np.ndarray) -> np.ndarray:
  """Top-1 error in percent (100 − accuracy), eval mode, per model on its own index set."""
  accuracy = train.evaluate(ctx.model, variables, ctx.data, index_sets, ctx.recipe,
                            strategy=ctx.strategy)["accuracy"]
  return 100.0 - 100.0 * np.asarray(accuracy, np.float64)


def select_checkpoint(errors, target, faithful: bool) -> jax.Array:
  """Per model i* = argmin_i |errors[i] − target| (first on ties; errors [E+1, N], target [N]).

  ``faithful``: the reference returns the final student (index E) when i* = 0.
  """
  errors, target = jnp.asarray(errors), jnp.asarray(target)
  choice = jnp.argmin(jnp.abs(errors - target[None]), axis=0)
  if faithful:
    choice = jnp.where(choice == 0, errors.shape[0] - 1, choice)
  return choice


def pick(choice: jax.Array, snapshots: dict, final) -> dict:
  """Per model, the snapshot ``choice[m]`` (keys of ``snapshots``; others fall back to ``final``)."""
  out = final
  for index, snapshot in snapshots.items():
    take = choice == index
    out = jax.tree.map(
        lambda a, b, take=take: jnp.where(take.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
        snapshot, out)
  return out


def scrub(ctx: base.Context, hp, key) -> tuple[dict, dict]:
  """SCRUB over the stack; returns (variables, info): per-epoch forget errors [E+1, N], the final
  forget-val error [N], the chosen index [N] and the final (epoch-E) students."""
  epochs, msteps = int(hp.sgda_num_epochs), int(hp.msteps)
  names = ("gamma", "alpha", "kd_T", "sgda_learning_rate", "sgda_weight_decay", "sgda_momentum")
  hps = base.per_model(hp, names, ctx.num_models)
  rate = float(hp.lr_decay_rate)
  factor = lambda e: scrub_lr_factor(epochs, e + 1, rate)  # noqa: E731  (e is 0-based)
  forget_pass = (ctx.model, ctx.recipe, ScrubSpec(hp.forget_batch_size, True))
  retain_pass = (ctx.model, ctx.recipe, ScrubSpec(hp.retain_batch_size, False))
  forget_src = {"forget": (ctx.forget, hp.forget_batch_size, False)}  # not shuffled
  retain_src = {"retain": (ctx.retain, hp.retain_batch_size, True)}
  carry = (base.TrainCarry.create(ctx.originals), base.copy_tree(ctx.originals))
  errors = [error(ctx, ctx.originals, ctx.forget)]
  snapshots = {0: ctx.originals}  # index -> stacked variables after that many epochs
  for e in range(epochs):
    if e < msteps:
      carry = base.run_epochs(ctx, scrub_step, forget_pass, carry, forget_src, hps,
                              jax.random.fold_in(key, 0), 1, first_epoch=e, lr_factor=factor)
    carry = base.run_epochs(ctx, scrub_step, retain_pass, carry, retain_src, hps,
                            jax.random.fold_in(key, 1), 1, first_epoch=e, lr_factor=factor)
    variables = carry[0].variables
    errors.append(error(ctx, variables, ctx.forget))
    # Keep epoch e+1 only where it can be chosen: argmin takes the first of equal errors, so an
    # epoch whose error repeats an earlier one for every model is never selected.
    earlier = np.stack(errors[:-1])
    if e + 1 < epochs and not (earlier == errors[-1][None]).any(0).all():
      snapshots[e + 1] = base.copy_tree(variables)  # the next epoch donates the carry's buffers
  final = carry[0].variables
  errors = np.stack(errors)
  target = error(ctx, final, forget_val_sets(ctx))
  choice = select_checkpoint(errors, target, bool(hp.faithful))
  return pick(choice, snapshots, final), {"errors": errors, "target": target,
                                          "choice": np.asarray(choice), "final": final}


def _scrub(ctx: base.Context, hp, key) -> dict:
  """SCRUB (deepunlearn-spec 4.9, the reference's scrubv2): for epochs e = 1..E
  (``sgda_num_epochs``) at lr × `scrub_lr_factor`: if e ≤ ``msteps`` one pass over the forget set
  (not shuffled, ``forget_batch_size``) minimising −KL_T(student ‖ teacher), then one shuffled pass
  over retain (``retain_batch_size``) minimising γ·CE + α·KL_T, with KL_T = repdistiller's
  DistillKL (× T²), student in train mode, teacher = the original in eval mode, one SGD. The
  student's forget error after each epoch (index 0 = the original) is recorded per model; each
  model returns the epoch i* = argmin_i |forget_err_i − forget_val_err_E| (forget-val = val samples
  of the classes present in that model's forget set).

  Deviations: index 0 returns the original model (the reference returns the final student,
  deepunlearn-spec 10.15; ``faithful=True`` restores that). Only the forget errors (each epoch)
  and the final forget-val error are evaluated, not the reference's 4 evaluation passes per
  epoch, and no checkpoint files are written (snapshots stay on the device). ``smoothing`` and
  ``beta`` are inert as in the reference (its SWA model is the student itself; ``loss_kd`` = 0)
  and stay in the search space; ``batch_size`` (the reference's val loader's) is unused.
  """
  variables, _ = scrub(ctx, hp, key)
  return variables


SCRUB = base.register(base.Method(
    name="scrub", paper_name="SCRUB", reference="deepunlearn-spec 4.9",
    defaults={"gamma": 1.0, "alpha": 0.5, "beta": 0.0, "smoothing": 0.5, "msteps": 3,
              "kd_T": 2.0, "sgda_num_epochs": 5, "sgda_learning_rate": 5e-4,
              "sgda_weight_decay": 5e-4, "sgda_momentum": 0.9, "retain_batch_size": 32,
              "forget_batch_size": 64, "lr_decay_rate": 0.1, "batch_size": 32,
              "faithful": False},
    space={"gamma": "float", "alpha": "float", "beta": "float", "smoothing": "float",
           "msteps": "num_epochs", "kd_T": "temperature", "sgda_num_epochs": "num_epochs",
           "sgda_learning_rate": "learning_rate", "sgda_weight_decay": "weight_decay",
           "sgda_momentum": "momentum", "retain_batch_size": "batch_size",
           "forget_batch_size": "batch_size"},
    uses=("retain", "forget", "val"), unlearn=_scrub, aliases=("scrubv2",)))
