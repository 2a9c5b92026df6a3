"""The attacks of an IAM audit on its stored signals (`jaxmu.attacks.audit`, iam-spec 7): per
shadow group, unlearning scores pooled over the runs of one unlearning type, and the table rows of
their metrics. No training and no stages: `jaxmu.pipelines.iam` calls it from its stages."""

from __future__ import annotations

import numpy as np

from jaxmu.attacks import iam
from jaxmu.attacks.audit import (SCORING_FUNCTIONS, Population, UnleakData, audit,
                                 eps_sensitivity, scoring_functions, unleak_model)
from jaxmu.report.iam import LEVELS


def cell_seed(seed, group, r) -> int:
  """The audit's seed (the Random baseline's draw) of run ``r`` with shadow group ``group``, one
  per (K, group, run) cell of the sweep (K = len(group); K = 1: seed + 1000 group[0] + r)."""
  return seed + 1_000_000 * (len(group) - 1) + 1000 * group[0] + r


class SignalAudit:
  """The signals stage's arrays with what every audit call shares: labels, the shadows' held-out
  masks and training positions, UnLeak models fitted once per shadow group."""

  def __init__(self, config, runs, parts, labels, shadow_labels, signals):
    self.config, self.runs, self.parts, self.signals = config, runs, parts, signals
    order = np.argsort(parts["shadow_pool"])
    self.train_pos = order[np.searchsorted(parts["shadow_pool"][order], parts["shadow_train"])]
    self.held_out = np.ones((config.num_shadows, len(parts["shadow_pool"])), bool)
    np.put_along_axis(self.held_out, self.train_pos, False, axis=1)
    self.all_labels = np.asarray(labels)
    self.labels = self.all_labels[parts["pool"]]
    self.shadow_labels = np.asarray(shadow_labels)[parts["shadow_pool"]]
    self._unleak_models = {}

  def flags(self, run_ids) -> np.ndarray:
    """The forget flags of runs ``run_ids``, concatenated (1 = forgotten)."""
    return np.concatenate([self.parts[f"flags_{r}"] for r in run_ids])

  def original_logits(self, r):
    """Run r's original model on the queries: its own, or the shared one."""
    return self.signals["query_original"][r if self.config.original_per_seed else 0]

  def shadow_train(self, group):
    """IAM-Off's inputs for a shadow group: each shadow's logits and labels on its own training
    samples."""
    sig = self.signals
    return [(sig["pool_shadows"][k][self.train_pos[k]], self.shadow_labels[self.train_pos[k]])
            for k in group]

  def scores(self, group, run_ids, attacks, targets=None):
    """`audit` of runs ``run_ids`` with one shadow group; unlearning scores pooled over the runs
    {attack: [len(run_ids) * N]}. ``targets``: {run: [N, C]} target logits and optionally
    {("pop", run): [P, C]} population logits instead of the retrained models'."""
    c, sig = self.config.audit, self.signals
    model = None
    if "unleak" in attacks:  # fitted once per shadow group
      key = tuple(group)
      if key not in self._unleak_models:
        self._unleak_models[key] = unleak_model(UnleakData(
            sig["pool_origin"], sig["pool_shadows"][group], self.held_out[group]), c.seed)
      model = self._unleak_models[key]
    shadow_train = self.shadow_train(group)
    targets = targets or {}
    pooled = {a: [] for a in attacks}
    for r in run_ids:
      target = targets.get(r, sig["query_retrain"][r])
      population = Population(targets.get(("pop", r), sig["pop_retrain"][r]),
                              sig["pop_shadows"][r][group],
                              self.all_labels[self.parts[f"val_{r}"]], sig["pop_ref_in"][r])
      result = audit(self.original_logits(r), target, sig["query_shadows"][group], self.labels,
                     attacks=attacks, population=population, shadow_train=shadow_train,
                     unleak=model, one_sided_lira=self.runs[r].forget != "set_random",
                     rmia_a=c.rmia_a, temperature=c.temperature, gamma=c.gamma,
                     num_interp=c.num_interp, off_eps=tuple(c.off_eps),
                     norm_eps=tuple(c.norm_eps), seed=cell_seed(c.seed, group, r))
      for a in attacks:
        pooled[a].append(result.scores[a])
    return {a: np.concatenate(v) for a, v in pooled.items()}

  def scoring_functions(self, group, run_ids):
    """Every `SCORING_FUNCTIONS` score of the retrained targets of ``run_ids`` with one shadow
    group, pooled over the runs (Table 5)."""
    c, sig = self.config.audit, self.signals
    pooled = {key: [] for key in SCORING_FUNCTIONS}
    shadow_train = self.shadow_train(group)
    for r in run_ids:
      scores = scoring_functions(self.original_logits(r), sig["query_retrain"][r],
                                 sig["query_shadows"][group], self.labels, shadow_train,
                                 temperature=c.temperature, num_interp=c.num_interp)
      for key, v in scores.items():
        pooled[key].append(v)
    return {key: np.concatenate(v) for key, v in pooled.items()}

  def sensitivity(self, group, run_ids, eps_pairs, num_interps, attacks):
    """`eps_sensitivity` of the retrained targets of ``run_ids`` with one shadow group, pooled
    over the runs: {(attack, eps1, eps2, A): scores} (iam-spec 10.5)."""
    sig, pooled = self.signals, {}
    shadow_train = self.shadow_train(group)
    for r in run_ids:
      scores = eps_sensitivity(self.original_logits(r), sig["query_retrain"][r],
                               sig["query_shadows"][group], self.labels, shadow_train,
                               eps_pairs=eps_pairs, num_interps=num_interps, attacks=attacks)
      for key, v in scores.items():
        pooled.setdefault(key, []).append(v)
    return {key: np.concatenate(v) for key, v in pooled.items()}


