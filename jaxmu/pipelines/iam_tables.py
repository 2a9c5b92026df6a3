"""Two stages of the IAM pipeline (`jaxmu.pipelines.iam`) that read its stored signals and models:
the epsilon / interpolation-count sensitivity (iam-spec 10.5) and Table 8, the approximate
unlearning methods (iam-spec 7.6, 8, 9.3-9.4). Each takes the pipeline object and returns its main
output path (or None for a stage the config leaves out)."""

from __future__ import annotations

import functools

import jax
import numpy as np

from jaxmu import checkpoint, report
from jaxmu import methods as methods_lib
from jaxmu.errors import ConfigError, Problem
from jaxmu.pipelines import common
from jaxmu.pipelines.iam_audit import approx_rows, bin_ui, metric_row
from jaxmu.pipelines.iam_setting import forget_types, runs_of, shadow_groups


# The scores Table 8 can read from a method's query logits alone (no population, no UnLeak data).
APPROX_ATTACKS = ("iam_on", "iam_on_wo_norm", "iam_off")


def sensitivity_grid(config) -> tuple[tuple, tuple]:
  """The sweep's (eps1, eps2) pairs and its A values: ``sensitivity.num_interp`` and the audit's
  own A (so the default cell is Table 1's IAM-On / IAM-Off), sorted."""
  s = config.get("sensitivity")
  if s is None or not s.eps:  # a config without the section: no sweep
    return (), ()
  eps = tuple(tuple(float(e) for e in pair) for pair in s.eps)
  return eps, tuple(sorted({int(a) for a in s.num_interp} | {int(config.audit.num_interp)}))


def sensitivity(pipe):
  """IAM-On/Off AUC of the retrained targets for every (eps1, eps2) and A (iam-spec 10.5), per
  unlearning type and the first ``sensitivity.groups`` K = 1 shadow groups, from the saved signals
  (no training): ``sensitivity.csv``."""
  c = pipe.config
  eps, num_interps = sensitivity_grid(c)
  if not eps:
    return None
  groups = shadow_groups(c.num_shadows, 1, min(c.sensitivity.groups, c.audit.max_groups))
  with pipe.wd.stage("sensitivity", config={"sensitivity": c.sensitivity, "a": num_interps},
                     deps=("signals",), outputs=("sensitivity.csv",)) as st:
    if not st.done:
      rows = []
      for forget in forget_types(c):
        run_ids = runs_of(pipe.runs, forget)
        flags = pipe.audit().flags(run_ids)
        for g, group in enumerate(groups):
          cells = pipe.audit().sensitivity(group, run_ids, eps, num_interps,
                                           tuple(c.sensitivity.attacks))
          for (attack, e1, e2, a), s in cells.items():
            rows.append({"table": "sensitivity", "forget": forget, "attack": attack, "eps1": e1,
                         "eps2": e2, "num_interp": a, "group": g, "auc": bin_ui(s, flags)["auc"]})
      report.write_csv(st.tmp / "sensitivity.csv", rows)
      st.commit()
  return pipe.wd.path("sensitivity.csv")


def check_approx(config) -> None:
  """A `ConfigError` (one line per problem, before anything trains) unless every name of
  ``approx.faithful`` is a method with a ``faithful`` hyper-parameter (names outside
  ``approx.methods`` are unused, so a trimmed method list keeps the preset's faithful list),
  ``approx.attack`` is one of `APPROX_ATTACKS`, the read-out thresholds lie in [0, 1] and the
  ``sensitivity`` section holds positive epsilon pairs, A >= 2, iam_on / iam_off and groups >= 1."""
  problems = []
  for name in config.approx.get("faithful", ()):
    try:
      method = methods_lib.get(name)
    except ValueError:
      problems.append(Problem("approx.faithful", f"unknown method {name!r}",
                              "name methods of approx.methods"))
      continue
    if "faithful" not in method.defaults:
      problems.append(Problem("approx.faithful", f"{name!r} has no faithful variant",
                              "list only methods with a `faithful` hyper-parameter"))
  attack = config.approx.get("attack", "iam_on")
  if attack not in APPROX_ATTACKS:
    problems.append(Problem("approx.attack", f"{attack!r} cannot score Table 8",
                            f"use one of {', '.join(APPROX_ATTACKS)}"))
  for field in ("margin", "auc_margin", "ks_threshold"):
    value = config.approx.get(field, 0.0)
    if not isinstance(value, (int, float)) or not 0 <= value <= 1:
      problems.append(Problem(f"approx.{field}", f"{value!r} is not in [0, 1]",
                              "give a membership / AUC / KS difference in [0, 1]"))
  problems += _sensitivity_problems(config)
  if problems:
    raise ConfigError(problems)


