"""The auditor's entry point: saved outputs of models in, every attack's scores and ROC metrics out.

An auditor holds the model before unlearning (``original``), the model after it (``target``), K
shadow OUT models that never saw the query samples, and the list of deletion requests
(``forget_mask``). `audit` scores every query sample with IAM (iam-spec 3) and the baselines of
iam-spec 4 and, given the mask, evaluates each attack with BinUI (iam-spec 3.4, 9.1).

Every score returned is an **unlearning** score (high = looks unlearned), as the IAM code's keys
(iam-spec 4): membership scores of Carlini's LiRA are negated, RMIA's are turned into 1 - score.

Two input modes:

* **logits** ``[N, C]`` per model (shadows ``[K, N, C]``) with integer ``labels`` [N]: every
  attack is available (RMIA and EMIA-P also need the ``population`` outputs, UnLeak its shadow
  data, IAM-Off the shadows' outputs on their own training sets or the constant).
* **per-sample signals** ``[N]`` per model (shadows ``[K, N]``), e.g. LLM losses turned into
  p = exp(-loss): ``signal="prob"`` reads them as probabilities of the true label (IAM maps them
  with the normalised Gumbel map, LiRA with log(p / (1 - p))); ``signal="raw"`` uses the values as
  given (larger = fits better). The attacks that need logits (EMIA, RMIA, UnLeak) are unavailable.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmu.attacks import baselines, iam, lira, metrics, rmia, signals
from jaxmu.errors import InputError

# name -> (paper name, what it needs beyond original/target/shadows)
ATTACKS = {
    "iam_on": ("IAM-On", ()),
    "iam_off": ("IAM-Off", ("off",)),
    "iam_gauss_prob": ("IAM-variant: prob, Gaussian (online)", ("logits",)),
    "iam_gauss_tsm": ("IAM-variant: taylor-soft-margin, Gaussian (online)", ("logits",)),
    "iam_gauss_phi": ("IAM-variant: Carlini logit, Gaussian (online)", ()),
    "iam_gauss_loss": ("IAM-variant: -CE loss, Gaussian (online)", ("logits",)),
    "iam_on_wo_norm": ("IAM-On w/o [0,1] normalisation", ()),
    "lira_on": ("LiRA-On", ()),
    "lira_off": ("LiRA-Off", ()),
    "carlini_lira_on": ("LiRA-On (Carlini)", ()),
    "carlini_lira_off": ("LiRA-Off (Carlini)", ()),
    "rmia_on": ("RMIA-On", ("logits", "population", "population_in")),
    "rmia_off": ("RMIA-Off", ("logits", "population")),
    "emia_r": ("EMIA-R", ("logits",)),
    "emia_p": ("EMIA-P", ("logits", "population")),
    "update": ("UpdateAtk", ()),
    "unleak": ("UnLeak", ("logits", "unleak")),
    "random": ("Random", ()),
}
# Per-dataset RMIA settings of the IAM code (iam-spec 4.1): offline a and temperature tau.
RMIA_SETTINGS = {"cifar10": (0.33, 2.0), "cinic10": (0.33, 2.0), "cifar100": (0.6, 1.0),
                 "purchase100": (0.2, 2.0), "texas100": (0.2, 2.0), "location": (0.2, 2.0)}
SIGNALS = ("prob", "raw")
# Table 1's IAM variants (iam-spec 7.1, 10.1 "extra": ``p_IPapprox_{proby,tsm,carlogi,losy}_simp``):
# attack -> (signal: p_y, taylor-soft-margin, phi, -CE; IAM distribution), online with the
# original model's signal as the fit. ``iam_gauss_phi`` is `SCORING_FUNCTIONS`' gauss_on.
IAM_VARIANTS = {"iam_gauss_prob": ("prob", "norm"), "iam_gauss_tsm": ("tsm", "norm"),
                "iam_gauss_phi": ("phi", "norm"), "iam_gauss_loss": ("neg_loss", "norm")}
# The vision IAM-On's Gumbel-map epsilons (iam-spec 2); the reference's Purchase/Texas IAM-Off and
# un-normalised IAM-On use (0.1, 1e-6), with IAM-Off's targets and shadows normalised by these.
IAM_EPS = (1e-2, 1e-5)


class Population(NamedTuple):
  """Outputs on the population set Z that RMIA and EMIA-P need (iam-spec 4.1).

  target [Z, C] and shadows [K, Z, C] (required), labels [Z], and ``inside`` [Z, C]: the IN
  reference on Z for RMIA-On (the IAM code's "ref_in" model trained on Z; optional).
  """
  target: Any
  shadows: Any
  labels: Any
  inside: Any = None


class UnleakData(NamedTuple):
  """What UnLeak's attack model trains on (iam-spec 4.2), all on the shadow pool's P samples:
  ``origin`` [P, C] logits of the shadow-origin model, ``shadows`` [K, P, C] logits of the
  shadows, ``held_out`` [K, P] bool (True where sample p was not in shadow k's training set)."""
  origin: Any
  shadows: Any
  held_out: Any


class AuditResult(NamedTuple):
  """``scores``: {attack: [N] unlearning scores}; ``metrics``: {attack: `iam.bin_ui` dict} when a
  forget mask was given, else None."""
  scores: dict[str, np.ndarray]
  metrics: dict[str, dict] | None


# The signals of iam-spec 2 as one compiled program per shape (eagerly, every op compiles alone).
@functools.partial(jax.jit, static_argnames=("eps", "normalize", "norm_eps"))
def _gumbel_signal(z, y, eps=IAM_EPS, normalize=True, norm_eps=None):
  """IAM's signal r_hat(p_y) (or r(p_y) without ``normalize``) of logits, `signals.gumbel_map`."""
  return signals.gumbel_map(signals.true_class_prob(z, y), *eps, normalize, norm_eps)


_scaled_logit = jax.jit(signals.scaled_logit)
_tsm = jax.jit(signals.taylor_soft_margin)
_SIGNALS = {"prob": jax.jit(signals.true_class_prob), "phi": _scaled_logit, "gumbel": _gumbel_signal,
            "neg_loss": jax.jit(lambda z, y: -signals.cross_entropy(z, y))}


def _signal(name, logits, labels, temperature):
  """The signal ``name`` (`_SIGNALS` or "tsm" at ``temperature``) of logits [..., C]."""
  return _tsm(logits, labels, temperature) if name == "tsm" else _SIGNALS[name](logits, labels)


def _shape_error(name, got, want):
  return InputError(f"{name} has shape {tuple(got)}; expected {want}. Pass logits [N, C] per model "
                    "(shadows [K, N, C]) with labels [N], or per-sample signals [N] (shadows [K, N])")


def _floats(x, name):
  """``x`` as a float numpy array of at least 32 bits (float16/bfloat16 widened, integers
  converted) with only finite values; a ValueError naming ``name`` otherwise."""
  a = np.asarray(x)
  if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool
                               or "bfloat16" in str(a.dtype)):
    raise InputError(f"{name} must hold numbers; got dtype {a.dtype}")
  a = a.astype(np.float64 if a.dtype == np.float64 else np.float32)
  if a.size and not np.isfinite(a).all():
    bad = int((~np.isfinite(a)).sum())
    raise InputError(f"{name} holds {bad} NaN or infinite value(s) of {a.size}: the model's "
                     "outputs must be finite (a diverged model cannot be audited)")
  return a


def _int_labels(labels, name, shape, c):
  """Integer labels of ``shape`` in [0, c)."""
  labels = np.asarray(labels)
  if labels.shape != tuple(shape) or not np.issubdtype(labels.dtype, np.integer):
    raise InputError(f"{name} must be integers of shape {tuple(shape)}; got {labels.dtype} "
                     f"{labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= c):
    raise InputError(f"{name} must lie in [0, {c}) (C = {c} classes of the logits); got values "
                     f"in [{labels.min()}, {labels.max()}]")
  return labels


def _check_inputs(original, target, shadows, labels):
  """Returns (mode, arrays as float numpy) after checking that every shape agrees."""
  original, target, shadows = (_floats(x, name) for x, name in
                               ((original, "original"), (target, "target"), (shadows, "shadows")))
  if target.ndim in (1, 2) and target.shape[0] == 0:
    raise InputError("target has no query samples (N = 0); pass outputs on at least one sample")
  if target.ndim == 2:
    n, c = target.shape
    if original.shape != (n, c):
      raise _shape_error("original", original.shape, f"[N, C] = {(n, c)} like target")
    if shadows.ndim != 3 or shadows.shape[1:] != (n, c) or shadows.shape[0] == 0:
      raise _shape_error("shadows", shadows.shape, f"[K >= 1, N, C] = [K, {n}, {c}]")
    if labels is None:
      raise InputError("labels [N] are needed to read logits; pass labels=")
    labels = _int_labels(labels, "labels", (n,), c)
    return "logits", original, target, shadows, labels
  if target.ndim == 1:
    n = target.shape[0]
    if original.shape != (n,):
      raise _shape_error("original", original.shape, f"[N] = ({n},) like target")
    if shadows.ndim != 2 or shadows.shape[1] != n or shadows.shape[0] == 0:
      raise _shape_error("shadows", shadows.shape, f"[K >= 1, N] = [K, {n}]")
    return "signal", original, target, shadows, None
  raise _shape_error("target", target.shape, "[N, C] (logits) or [N] (signals)")


def audit(original, target, shadows, labels=None, forget_mask=None, *, attacks=None,
          population: Population | None = None, shadow_train: Sequence | None = None,
          off_constant: float | None = None, unleak: UnleakData | Any = None,
          signal: str = "prob", one_sided_lira: bool = False, rmia_a: float = 0.33,
          temperature: float = 2.0, gamma: float = 2.0, num_interp: int = 100,
          off_eps: Sequence[float] = IAM_EPS, norm_eps: Sequence[float] | None = None,
          levels=metrics.LEVELS, num_bootstrap: int = 0, seed: int = 0) -> AuditResult:
  """Scores every query sample with IAM and the baselines (iam-spec 3, 4); BinUI metrics (9.1).

  Args:
    original: [N, C] logits (or [N] signals) of the model before unlearning on the N queries.
    target: the audited (unlearned) model's outputs on the same queries, same shape.
    shadows: [K, N, C] (or [K, N]) outputs of K >= 1 shadow OUT models on the queries.
    labels: [N] integer labels (logits mode).
    forget_mask: [N] bool/0-1, True for deletion requests; with it, `iam.bin_ui` metrics per
      attack (positives = retained samples, scored by 1 - unlearning score).
    attacks: names from `ATTACKS` (default: every attack the given inputs allow); a named
      attack whose inputs are missing is an error that says what to pass.
    population: `Population` outputs on Z (RMIA-Off/On, EMIA-P).
    shadow_train: IAM-Off's inputs, one (logits [T_k, C], labels [T_k]) pair per shadow: its
      outputs on its own training samples (iam-spec 3.1). Or give ``off_constant`` directly
      (in the IAM signal's units; required for IAM-Off in signal mode).
    unleak: a fitted UnLeak classifier (`baselines.unleak_attack_model`) or `UnleakData`.
    signal: signal mode only: "prob" or "raw" (module docstring).
    one_sided_lira: IAM's LiRA-Off for class unlearning types (iam-spec 12.7): one-sided.
    rmia_a, temperature, gamma: RMIA's offline a, taylor-soft-margin temperature (also of
      ``iam_gauss_tsm``) and gamma (`RMIA_SETTINGS` holds the IAM code's per-dataset values;
      default CIFAR-10).
    num_interp: IAM's A. levels, num_bootstrap: passed to `metrics.roc_metrics`.
    off_eps: (eps1, eps2) of the Gumbel map for IAM-Off and ``iam_on_wo_norm`` (iam-spec 2;
      IAM-On always uses `IAM_EPS`). The reference's Purchase/Texas: (0.1, 1e-6).
    norm_eps: the epsilons whose r(0) and r(1) normalise IAM-Off's target and shadow signals
      (None: ``off_eps``); IAM-Off's constant is always normalised with ``off_eps``. The
      reference's Purchase/Texas: `IAM_EPS` (its mismatch, iam-spec 12.5).
    seed: the Random baseline's numpy seed and UnLeak's classifier seed.

  Returns: `AuditResult`.

  Follows iam-spec 3-4 through the primitives, and Table 1's extra rows (iam-spec 10.1):
  `IAM_VARIANTS` and ``iam_on_wo_norm`` (IAM-On on the un-normalised r(p_y) with ``off_eps``).
  The Carlini family (LiRA-On/Off (Carlini)) is Carlini et al.'s LiRA with the global variance of
  Carlini's code (`lira.carlini_lira_online` with ``fix_variance="global"``): offline one-sided
  over the OUT shadows, online with the original model as the IN observation. Deviation: the IAM
  code has only its own LiRA family; the Carlini rows are extra.
  """
  mode, original, target, shadows, labels = _check_inputs(original, target, shadows, labels)
  if signal not in SIGNALS:
    raise InputError(f"signal must be one of {SIGNALS}; got {signal!r}")
  off_eps = tuple(float(e) for e in off_eps)
  norm_eps = off_eps if norm_eps is None else tuple(float(e) for e in norm_eps)
  n, k = target.shape[0], shadows.shape[0]
  if forget_mask is not None:
    forget_mask = np.asarray(forget_mask)
    if forget_mask.shape != (n,):
      raise InputError(f"forget_mask has shape {forget_mask.shape}; expected ({n},)")
    if not np.isin(forget_mask, (0, 1)).all():
      raise InputError("forget_mask must be bool or 0/1 (1 = deletion request)")
    if forget_mask.all() or not forget_mask.any():
      which = "every" if forget_mask.all() else "no"
      raise InputError(f"forget_mask marks {which} sample as a deletion request: the metrics "
                       "compare forgotten (1) with retained (0) samples, so mark both kinds, or "
                       "leave the mask out for scores only")
  if population is not None:  # every input is checked before any score is computed
    population = _check_population(population, k)
  if shadow_train is not None and mode == "logits":
    for j, pair in enumerate(shadow_train):
      if len(pair) != 2:
        raise InputError(f"shadow_train[{j}] must be a (logits [T, C], labels [T]) pair")
      z = _floats(pair[0], f"shadow_train_logits[{j}]")
      if z.ndim == 2:
        _int_labels(pair[1], f"shadow_train_labels[{j}]", z.shape[:1], z.shape[1])
  available = {"off": shadow_train is not None or off_constant is not None,
               "logits": mode == "logits", "unleak": unleak is not None,
               "population": population is not None,
               "population_in": population is not None and population.inside is not None}
  if attacks is None:
    attacks = [a for a, (_, needs) in ATTACKS.items() if all(available[r] for r in needs)]
  for a in attacks:
    if a not in ATTACKS:
      raise InputError(f"unknown attack {a!r}; known: {', '.join(ATTACKS)}")
    missing = [r for r in ATTACKS[a][1] if not available[r]]
    if missing:
      raise InputError(f"attack {a!r} needs {_NEEDS_TEXT[missing[0]]}")

  # The signals each family reads (iam-spec 2).
  if mode == "logits":
    phi = lambda z: _scaled_logit(z, labels)
  elif signal == "prob":
    _check_prob(original, target, shadows)
    phi = lambda p: jnp.log(jnp.clip(p, 1e-30, 1.0)) - jnp.log(jnp.clip(1.0 - p, 1e-30, 1.0))
  else:
    phi = jnp.asarray

  def gumbel(x, eps=IAM_EPS, normalize=True, norm_eps=None):
    if mode == "logits":
      return _gumbel_signal(x, labels, eps, normalize, norm_eps)
    return signals.gumbel_map(x, *eps, normalize, norm_eps) if signal == "prob" else jnp.asarray(x)

  scores = {}
  if "iam_on" in attacks or "iam_off" in attacks:
    s_target, s_sh = gumbel(target), gumbel(shadows)
    if "iam_on" in attacks:
      scores["iam_on"] = iam.iam_score(s_target, gumbel(original), s_sh, num_interp)
    if "iam_off" in attacks:
      if (off_eps, norm_eps) != (IAM_EPS, IAM_EPS):
        s_target, s_sh = (gumbel(x, off_eps, True, norm_eps) for x in (target, shadows))
      c = off_constant if off_constant is not None else _off_constant(shadow_train, mode, off_eps)
      scores["iam_off"] = iam.iam_score(s_target, c, s_sh, num_interp)
  if "iam_on_wo_norm" in attacks:
    raw = lambda x: gumbel(x, off_eps, False)
    scores["iam_on_wo_norm"] = iam.iam_score(raw(target), raw(original), raw(shadows), num_interp)
  for a in (a for a in attacks if a in IAM_VARIANTS):
    name, dist = IAM_VARIANTS[a]
    f = phi if name == "phi" else functools.partial(_signal, name, labels=labels,
                                                    temperature=temperature)
    scores[a] = iam.iam_score(f(target), f(original), f(shadows), num_interp, dist=dist)
  if any(a in attacks for a in ("lira_on", "lira_off", "carlini_lira_on", "carlini_lira_off",
                                "update")):
    p_target, p_original, p_sh = phi(target), phi(original), phi(shadows)
    if "lira_on" in attacks:
      scores["lira_on"] = lira.iam_reference_lira_online(p_target, p_original, p_sh)
    if "lira_off" in attacks:
      scores["lira_off"] = lira.iam_reference_lira_offline(p_target, p_sh, one_sided=one_sided_lira)
    if "carlini_lira_on" in attacks:
      refs = jnp.concatenate([p_sh, p_original[None]])
      in_mask = np.zeros(refs.shape, bool)
      in_mask[-1] = True
      scores["carlini_lira_on"] = -lira.carlini_lira_online(p_target, refs, in_mask,
                                                            fix_variance="global")
    if "carlini_lira_off" in attacks:
      scores["carlini_lira_off"] = -lira.carlini_lira_offline(p_target, p_sh,
                                                              fix_variance="global",
                                                              one_sided=True)
    if "update" in attacks:
      scores["update"] = baselines.update_attack(p_target, p_original, p_sh)
  if "emia_r" in attacks:
    z_y = lambda z: jnp.take_along_axis(jnp.asarray(z), jnp.asarray(labels)[:, None], -1)[..., 0]
    scores["emia_r"] = baselines.emia_reference(z_y(target), jnp.stack([z_y(s) for s in shadows]))
  if any(a in attacks for a in ("rmia_on", "rmia_off", "emia_p")):
    pop = _check_population(population, k)
    tsm = lambda z, y: _tsm(z, y, temperature)
    tx, tz = tsm(target, labels), tsm(pop.target, pop.labels)
    sx, sz = tsm(shadows, labels), tsm(pop.shadows, pop.labels)
    if "rmia_off" in attacks:
      scores["rmia_off"] = 1.0 - rmia.rmia_offline(tx, tz, sx, sz, rmia_a, gamma)
    if "rmia_on" in attacks:
      scores["rmia_on"] = 1.0 - rmia.rmia_online(tx, tz, sx, sz, tsm(original, labels),
                                                 tsm(pop.inside, pop.labels), gamma)
    if "emia_p" in attacks:
      pop_z_y = np.take_along_axis(pop.target, pop.labels[:, None], -1)[:, 0]
      z_y = np.take_along_axis(target, labels[:, None], -1)[:, 0]
      scores["emia_p"] = baselines.emia_population(z_y, pop_z_y)
  if "unleak" in attacks:
    model = unleak if not isinstance(unleak, UnleakData) else unleak_model(unleak, seed)
    scores["unleak"] = baselines.unleak_score(model, _softmax(original), _softmax(target))
  if "random" in attacks:
    scores["random"] = np.random.default_rng(seed).random(n)
  scores = {a: np.asarray(scores[a], np.float64) for a in attacks}
  if forget_mask is None:
    return AuditResult(scores, None)
  return AuditResult(scores, {a: iam.bin_ui(s, forget_mask.astype(np.int64), levels=levels,
                                            num_bootstrap=num_bootstrap)
                              for a, s in scores.items()})


# Table 5's scoring functions (iam-spec 10.4): key -> (paper name, signal, IAM distribution);
# the shadow-free rows (no distribution) name their `baselines.simple_scores` key.
SCORING_FUNCTIONS = {
    "prob": ("Prob: -p_y, no shadow", "proby", None),
    "tsm": ("TSM: -taylor-soft-margin, no shadow", "tsm", None),
    "loss": ("Loss: cross-entropy, no shadow", "loss", None),
    "ecdf_off": ("ECDF-Off", "prob", "ecdf"),
    "kde_off": ("KDE-Off", "prob", "kde"),
    "beta_off": ("Bayes (Beta)-Off", "prob", "beta"),
    "gauss_off": ("Gauss-Off, Carlini logit", "phi", "norm"),
    "gumbel_off": ("Gumbel-Off = IAM-Off", "gumbel", "gumbel"),
    "ecdf_on": ("ECDF-On", "prob", "ecdf"),
    "kde_on": ("KDE-On", "prob", "kde"),
    "beta_on": ("Bayes (Beta)-On", "prob", "beta"),
    "gauss_on": ("Gauss-On, Carlini logit", "phi", "norm"),
    "gumbel_on": ("Gumbel-On = IAM-On", "gumbel", "gumbel"),
}


def scoring_functions(original, target, shadows, labels, shadow_train, *, temperature=2.0,
                      num_interp=100) -> dict[str, np.ndarray]:
  """Table 5's ablation of IAM's scoring function (iam-spec 4.3, 10.4): {key: [N] unlearning
  score} for every key of `SCORING_FUNCTIONS`, from logits as `audit` takes them.

  The shadow-free scores are `baselines.simple_scores` of the target; the others are
  `iam.iam_score` with the named distribution on the named signal (p_y, Carlini's logit phi, or
  IAM's normalised Gumbel map of p_y), online with the original model's signal as the fitting
  reference, offline with the mean over shadows of each shadow's mean signal on its own training
  data (``shadow_train``: one (logits, labels) pair per shadow). Gumbel-On/Off are IAM-On/Off.

  Deviation: the reference's ECDF / KDE / Beta rows read Carlini logits for the shadows and p_y
  for the target (iam-spec 12.17), which explains their low AUCs there; here every model's signal
  is p_y, the evident intent.
  """
  _, original, target, shadows, labels = _check_inputs(original, target, shadows, labels)
  if shadows.ndim != 3:
    raise InputError("scoring_functions needs logits [N, C] per model with labels [N]")
  simple = baselines.simple_scores(target, labels, temperature)
  out = {}
  for key, (_, signal, dist) in SCORING_FUNCTIONS.items():
    if dist is None:
      out[key] = np.asarray(simple[signal], np.float64)
      continue
    f = functools.partial(_signal, signal, temperature=temperature)
    if key.endswith("_on"):
      fit = f(original, labels)
    else:
      fit = iam.iam_off_constant([f(np.asarray(z), np.asarray(y)) for z, y in shadow_train])
    out[key] = np.asarray(iam.iam_score(f(target, labels), fit, f(shadows, labels), num_interp,
                                        dist=dist), np.float64)
  return out


def eps_sensitivity(original, target, shadows, labels, shadow_train=None, *, eps_pairs,
                    num_interps, attacks=("iam_on", "iam_off")) -> dict[tuple, np.ndarray]:
  """IAM's sensitivity to its Gumbel-map epsilons and interpolation count A (iam-spec 10.5):
  {(attack, eps1, eps2, A): [N] unlearning score} for ``attacks`` in iam_on / iam_off, every
  (eps1, eps2) of ``eps_pairs`` and every A of ``num_interps``, from logits as `audit` takes them.

  Each signal (target, original, shadows and, for IAM-Off, the shadows' own training outputs
  ``shadow_train`` behind the constant) is r_hat(p_y) normalised with its own epsilons, so at
  (`IAM_EPS`, A) the scores are `audit`'s iam_on / iam_off (with off_eps = norm_eps = `IAM_EPS`)
  bit for bit; the affine normalisation leaves the Gumbel scores unchanged at any epsilons."""
  _, original, target, shadows, labels = _check_inputs(original, target, shadows, labels)
  if shadows.ndim != 3:
    raise InputError("eps_sensitivity needs logits [N, C] per model with labels [N]")
  unknown = set(attacks) - {"iam_on", "iam_off"}
  if unknown:
    raise InputError(f"eps_sensitivity scores iam_on and iam_off; got {sorted(unknown)}")
  if "iam_off" in attacks and shadow_train is None:
    raise InputError(f"eps_sensitivity's iam_off needs {_NEEDS_TEXT['off']}")
  out = {}
  for eps in eps_pairs:
    eps = tuple(float(e) for e in eps)
    s_target, s_sh = (_gumbel_signal(x, labels, eps) for x in (target, shadows))
    fits = {"iam_on": lambda: _gumbel_signal(original, labels, eps),
            "iam_off": lambda: _off_constant(shadow_train, "logits", eps)}
    for attack in attacks:
      fit = fits[attack]()
      for a in num_interps:
        out[(attack, *eps, int(a))] = np.asarray(iam.iam_score(s_target, fit, s_sh, int(a)))
  return out


_NEEDS_TEXT = {
    "off": "shadow_train= (each shadow's logits and labels on its own training set) or off_constant=",
    "logits": "logits [N, C] with labels, not per-sample signals",
    "population": "population=Population(target, shadows, labels) (outputs on the population set)",
    "population_in": "population=Population(..., inside=) (the IN reference model on the population)",
    "unleak": "unleak= (a fitted UnLeak model or UnleakData(origin, shadows, held_out))",
}


def _check_prob(*arrays):
  for a in arrays:
    if np.nanmin(a) < 0 or np.nanmax(a) > 1:
      raise InputError("signal='prob' needs probabilities in [0, 1]; use signal='raw' for other "
                       "per-sample signals")


def _off_constant(shadow_train, mode, eps):
  """IAM-Off's c from the shadows' outputs on their own training data (iam-spec 3.1), each
  signal normalised with its own epsilons ``eps`` (iam-spec 12.5)."""
  if mode != "logits":
    raise InputError("in signal mode give IAM-Off's constant as off_constant=")
  means = []
  for k, pair in enumerate(shadow_train):
    if len(pair) != 2:
      raise InputError(f"shadow_train[{k}] must be a (logits [T, C], labels [T]) pair")
    z, y = _floats(pair[0], f"shadow_train_logits[{k}]"), np.asarray(pair[1])
    if z.ndim != 2 or y.shape != z.shape[:1]:
      raise InputError(f"shadow_train[{k}]: logits {z.shape} and labels {y.shape} must be [T, C], [T]")
    y = _int_labels(y, f"shadow_train_labels[{k}]", z.shape[:1], z.shape[1])
    means.append(_gumbel_signal(z, y, eps))
  return iam.iam_off_constant(means)


def _check_population(population, k):
  target, shadows = (_floats(x, f"population_{name}") for x, name in
                     zip(population[:2], ("target", "shadows")))
  labels = np.asarray(population.labels)
  z = target.shape[0] if target.ndim == 2 else -1
  if target.ndim != 2 or shadows.shape != (k, z, target.shape[1]) or labels.shape != (z,):
    raise InputError(f"population: target {target.shape}, shadows {shadows.shape}, labels "
                     f"{labels.shape} must be [Z, C], [K={k}, Z, C], [Z]")
  labels = _int_labels(labels, "population_labels", (z,), target.shape[1])
  inside = population.inside
  if inside is not None:
    inside = _floats(inside, "population_in")
    if inside.shape != target.shape:
      raise InputError(f"population.inside has shape {inside.shape}; expected {target.shape}")
  return Population(target, shadows, labels, inside)


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def unleak_model(data: UnleakData, seed: int = 0):
  """UnLeak's attack classifier (iam-spec 4.2) from the shadow-origin and shadow logits."""
  origin, shadows = np.asarray(data.origin), np.asarray(data.shadows)
  return baselines.unleak_attack_model(_softmax(origin), _softmax(shadows), data.held_out, seed)


def summary_rows(result: AuditResult, levels=(1e-3, 1e-2, 1e-1)) -> list[dict]:
  """One row per attack: AUC, balanced accuracy, TPR at FPR and TNR at FNR (iam-spec 13)."""
  if result.metrics is None:
    raise InputError("no metrics: call audit(..., forget_mask=) to evaluate the scores")
  rows = []
  for a, m in result.metrics.items():
    row = {"attack": a, "name": ATTACKS[a][0], "auc": m["auc"],
           "balanced_accuracy": m["balanced_accuracy"]}
    row.update({f"tpr@{lv:g}": m["tpr_at_fpr"][lv] for lv in levels})
    row.update({f"tnr@{lv:g}": m["tnr_at_fnr"][lv] for lv in levels})
    row.update({"score_forgotten": m["score_forgotten_mean"],
                "score_retained": m["score_retained_mean"]})
    rows.append(row)
  return rows


def load_file(path) -> dict[str, np.ndarray]:
  """Arrays of an audit file: an .npz, or a directory of ``<key>.npy`` files (keys: `FILE_KEYS`)."""
  import pathlib
  path = pathlib.Path(path)
  if path.is_dir():
    arrays = {p.stem: _read(p, np.load) for p in sorted(path.glob("*.npy"))}
    if not arrays:
      raise FileNotFoundError(f"{path}: the directory holds no <key>.npy files")
  elif path.suffix == ".npz" and path.is_file():
    arrays = _read(path, lambda p: dict(np.load(p)))
  else:
    raise FileNotFoundError(f"{path}: expected an .npz file or a directory of <key>.npy files")
  unknown = set(arrays) - set(FILE_KEYS)
  if unknown:
    raise InputError(f"{path}: unknown keys {sorted(unknown)}; known: {', '.join(FILE_KEYS)}")
  missing = [k for k in ("original", "target", "shadows") if k not in arrays]
  if missing:
    raise InputError(f"{path}: missing keys {missing}; an audit file needs original, target, "
                     "shadows (and labels for logits)")
  return arrays


def _read(path, load):
  """``load(path)`` with NumPy's errors on an empty, truncated or foreign file as one message."""
  import zipfile
  try:
    return load(path)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
    raise InputError(f"{path}: not a readable NumPy file ({'empty' if path.stat().st_size == 0 else type(e).__name__}); "
                     "write it with numpy.savez / numpy.save") from e


FILE_KEYS = {
    "original": "[N, C] logits (or [N] signals) of the model before unlearning on the queries",
    "target": "[N, C] / [N]: the audited (unlearned) model on the same queries",
    "shadows": "[K, N, C] / [K, N]: K shadow OUT models on the queries",
    "labels": "[N] int: true labels (logits mode)",
    "forget": "[N] 0/1: deletion requests (optional; enables the metrics)",
    "population_target": "[Z, C]: the audited model on the population set (RMIA, EMIA-P)",
    "population_shadows": "[K, Z, C]: the shadows on the population set",
    "population_labels": "[Z] int",
    "population_in": "[Z, C]: an IN model trained on the population set (RMIA-On)",
    "shadow_train_logits": "[K, T, C]: each shadow on its own training samples (IAM-Off)",
    "shadow_train_labels": "[K, T] int",
    "off_constant": "scalar: IAM-Off's constant, instead of the two above",
}


def audit_file(arrays: Mapping[str, np.ndarray], **kwargs) -> AuditResult:
  """`audit` on the arrays of `load_file`."""
  population = None
  if "population_target" in arrays:
    for key in ("population_shadows", "population_labels"):
      if key not in arrays:
        raise InputError(f"population_target given without {key}")
    population = Population(arrays["population_target"], arrays["population_shadows"],
                            arrays["population_labels"], arrays.get("population_in"))
  shadow_train = None
  if "shadow_train_logits" in arrays:
    if "shadow_train_labels" not in arrays:
      raise InputError("shadow_train_logits given without shadow_train_labels")
    logits, labels = arrays["shadow_train_logits"], arrays["shadow_train_labels"]
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
      raise InputError(f"shadow_train_logits {logits.shape} and shadow_train_labels "
                       f"{labels.shape} must be [K, T, C] and [K, T]")
    shadow_train = list(zip(logits, labels))
  off = arrays.get("off_constant")
  return audit(arrays["original"], arrays["target"], arrays["shadows"], arrays.get("labels"),
               arrays.get("forget"), population=population, shadow_train=shadow_train,
               off_constant=None if off is None else float(off), **kwargs)
