"""The audit entry point on synthetic Gaussian logits against direct calls of the primitives and
float64 NumPy; `jaxmu audit` on saved files, including bad ones."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import scipy.stats

import jaxmu.attacks
from jaxmu.attacks import baselines, iam, lira, metrics, rmia, signals
from jaxmu.attacks.audit import (ATTACKS, IAM_VARIANTS, SCORING_FUNCTIONS, Population, UnleakData,
                                 audit_file, eps_sensitivity, load_file, scoring_functions,
                                 summary_rows)

ROOT = Path(__file__).resolve().parents[1]
N, C, K, Z, P = 120, 4, 3, 40, 50


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, C, N)
  forget = np.zeros(N, bool)
  forget[rng.permutation(N)[:30]] = True
  original = rng.normal(size=(N, C)) + 3 * np.eye(C)[labels]  # fits every query
  target = rng.normal(size=(N, C)) + 3 * np.eye(C)[labels] * (~forget)[:, None]  # forgot some
  shadows = rng.normal(size=(K, N, C))
  pop = Population(rng.normal(size=(Z, C)), rng.normal(size=(K, Z, C)), rng.integers(0, C, Z),
                   rng.normal(size=(Z, C)))
  unleak = UnleakData(rng.normal(size=(P, C)), rng.normal(size=(K, P, C)), rng.random((K, P)) < 0.3)
  shadow_train = [(rng.normal(size=(20, C)) + 2 * np.eye(C)[y], y)
                  for y in rng.integers(0, C, (K, 20))]
  return dict(original=original, target=target, shadows=shadows, labels=labels, forget=forget,
              pop=pop, unleak=unleak, shadow_train=shadow_train)


@pytest.fixture(scope="module")
def result(inputs):
  d = inputs
  return jaxmu.attacks.audit(d["original"], d["target"], d["shadows"], d["labels"], d["forget"],
                             population=d["pop"], unleak=d["unleak"],
                             shadow_train=d["shadow_train"], rmia_a=0.6, temperature=1.0)


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_every_attack_scored_and_evaluated(result, inputs):
  assert set(result.scores) == set(ATTACKS)
  for name, s in result.scores.items():
    assert s.shape == (N,) and np.isfinite(s).all(), name
    m = result.metrics[name]
    # AUC of retained (positive) vs forgotten by 1 - score, independently with Mann-Whitney U.
    retained, forgotten = 1 - s[~inputs["forget"]], 1 - s[inputs["forget"]]
    u = scipy.stats.mannwhitneyu(retained, forgotten).statistic
    assert m["auc"] == pytest.approx(u / (retained.size * forgotten.size), abs=1e-12), name
  # The forgotten queries were made unfit: IAM detects them.
  assert result.metrics["iam_on"]["auc"] > 0.9 and result.metrics["iam_off"]["auc"] > 0.9
  rows = summary_rows(result)
  assert [r["attack"] for r in rows] == list(result.scores)


def test_iam_scores_equal_numpy_float64(result, inputs):
  d = inputs
  p = lambda z: _softmax(np.asarray(z, np.float64))[np.arange(N), d["labels"]]
  r0, r1 = -np.log(1e-2 - np.log(1e-5)), -np.log(1e-2 - np.log(1 + 1e-5))
  g = lambda q: (-np.log(1e-2 - np.log(1e-5 + q)) - r0) / (r1 - r0)
  s_t, s_o = g(p(d["target"])), g(p(d["original"]))
  s_sh = np.stack([g(p(s)) for s in d["shadows"]])
  # iam-spec 3.3 pseudocode, materialised.
  alphas = np.linspace(0, 1, 100)

  def reference(fit):
    interp = (s_sh[:, None, :] + alphas[None, :, None] * (fit - s_sh[:, None, :]))[:, :99]
    mu, sigma = interp.mean(0), interp.std(axis=(0, 2))[:, None]
    beta = np.sqrt(6) * sigma / np.pi
    f = np.exp(-np.exp(-(s_t - mu + 0.5772 * beta) / beta))
    return 1 - (alphas[1:, None] * f).sum(0) / alphas[1:].sum()

  np.testing.assert_allclose(result.scores["iam_on"], reference(s_o), atol=2e-5)
  c = np.mean([g(_softmax(z)[np.arange(len(y)), y]).mean() for z, y in d["shadow_train"]])
  np.testing.assert_allclose(result.scores["iam_off"], reference(c), atol=2e-5)


def test_baselines_equal_direct_primitive_calls(result, inputs):
  d = inputs
  y = d["labels"]
  phi = lambda z: jax.jit(signals.scaled_logit)(z, y)  # jitted: one compile, as audit's
  sh_phi = phi(d["shadows"])
  direct = {
      "lira_on": lira.iam_reference_lira_online(phi(d["target"]), phi(d["original"]), sh_phi),
      "lira_off": lira.iam_reference_lira_offline(phi(d["target"]), sh_phi),
      "carlini_lira_off": -lira.carlini_lira_offline(phi(d["target"]), sh_phi,
                                                     fix_variance="global", one_sided=True),
      "update": baselines.update_attack(phi(d["target"]), phi(d["original"]), sh_phi),
      "emia_r": baselines.emia_reference(d["target"][np.arange(N), y],
                                         d["shadows"][:, np.arange(N), y]),
  }
  pop = d["pop"]
  tsm = lambda z, lab: jax.jit(signals.taylor_soft_margin)(z, lab, 1.0)
  args = (tsm(d["target"], y), tsm(pop.target, pop.labels), tsm(d["shadows"], y),
          tsm(pop.shadows, pop.labels))
  direct["rmia_off"] = 1 - rmia.rmia_offline(*args, a=0.6)
  direct["rmia_on"] = 1 - rmia.rmia_online(*args, tsm(d["original"], y), tsm(pop.inside, pop.labels))
  direct["emia_p"] = baselines.emia_population(d["target"][np.arange(N), y],
                                               pop.target[np.arange(Z), pop.labels])
  model = baselines.unleak_attack_model(_softmax(d["unleak"].origin), _softmax(d["unleak"].shadows),
                                        d["unleak"].held_out, seed=0)
  direct["unleak"] = baselines.unleak_score(model, _softmax(d["original"]), _softmax(d["target"]))
  for name, want in direct.items():
    np.testing.assert_allclose(result.scores[name], np.asarray(want, np.float64), rtol=1e-6,
                               err_msg=name)
  # Carlini online: the original is the only IN observation.
  refs = np.concatenate([np.asarray(sh_phi), np.asarray(phi(d["original"]))[None]])
  in_mask = np.arange(K + 1)[:, None] == K
  want = -lira.carlini_lira_online(phi(d["target"]), refs, np.broadcast_to(in_mask, refs.shape),
                                   fix_variance="global")
  np.testing.assert_allclose(result.scores["carlini_lira_on"], want, rtol=1e-6)
  bin_ui = iam.bin_ui(result.scores["rmia_on"], d["forget"].astype(int), num_bootstrap=0)
  assert result.metrics["rmia_on"]["auc"] == bin_ui["auc"]
  roc = metrics.roc_metrics(1 - d["forget"], 1 - result.scores["lira_on"], num_bootstrap=0)
  assert result.metrics["lira_on"]["tpr_at_fpr"] == roc["tpr_at_fpr"]


def test_signal_mode_and_default_attacks(inputs):
  d = inputs
  p = lambda z: np.asarray(signals.true_class_prob(z, d["labels"]))
  out = jaxmu.attacks.audit(p(d["original"]), p(d["target"]), p(d["shadows"]),
                            forget_mask=d["forget"], off_constant=0.9)
  assert set(out.scores) == {a for a, (_, needs) in ATTACKS.items() if set(needs) <= {"off"}}
  full = jaxmu.attacks.audit(d["original"], d["target"], d["shadows"], d["labels"],
                             attacks=("iam_on",))
  np.testing.assert_allclose(out.scores["iam_on"], full.scores["iam_on"], atol=1e-6)
  assert full.metrics is None
  raw = jaxmu.attacks.audit(p(d["original"]), p(d["target"]), p(d["shadows"]), signal="raw",
                            attacks=("iam_on",))
  want = iam.iam_score(p(d["target"]), p(d["original"]), p(d["shadows"]))
  np.testing.assert_allclose(raw.scores["iam_on"], want, rtol=1e-6)


@pytest.mark.parametrize("change,match", [
    (dict(original=np.zeros((N, C + 1))), "original has shape"),
    (dict(shadows=np.zeros((K, N - 1, C))), "shadows has shape"),
    (dict(target=np.zeros((2, N, C))), "target has shape"),
    (dict(labels=None), "labels"),
    (dict(labels=np.full(N, C)), "labels must lie"),
    (dict(forget=np.zeros(N - 1)), "forget_mask has shape"),
])
def test_shape_mismatches_are_clear_errors(inputs, change, match):
  d = {**inputs, **change}
  with pytest.raises(ValueError, match=match):
    jaxmu.attacks.audit(d["original"], d["target"], d["shadows"], d["labels"], d["forget"],
                        attacks=("iam_on",))


def test_missing_inputs_and_unknown_attack(inputs):
  d = inputs
  args = (d["original"], d["target"], d["shadows"], d["labels"])
  with pytest.raises(ValueError, match="population="):
    jaxmu.attacks.audit(*args, attacks=("rmia_off",))
  with pytest.raises(ValueError, match="shadow_train="):
    jaxmu.attacks.audit(*args, attacks=("iam_off",))
  with pytest.raises(ValueError, match="unknown attack 'lira'"):
    jaxmu.attacks.audit(*args, attacks=("lira",))
  with pytest.raises(ValueError, match="population: target"):
    bad = d["pop"]._replace(shadows=d["pop"].shadows[:1])
    jaxmu.attacks.audit(*args, attacks=("rmia_off",), population=bad)


def _write(path, inputs, **extra):
  d = inputs
  arrays = dict(original=d["original"], target=d["target"], shadows=d["shadows"],
                labels=d["labels"], forget=d["forget"].astype(np.int8),
                population_target=d["pop"].target, population_shadows=d["pop"].shadows,
                population_labels=d["pop"].labels, off_constant=np.float64(0.8))
  arrays.update(extra)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return path


def test_audit_file_matches_audit(tmp_path, inputs):
  d = inputs
  out = audit_file(load_file(_write(tmp_path / "x.npz", inputs)), attacks=("iam_off", "rmia_off"))
  want = jaxmu.attacks.audit(d["original"], d["target"], d["shadows"], d["labels"], d["forget"],
                             attacks=("iam_off", "rmia_off"), off_constant=0.8,
                             population=d["pop"]._replace(inside=None))
  for a in want.scores:
    np.testing.assert_array_equal(out.scores[a], want.scores[a])
  with pytest.raises(ValueError, match=r"missing keys \['shadows'\]"):
    load_file(_write(tmp_path / "y.npz", inputs, shadows=None))
  with pytest.raises(ValueError, match="unknown keys"):
    load_file(_write(tmp_path / "z.npz", inputs, shadow=d["shadows"]))
  with pytest.raises(FileNotFoundError, match="expected an .npz"):
    load_file(tmp_path / "nope.npz")


def test_launcher_writes_tables_and_rejects_bad_files(tmp_path, inputs, capsys):
  """The good file in process (absl flags parsed by hand), the bad one through the real CLI."""
  from absl import flags
  from jaxmu.commands import audit as launcher
  good = _write(tmp_path / "good.npz", inputs)
  flags.FLAGS(["audit", f"--logits={good}", f"--out={tmp_path / 'out'}", "--attacks=iam_on,lira_on"])
  try:
    launcher.main(["audit"])
  finally:
    flags.FLAGS.unparse_flags()
  printed = capsys.readouterr().out
  assert "| IAM-On |" in printed and "| LiRA-On |" in printed
  scores = np.genfromtxt(tmp_path / "out" / "scores.csv", delimiter=",", names=True)
  assert scores.dtype.names == ("iam_on", "lira_on") and scores.shape == (N,)
  metrics_rows = np.genfromtxt(tmp_path / "out" / "metrics.csv", delimiter=",", names=True,
                               dtype=None, encoding=None)
  assert list(metrics_rows["attack"]) == ["iam_on", "lira_on"]
  bad = _write(tmp_path / "bad.npz", inputs, shadows=inputs["shadows"][:, :-1])
  out = subprocess.run([sys.executable, "-m", "jaxmu", "audit", f"--logits={bad}",
                        f"--out={tmp_path / 'out2'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 1 and "shadows has shape" in out.stderr
  assert "Traceback" not in out.stderr


def test_scoring_functions_equal_numpy_float64(inputs):
  """Table 5: each row is IAM with its distribution on its signal, computed here in float64."""
  from tests.test_attacks_iam import reference_iam
  d = inputs
  probs = lambda z: _softmax(np.asarray(z, np.float64))
  p_y = lambda z, y: probs(z)[np.arange(len(y)), y]
  phi = lambda z, y: np.log(p_y(z, y)) - np.log(1 - p_y(z, y))
  r0, r1 = -np.log(1e-2 - np.log(1e-5)), -np.log(1e-2 - np.log(1 + 1e-5))
  gumbel = lambda z, y: (-np.log(1e-2 - np.log(1e-5 + p_y(z, y))) - r0) / (r1 - r0)
  got = scoring_functions(d["original"], d["target"], d["shadows"], d["labels"],
                          d["shadow_train"], temperature=1.0)
  assert list(got) == list(SCORING_FUNCTIONS)
  y = d["labels"]
  np.testing.assert_allclose(got["prob"], -p_y(d["target"], y), atol=1e-6)
  np.testing.assert_allclose(got["loss"], -np.log(p_y(d["target"], y)), atol=1e-5)
  for key, f, dist, atol in (("ecdf", p_y, "ecdf", 1e-6), ("kde", p_y, "kde", 2e-5),
                             ("beta", p_y, "beta", 5e-4), ("gauss", phi, "norm", 2e-5),
                             ("gumbel", gumbel, "gumbel", 2e-5)):
    target, shadows = f(d["target"], y), np.stack([f(s, y) for s in d["shadows"]])
    off = np.mean([f(z, yk).mean() for z, yk in d["shadow_train"]])
    for mode, fit in (("on", f(d["original"], y)), ("off", off)):
      want = reference_iam(target, fit, shadows, 100, dist, fix_variance=True)
      np.testing.assert_allclose(got[f"{key}_{mode}"], want, atol=atol, err_msg=f"{key}_{mode}")
  # Gumbel-On/Off are IAM-On/Off of `audit`.
  result = jaxmu.attacks.audit(d["original"], d["target"], d["shadows"], y,
                               attacks=("iam_on", "iam_off"), shadow_train=d["shadow_train"])
  np.testing.assert_array_equal(got["gumbel_on"], result.scores["iam_on"])
  np.testing.assert_array_equal(got["gumbel_off"], result.scores["iam_off"])
  with pytest.raises(ValueError, match="logits"):
    scoring_functions(p_y(d["original"], y), p_y(d["target"], y),
                      np.stack([p_y(s, y) for s in d["shadows"]]), y, d["shadow_train"])


def _np_signals(y, temperature=1.0):
  """p_y, taylor-soft-margin, phi and -CE of logits in float64 (iam-spec 2)."""
  p_y = lambda z: _softmax(np.asarray(z, np.float64))[np.arange(len(y)), y]

  def tsm(z):
    u = np.asarray(z, np.float64) / temperature
    u[np.arange(len(y)), y] -= 0.6
    t = 1 + u + u**2 / 2 + u**3 / 6
    return t[np.arange(len(y)), y] / t.sum(-1)

  return {"prob": p_y, "tsm": tsm, "phi": lambda z: np.log(p_y(z)) - np.log1p(-p_y(z)),
          "neg_loss": lambda z: np.log(p_y(z))}


def test_carlini_rows_use_global_variance(result, inputs):
  """Carlini's fix_variance: one std of all IN values (the original's phi over samples) and one
  of all OUT values (shadows x samples), in float64; the row no longer ranks as LiRA-On."""
  d = inputs
  phi = _np_signals(d["labels"])["phi"]
  t, o = phi(d["target"]), phi(d["original"])
  sh = np.stack([phi(s) for s in d["shadows"]])
  mu_out, s_out = np.median(sh, 0), sh.std()
  on = scipy.stats.norm.logpdf(t, mu_out, s_out) - scipy.stats.norm.logpdf(t, o, o.std())
  np.testing.assert_allclose(result.scores["carlini_lira_on"], on, rtol=1e-5, atol=1e-4)
  off = scipy.stats.norm.logsf(t, mu_out, s_out)
  np.testing.assert_allclose(result.scores["carlini_lira_off"], off, rtol=1e-5, atol=1e-4)
  # K >= 2: LiRA-On ranks by |phi_unl - phi_ori| alone; K = 1 (Table 1): the IN and OUT scales
  # differ, so the quadratic forms differ.
  rho = scipy.stats.spearmanr(result.scores["lira_on"], result.scores["carlini_lira_on"]).statistic
  assert rho < 0.95
  out = jaxmu.attacks.audit(d["original"], d["target"], d["shadows"][:1], d["labels"], d["forget"],
                            attacks=("lira_on", "carlini_lira_on"))
  assert abs(out.metrics["lira_on"]["auc"] - out.metrics["carlini_lira_on"]["auc"]) > 1e-3


def test_iam_variants_equal_numpy_float64(result, inputs):
  """Table 1's extra rows: Gaussian IAM-On on p, TSM (temperature 1), phi and -CE, and IAM-On on
  the un-normalised Gumbel map (iam-spec 3.3, 10.1), each computed here in float64."""
  from tests.test_attacks_iam import reference_iam
  d = inputs
  maps = _np_signals(d["labels"])
  for attack, (signal, dist) in IAM_VARIANTS.items():
    f = maps[signal]
    want = reference_iam(f(d["target"]), f(d["original"]), np.stack([f(s) for s in d["shadows"]]),
                         100, dist, fix_variance=True)
    np.testing.assert_allclose(result.scores[attack], want, atol=2e-5, err_msg=attack)
  r = lambda z: -np.log(1e-2 - np.log(1e-5 + maps["prob"](z)))
  want = reference_iam(r(d["target"]), r(d["original"]), np.stack([r(s) for s in d["shadows"]]),
                       100, "gumbel", fix_variance=True)
  np.testing.assert_allclose(result.scores["iam_on_wo_norm"], want, atol=2e-5)
  # The Gumbel fit is affine-invariant: with IAM-On's epsilons the un-normalised row is IAM-On.
  np.testing.assert_allclose(result.scores["iam_on_wo_norm"], result.scores["iam_on"], atol=2e-5)
  # The Carlini-logit variant is Table 5's Gauss-On.
  table5 = scoring_functions(d["original"], d["target"], d["shadows"], d["labels"],
                             d["shadow_train"], temperature=1.0)
  np.testing.assert_array_equal(result.scores["iam_gauss_phi"], table5["gauss_on"])


def test_purchase_epsilons(inputs):
  """The reference's Purchase IAM-Off (iam-spec 12.5): targets and shadows mapped with (0.1, 1e-6)
  but normalised with the min/max of (1e-2, 1e-5); the constant normalised with its own; and the
  un-normalised IAM-On with (0.1, 1e-6). Default epsilons unchanged."""
  from tests.test_attacks_iam import reference_iam
  d = inputs
  r = lambda p, e1, e2: -np.log(e1 - np.log(e2 + p))
  norm = lambda p, e, n: (r(p, *e) - r(0, *n)) / (r(1, *n) - r(0, *n))
  p_y = _np_signals(d["labels"])["prob"]
  ref, vision = (0.1, 1e-6), (1e-2, 1e-5)
  got = jaxmu.attacks.audit(d["original"], d["target"], d["shadows"], d["labels"],
                            attacks=("iam_on", "iam_off", "iam_on_wo_norm"),
                            shadow_train=d["shadow_train"], off_eps=ref, norm_eps=vision).scores
  s_sh = np.stack([norm(p_y(s), ref, vision) for s in d["shadows"]])
  c = np.mean([norm(_softmax(z)[np.arange(len(y)), y], ref, ref).mean()
               for z, y in d["shadow_train"]])
  want = reference_iam(norm(p_y(d["target"]), ref, vision), c, s_sh, 100, "gumbel", True)
  np.testing.assert_allclose(got["iam_off"], want, atol=2e-5)
  sh = np.stack([r(p_y(s), *ref) for s in d["shadows"]])
  want = reference_iam(r(p_y(d["target"]), *ref), r(p_y(d["original"]), *ref), sh, 100, "gumbel",
                       True)
  np.testing.assert_allclose(got["iam_on_wo_norm"], want, atol=2e-5)
  default = jaxmu.attacks.audit(d["original"], d["target"], d["shadows"], d["labels"],
                                attacks=("iam_on", "iam_off"), shadow_train=d["shadow_train"])
  np.testing.assert_array_equal(got["iam_on"], default.scores["iam_on"])
  assert np.abs(got["iam_off"] - default.scores["iam_off"]).max() > 1e-2


def test_eps_sensitivity_cells(inputs):
  """iam-spec 10.5: at IAM's epsilons and A = 100 the cells are `audit`'s IAM-On / IAM-Off bit
  for bit; elsewhere each cell is IAM (Gumbel) on r_hat(p_y) normalised with its own epsilons,
  here in float64 (the IAM-Off constant likewise)."""
  from tests.test_attacks_iam import reference_iam
  d = inputs
  got = eps_sensitivity(d["original"], d["target"], d["shadows"], d["labels"], d["shadow_train"],
                        eps_pairs=[(1e-2, 1e-5), (0.1, 1e-3)], num_interps=(2, 100))
  assert sorted(got) == sorted((a, *e, n) for a in ("iam_on", "iam_off")
                               for e in ((1e-2, 1e-5), (0.1, 1e-3)) for n in (2, 100))
  default = jaxmu.attacks.audit(d["original"], d["target"], d["shadows"], d["labels"],
                                attacks=("iam_on", "iam_off"), shadow_train=d["shadow_train"])
  for attack in ("iam_on", "iam_off"):
    np.testing.assert_array_equal(got[(attack, 1e-2, 1e-5, 100)], default.scores[attack])
  p_y = _np_signals(d["labels"])["prob"]
  r = lambda p: -np.log(0.1 - np.log(1e-3 + p))
  g = lambda p: (r(p) - r(0.0)) / (r(1.0) - r(0.0))
  sh = np.stack([g(p_y(s)) for s in d["shadows"]])
  c = np.mean([g(_softmax(z)[np.arange(len(y)), y]).mean() for z, y in d["shadow_train"]])
  for attack, fit in (("iam_on", g(p_y(d["original"]))), ("iam_off", c)):
    for a in (2, 100):
      want = reference_iam(g(p_y(d["target"])), fit, sh, a, "gumbel", fix_variance=True)
      np.testing.assert_allclose(got[(attack, 0.1, 1e-3, a)], want, atol=2e-5)
  with pytest.raises(ValueError, match="iam_on and iam_off"):
    eps_sensitivity(d["original"], d["target"], d["shadows"], d["labels"], eps_pairs=[(0.1, 0.1)],
                    num_interps=(2,), attacks=("lira_on",))