def _sensitivity_problems(config) -> list[Problem]:
  s = config.get("sensitivity")
  if s is None or not s.eps:
    return []
  out = []
  if any(len(pair) != 2 or not all(isinstance(e, (int, float)) and e > 0 for e in pair)
         for pair in s.eps):
    out.append(Problem("sensitivity.eps", f"{s.eps} holds a pair that is not two positive numbers",
                       "give (eps1, eps2) pairs, e.g. ((0.01, 1e-5), (0.1, 1e-3))"))
  if any(not isinstance(a, int) or a < 2 for a in s.num_interp):
    out.append(Problem("sensitivity.num_interp", f"{s.num_interp} holds an A below 2",
                       "give interpolation counts >= 2"))
  if not s.attacks or set(s.attacks) - {"iam_on", "iam_off"}:
    out.append(Problem("sensitivity.attacks", f"{s.attacks} is not a subset of iam_on, iam_off",
                       "name iam_on and/or iam_off"))
  if not isinstance(s.groups, int) or s.groups < 1:
    out.append(Problem("sensitivity.groups", f"{s.groups!r} is below 1", "give 1 or more"))
  return out


def approx_hparams(config, method: str) -> dict:
  """A Table 8 method's hyper-parameters: ``approx.hparams[method]``, with faithful=True where
  ``approx.faithful`` names it."""
  hparams = config.approx.hparams[method].to_dict() if method in config.approx.hparams else {}
  if method in {methods_lib.get(m).name for m in config.approx.get("faithful", ())}:
    hparams["faithful"] = True
  return hparams


def approx_label(config, method: str) -> str:
  """The method's name in Table 8: "<method>@faithful" for the reference-as-coded variant."""
  return f"{method}@faithful" if approx_hparams(config, method).get("faithful") else method


def approx(pipe, original_id: int):
  """IAM's approximate methods on every run's original (initialisations: ids ``original_id`` +
  i), scored with ``approx.attack`` (the reference's Table 8 key) per K = 1 shadow group, against
  the retrained models (Table 8)."""
  c, p = pipe.config, pipe.parts
  methods = tuple(methods_lib.get(m).name for m in c.approx.methods)
  if not methods:
    return None
  r, o, ids = len(pipe.runs), pipe.num_originals, original_id

  @functools.cache  # built once, by the first method that runs
  def make_context():
    stack = jax.tree.map(lambda x: x[np.arange(r) % o], pipe.restore("original", o))
    inits = pipe.initial(pipe.model, [ids + i % o for i in range(r)])
    return common.context(
        c, pipe.model, pipe.data, stack, inits, [p["pool"][~pipe.flags(i)] for i in range(r)],
        [p["pool"][pipe.flags(i)] for i in range(r)], [p[f"val_{i}"] for i in range(r)],
        range(r), pipe.dataset.num_classes, pipe.strategy, c.train.target_epochs)

  for method in methods:
    common.unlearn_stage(pipe.wd, f"approx_{method}", method, approx_hparams(c, method),
                         c.approx.seed, c, ("targets",), make_context)
  attack = c.approx.get("attack", "iam_on")
  with pipe.wd.stage("approx", config={"audit": c.audit, "attack": attack,
                                       "labels": [approx_label(c, m) for m in methods]},
                     deps=("signals",) + tuple(f"approx_{m}" for m in methods),
                     outputs=("approx.csv", "approx_class.csv")) as st:
    if not st.done:
      like = common.abstract_variables(pipe.model, r, pipe.input_shape)
      targets = {"retrain": None}
      for m in methods:
        variables = checkpoint.restore(pipe.wd.path("unlearned", m), like)
        targets[approx_label(c, m)] = dict(enumerate(pipe.logits(pipe.model, variables, p["pool"],
                                                                 pipe.query_data())))
      rows, class_rows = [], []
      for forget in forget_types(c):
        run_ids = runs_of(pipe.runs, forget)
        flags = np.stack([pipe.flags(i) for i in run_ids])
        for g, group in enumerate(shadow_groups(c.num_shadows, 1, c.audit.max_groups)):
          reference = None
          for name, logits in targets.items():  # retrain first: the others' reference
            s = pipe.audit().scores(group, run_ids, (attack,), targets=logits)[attack]
            reference = s if reference is None else reference
            row, per_class = approx_rows(s, flags, pipe.runs, run_ids, reference)
            rows.append({"forget": forget, **metric_row("approx", attack, 1, g, row["binui"]),
                         "method": name, **row["membership"]})
            class_rows += [{"table": "approx_class", "forget": forget, "method": name,
                            "group": g, **values} for values in per_class]
      report.write_csv(st.tmp / "approx.csv", rows)
      report.write_csv(st.tmp / "approx_class.csv", class_rows)
      st.commit()
  return pipe.wd.path("approx.csv")