def ks_statistic(a, b) -> float:
  """The two-sample Kolmogorov-Smirnov statistic sup_x |F_a(x) - F_b(x)| of two samples (their
  empirical CDFs, evaluated at every observed value)."""
  a, b = np.sort(np.ravel(a)), np.sort(np.ravel(b))
  x = np.concatenate([a, b])
  fa = np.searchsorted(a, x, side="right") / len(a)
  fb = np.searchsorted(b, x, side="right") / len(b)
  return float(np.max(np.abs(fa - fb)))


def bin_ui(scores, flags):
  """`iam.bin_ui` at the report's operating points, without bootstrap."""
  return iam.bin_ui(scores, flags.astype(np.int64), levels=LEVELS, num_bootstrap=0)


def metric_row(table, attack, k, group, m):
  """One CSV row of a `bin_ui` result."""
  return {"table": table, "attack": attack, "k": k, "group": group, "auc": m["auc"],
          "balanced_accuracy": m["balanced_accuracy"],
          **{f"tpr@{lv:g}": m["tpr_at_fpr"][lv] for lv in LEVELS},
          **{f"tnr@{lv:g}": m["tnr_at_fnr"][lv] for lv in LEVELS},
          "score_forgotten": m["score_forgotten_mean"], "score_retained": m["score_retained_mean"]}


def approx_rows(scores, flags, runs, run_ids, reference=None):
  """Table 8's read-out of one method's unlearning scores on runs ``run_ids`` (``flags``: their
  stacked forget flags): {"binui": `bin_ui` result, "membership": mean and std membership of
  forgotten and retained samples and, given the retrained models' scores ``reference``, the KS
  statistic between the method's and retrain's membership on forgotten (``ks_forgotten``) and on
  retained samples (``ks_retained``)} and the class-level rows per run and overall."""
  levels = iam.class_level_metrics(scores.reshape(flags.shape), flags)
  overall = levels["overall"]
  membership = {"member_forgotten": overall["mean_0"], "member_forgotten_std": overall["std_0"],
                "member_retained": overall["mean_1"], "member_retained_std": overall["std_1"]}
  if reference is not None:
    forgotten = flags.ravel().astype(bool)
    membership.update({f"ks_{name}": ks_statistic(1 - scores[mask], 1 - reference[mask])
                       for name, mask in (("forgotten", forgotten), ("retained", ~forgotten))})
  per_class = [{"run": r, "seed": runs[r].seed, "class": runs[r].cls, **values}
               for r, values in zip(run_ids, levels["runs"])]
  per_class.append({"run": "overall", "seed": "", "class": "", **overall})
  return {"binui": bin_ui(scores, flags.ravel()), "membership": membership}, per_class


def score_ui_or_nan(scores, degree):
  """`iam.score_ui`, or NaN metrics for an attack whose scores are constant (nothing to rank)."""
  if np.ptp(scores) == 0:
    nan = float("nan")
    return {"spearman": nan, "pearson": nan, "mse": nan, "kl": nan,
            "mse_per_column": [nan] * scores.shape[1]}
  return iam.score_ui(scores, degree)


def mean_metrics(per_loop):
  """The mean over start models of `iam.score_ui` results, as flat CSV columns (mse_b<b>)."""
  out = {m: float(np.mean([d[m] for d in per_loop])) for m in ("spearman", "pearson", "mse", "kl")}
  columns = np.mean([d["mse_per_column"] for d in per_loop], axis=0)
  return {**out, **{f"mse_b{b}": float(v) for b, v in enumerate(columns)}}
