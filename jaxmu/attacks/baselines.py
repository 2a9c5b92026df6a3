"""The IAM paper's other baselines (iam-spec 4, 4.2, 4.3): EMIA-R, EMIA-P, UpdateAtk, UnLeak and
Table 5's simple scores.

Every function returns the IAM code's own **unlearning** score for its key in ``new_records.py``
(higher = more likely unlearned), like ``iam.iam_score``, so ``iam.bin_ui`` evaluates them all
alike. Shapes: N audited samples, K shadow models, Z population samples, C classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm
from sklearn.neural_network import MLPClassifier

from jaxmu.attacks import _checks, signals
from jaxmu.attacks.lira import _out_gaussian


def _emia_loss(true_class_logit):
  """log(1 + exp(-z_y)) of the raw true-class logit: ``from_correct_logit_to_loss``, whose
  ``np.logaddexp(0, -z)`` is this softplus."""
  return jax.nn.softplus(-true_class_logit)


def emia_reference(target_logit, shadow_logits):
  """EMIA-R (``p_EMIA``; Ye et al. 2022 "reference" attack as iam-spec 4).

  With l = log(1 + exp(-z_y)) of the raw true-class logit z_y (not the cross-entropy; iam-spec
  12.8): per sample, the K shadow losses plus a dummy 0 and a dummy 1000 are sorted and the score
  is ``np.interp(l_target, sorted, linspace(0, 1, K + 2))``, the target loss's percentile.

  Args: target_logit [N], shadow_logits [K, N]: true-class logits z_y of the unlearned and the
  shadow models. Returns [N] in [0, 1].
  """
  target_logit = _checks.signal(target_logit, "target_logit", 1)
  shadow_logits = _checks.shadows(shadow_logits, target_logit.shape[0], "shadow_logits")
  k, n = shadow_logits.shape
  losses = _emia_loss(shadow_logits)
  ends = jnp.broadcast_to(jnp.array([[0.0], [1000.0]], losses.dtype), (2, n))
  xp = jnp.sort(jnp.concatenate([ends[:1], losses, ends[1:]]), axis=0)
  fp = jnp.linspace(0.0, 1.0, k + 2, dtype=losses.dtype)
  return jax.vmap(jnp.interp, in_axes=(0, 1, None))(_emia_loss(target_logit), xp, fp)


def emia_population(target_logit, population_logit):
  """EMIA-P (``p_EMIA_p``, iam-spec 4): fraction of population losses below the sample's loss.

  l = log(1 + exp(-z_y)) as `emia_reference`, all from the unlearned model: score(x) =
  mean over z of [l(z) < l(x)]. Args: target_logit [N], population_logit [Z]. Returns [N].
  """
  target = _emia_loss(_checks.signal(target_logit, "target_logit", 1))
  population = jnp.sort(_emia_loss(_checks.signal(population_logit, "population_logit", 1)))
  return jnp.searchsorted(population, target, side="left").astype(target.dtype) / len(population)


def update_attack(target, original, shadows):
  """UpdateAtk (``p_update_LiRA``, iam-spec 4): the change of the OUT Gaussian's upper tail.

  [1 - Phi((phi_unl - mu_out) / s)] - [1 - Phi((phi_ori - mu_out) / s)] with mu_out, s the mean
  and population std (+1e-30) of the K shadows' scaled logits. With K = 1 (s = 0) it is a step
  function with values in {-1, 0, 1} (up to Phi(0) = 0.5 at exact ties).

  Args: target [N] (unlearned), original [N], shadows [K, N] (OUT). Returns [N] in [-1, 1].
  Deviation: a zero std is floored at 1e-10 instead of adding 1e-30 (see ``lira``).
  """
  target, mu, s = _out_gaussian(target, shadows)
  original = _checks.signal(original, "original", 1)
  if original.shape != target.shape:
    raise ValueError(f"original has shape {original.shape}; target has {target.shape}")
  return norm.cdf((original - mu) / s) - norm.cdf((target - mu) / s)


def simple_scores(logits, labels, temperature=1.0):
  """Table 5's shadow-free scores of the unlearned model (iam-spec 4.3), as a dict of [N] arrays.

  ``proby`` = -p_y (``p_proby_of_pure``), ``tsm`` = -taylor_soft_margin (``p_tsm_of_pure``; pass
  the dataset's ``temperature``, iam-spec 4.1), ``loss`` = cross-entropy (``p_lossy_of_pure``).
  """
  return {
      "proby": -signals.true_class_prob(logits, labels),
      "tsm": -signals.taylor_soft_margin(logits, labels, temperature),
      "loss": signals.cross_entropy(logits, labels),
  }


def simple_diff_scores(original_logits, logits, labels):
  """The ``p_SimpleDiff_*`` scores (iam-spec 4): original minus unlearned, as a dict of [N].

  ``conf`` = p_ori - p_unl, ``loss`` = l_unl - l_ori, ``carlogit`` = phi_ori - phi_unl,
  ``gumbel`` = r_hat_ori - r_hat_unl (normalised Gumbel map, eps 1e-2 and 1e-5).
  """
  scores = {}
  for name, fn, sign in (("conf", signals.true_class_prob, 1), ("loss", signals.cross_entropy, -1),
                         ("carlogit", signals.scaled_logit, 1)):
    scores[name] = sign * (fn(original_logits, labels) - fn(logits, labels))
  gumbel = lambda z: signals.normalized_gumbel(signals.true_class_prob(z, labels))
  scores["gumbel"] = gumbel(original_logits) - gumbel(logits)
  return scores


# UnLeak ------------------------------------------------------------------------------------------

def _top3(p):
  """Keeps the 3 largest probabilities; the rest mass spreads evenly over the other C - 3."""
  c = p.shape[-1]
  top = np.argsort(-p, axis=-1, kind="stable")[..., :3]
  kept = np.take_along_axis(p, top, -1)
  out = np.repeat((1 - kept.sum(-1, keepdims=True)) / max(c - 3, 1), c, axis=-1)
  np.put_along_axis(out, top, kept, -1)
  return out


def unleak_feature(p_old, p_new):
  """UnLeak's ``sorted_diff`` feature f(P_old, P_new) (iam-spec 4.2), [..., C] -> [..., C].

  Both probability vectors are reduced to their top 3 (the rest spread evenly), then ordered by
  the reduced old vector ascending, and the feature is old - new. Ties (the spread entries) are
  ordered stably by class index; the reference's torch sort leaves that order unspecified.
  """
  p_old, p_new = np.asarray(p_old, np.float64), np.asarray(p_new, np.float64)
  if p_old.shape != p_new.shape or p_old.ndim < 1:
    raise ValueError(f"p_old {p_old.shape} and p_new {p_new.shape} must be equal [..., C]")
  if not (np.all(np.isfinite(p_old)) and np.all(np.isfinite(p_new))):
    raise ValueError("probabilities contain NaN or infinite values")
  old, new = _top3(p_old), _top3(p_new)
  order = np.argsort(old, axis=-1, kind="stable")
  return np.take_along_axis(old, order, -1) - np.take_along_axis(new, order, -1)


def unleak_attack_model(p_origin, p_shadows, held_out, seed=0):
  """Trains UnLeak's attack model (iam-spec 4.2) on a shadow origin model and K shadow models.

  For each shadow k: positives (label 1, "unlearned") = the samples held out of shadow k, with
  feature f(p_origin, p_shadow_k); negatives (label 0) = as many of shadow k's training samples,
  the first in index order (the reference takes the first 4 000 of its training set). Classifier:
  sklearn ``MLPClassifier(early_stopping=True, learning_rate_init=0.01, max_iter=1000)`` with
  ``random_state=seed``, so the model is deterministic given the seed.

  Args:
    p_origin [N, C]: softmax of the shadow "origin" model (trained on the whole shadow pool).
    p_shadows [K, N, C]: softmax of the K shadow models on the same N pool samples.
    held_out [K, N] bool: True where sample n was held out of shadow k's training.
  """
  p_origin, p_shadows = np.asarray(p_origin), np.asarray(p_shadows)
  if p_shadows.ndim != 3 or p_shadows.shape[0] == 0 or p_shadows.shape[1:] != p_origin.shape:
    raise ValueError(f"p_shadows {p_shadows.shape} must be [K >= 1, N, C] with p_origin "
                     f"{p_origin.shape} = [N, C]")
  held_out = np.asarray(_checks.mask(held_out, p_shadows.shape[:2], "held_out"))
  features, labels = [], []
  for p_k, out_k in zip(p_shadows, held_out):
    pos = np.flatnonzero(out_k)
    neg = np.flatnonzero(~out_k)[:len(pos)]
    if len(pos) == 0 or len(neg) == 0:
      raise ValueError("every shadow needs held-out and training samples")
    features.append(unleak_feature(p_origin[np.r_[pos, neg]], p_k[np.r_[pos, neg]]))
    labels.append(np.r_[np.ones(len(pos)), np.zeros(len(neg))])
  model = MLPClassifier(early_stopping=True, learning_rate_init=0.01, max_iter=1000,
                        random_state=seed)
  return model.fit(np.concatenate(features), np.concatenate(labels))


def unleak_score(model, p_original, p_target):
  """UnLeak's ``p_Unleak``: predict_proba of "unlearned" for f(softmax(z_ori), softmax(z_unl)).

  Args: model from `unleak_attack_model`; p_original, p_target [N, C] probabilities of the
  original and the unlearned model. Returns [N] in [0, 1].
  """
  return model.predict_proba(unleak_feature(p_original, p_target))[:, 1]
