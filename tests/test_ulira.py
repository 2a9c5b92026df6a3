"""The U-LiRA pipeline end to end on a tiny config: outputs, wiring, splits, resumption."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import threadpoolctl
from sklearn.metrics import roc_auc_score

from jaxmu.configs import ulira as ulira_config
from jaxmu import checkpoint, models, report, search, train
from jaxmu.attacks import lira, mia
from jaxmu.data import splits as splits_lib
from jaxmu.pipelines import common, ulira, ulira_stage

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--config.ulira.lira.num_splits=4", "--config.ulira.lira.num_forget_draws=2",
        "--config.ulira.lira.forget_ratio=0.5", "--config.ulira.epochs=2",
        "--config.checkpoint_every=1", "--config.ulira.methods=('original', 'finetune')",
        "--config.unlearn.finetune.num_epochs=1")


def _tiny_config():
  config = ulira_config.get_config("cpu")
  lira_config = config.ulira.lira
  lira_config.num_splits, lira_config.num_forget_draws, lira_config.forget_ratio = 4, 2, 0.5
  config.ulira.epochs = 2
  config.checkpoint_every = 1
  config.ulira.methods = ("original", "finetune")
  config.unlearn.finetune.num_epochs = 1
  return config


def _finished(workdir):
  return {p.stem: json.loads(p.read_text())["finished"]
          for p in (workdir / "stages").glob("*.json")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One tiny run, spying on the index sets given to train.fit and on the unlearning context."""
  workdir = tmp_path_factory.mktemp("ulira")
  config = _tiny_config()
  seen = {"fit": [], "ctx": []}
  real_fit, real_context = train.fit, ulira_stage.chunk_context

  def fit(model, state, data, index_sets, *args, **kwargs):
    seen["fit"].append([s[s >= 0] for s in np.asarray(index_sets)])
    return real_fit(model, state, data, index_sets, *args, **kwargs)

  def chunk_context(*args):
    seen["ctx"].append(real_context(*args))
    return seen["ctx"][-1]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, "fit", fit)
    mp.setattr(ulira_stage, "chunk_context", chunk_context)
    path = ulira.run(config, workdir)
  dataset = common.load_dataset(config.dataset)
  return dict(config=config, workdir=workdir, path=path, seen=seen, dataset=dataset,
              parts=splits_lib.load(workdir / "splits.npz", dataset))


def test_outputs_follow_the_report_contract(run):
  wd = run["workdir"]
  assert run["path"] == wd / "report.md"
  rows = report.read_csv(wd / "ulira.csv")
  with open(wd / "ulira.csv") as f:
    assert tuple(f.readline().strip().split(",")[:6]) == ulira_stage.CSV_COLUMNS
  assert [r["method"] for r in rows] == ["original", "finetune"]
  for row in rows:
    assert 0 <= row["ci_low"] <= row["balanced_accuracy"] <= row["ci_high"] <= 1
    assert 0 <= row["auc"] <= 1 and row["num_samples"] > 50
    assert 0 <= row["population_mia"] <= 1 and row["models"] == 8
    assert row["hparams"] == "defaults"
    curve = np.load(wd / "roc" / f"{row['method']}.npz")
    assert set(curve.files) == {"fpr", "tpr"}
    assert curve["fpr"][0] == curve["tpr"][0] == 0 and curve["fpr"][-1] == curve["tpr"][-1] == 1
    assert np.all(np.diff(curve["fpr"]) >= 0) and np.all(np.diff(curve["tpr"]) >= 0)
  text = run["path"].read_text()
  assert "| original |" in text and "| finetune |" in text and "![U-LiRA ROC](roc.png)" in text
  assert (wd / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_splits_keep_masks_and_the_models_index_sets(run):
  parts, (fit_sets,) = run["parts"], run["seen"]["fit"]
  num_splits, num_draws = 4, 2
  assert parts["keep"].shape == (num_splits, run["dataset"].num_train)
  assert len(fit_sets) == num_splits + num_splits * num_draws
  for s in range(num_splits):
    in_s = np.flatnonzero(parts["keep"][s])
    np.testing.assert_array_equal(np.sort(fit_sets[s]), in_s)  # the original trains on IN_s
    assert not np.isin(parts["val"], in_s).any()
    for f in range(num_draws):
      forget, retrained = parts["forget"][s, f], fit_sets[num_splits + s * num_draws + f]
      assert parts["keep"][s, forget].all()  # every forgotten sample is in the original's set
      np.testing.assert_array_equal(np.sort(retrained), np.setdiff1d(in_s, forget))
  assert len(run["seen"]["ctx"]) == 2  # one per method (one chunk)
  for ctx in run["seen"]["ctx"]:  # each (s, f) model unlearns split s's forget set
    assert ctx.model_ids == tuple(range(num_splits * num_draws))
    for m in range(num_splits * num_draws):
      s, f = divmod(m, num_draws)
      np.testing.assert_array_equal(ctx.forget[m][ctx.forget[m] >= 0], parts["forget"][s, f])
      np.testing.assert_array_equal(ctx.retain[m][ctx.retain[m] >= 0], parts["retain"][s, f])


def test_original_signals_come_from_each_split_original(run):
  """`original` unlearns nothing: model (s, f) must predict exactly as split s's original."""
  wd, config, dataset = run["workdir"], run["config"], run["dataset"]
  model = models.get(config.model.name, dataset.num_classes)
  like = common.abstract_variables(model, 4, dataset.inputs.shape[1:])
  originals = checkpoint.restore(wd / "models" / "original", like)
  recipe = common.recipe(config)
  logits = train.predict(model, originals, train.DeviceData.create(dataset),
                         np.arange(dataset.num_train), recipe).astype(np.float64)
  labels = np.asarray(dataset.labels)[:dataset.num_train]
  true = np.take_along_axis(logits, labels[None, :, None], -1)[..., 0]
  others = np.where(np.arange(10) == labels[:, None], -np.inf, logits)
  phi = true - scipy.special.logsumexp(others, axis=-1)  # log p_y - log(1 - p_y)
  saved = np.load(wd / "signals" / "original.npz")
  np.testing.assert_allclose(saved["scaled_logit"], np.repeat(phi, 2, axis=0), atol=2e-4)
  np.testing.assert_array_equal(saved["correct"], np.repeat(logits.argmax(-1) == labels, 2, 0))


def test_membership_probabilities_are_ulira_of_the_right_models(run):
  """Masks rebuilt here from the split files; ulira called directly on the saved signals."""
  wd, parts = run["workdir"], run["parts"]
  n = run["dataset"].num_train
  forgot, never, out = (np.zeros((8, n), bool) for _ in range(3))
  for m in range(8):
    s, f = divmod(m, 2)
    forgot[m, parts["forget"][s, f]] = True
    never[m] = ~np.isin(np.arange(n), parts["retain"][s, f])
    out[m, parts["out"][s]] = True
  retrained = np.load(wd / "signals" / "retrain.npz")
  rows = {r["method"]: r for r in report.read_csv(wd / "ulira.csv")}
  for method in ("original", "finetune"):
    sig = np.load(wd / "signals" / f"{method}.npz")
    res = lira.ulira(sig["scaled_logit"], forgot, retrained["scaled_logit"], never,
                     fix_variance=True)
    saved = np.load(wd / "membership" / f"{method}.npz")
    np.testing.assert_array_equal(saved["samples"], res.samples)
    np.testing.assert_allclose(saved["member_prob"], res.member_prob, rtol=1e-6)
    assert rows[method]["balanced_accuracy"] == pytest.approx(res.balanced_accuracy, rel=1e-9)
    assert (rows[method]["ci_low"], rows[method]["ci_high"]) == pytest.approx(res.ci95, rel=1e-9)
    assert rows[method]["num_samples"] == len(res.samples)
    assert all(forgot[:, j].sum() >= 2 and never[:, j].sum() >= 2 for j in res.samples)
    s = res.samples
    pu, pr = np.asarray(res.prob_unlearned)[:, s], np.asarray(res.prob_retrained)[:, s]
    labels = np.r_[np.ones(forgot[:, s].sum()), np.zeros(never[:, s].sum())]
    auc = roc_auc_score(labels, np.r_[pu[forgot[:, s]], pr[never[:, s]]])
    assert rows[method]["auc"] == pytest.approx(auc, abs=1e-9)
    ce = -np.log(scipy.special.expit(sig["scaled_logit"].astype(np.float64)))
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
      mias = [mia.population_mia(ce[m, parts["forget"][divmod(m, 2)]], ce[m, parts["val"]])
              for m in range(8)]
    assert rows[method]["population_mia"] == pytest.approx(np.mean(mias), abs=1e-9)
    ref = lira.ulira(sig["correct"].astype(np.float32), forgot, sig["correct"].astype(np.float32),
                     out, reference=True)
    assert rows[method]["reference_member_prob"] == pytest.approx(ref.member_prob.mean(), rel=1e-6)


def test_second_run_recomputes_nothing(run):
  before = _finished(run["workdir"])
  assert {"splits", "init", "train", "unlearn_original", "unlearn_finetune", "ulira",
          "report"} <= set(before)
  out = subprocess.run([sys.executable, "-m", "jaxmu", "ulira", "--config=ulira:cpu",
                        f"--workdir={run['workdir']}", *TINY],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "# U-LiRA: digits / small_cnn" in out.stdout
  assert _finished(run["workdir"]) == before


def test_chunked_stacks_give_the_same_models(run, tmp_path):
  """Training and unlearning in chunks of 4 models reruns what reads config.parallel and changes
  no number."""
  workdir = tmp_path / "ulira"
  shutil.copytree(run["workdir"], workdir)
  before = _finished(workdir)
  config = _tiny_config()
  config.ulira.max_models_per_program = 4
  config.ulira.methods = ("finetune",)
  config.stop_after = "unlearn"
  ulira.run(config, workdir)
  after = _finished(workdir)
  assert after["splits"] == before["splits"] and after["init"] == before["init"]
  assert json.loads((workdir / "stages" / "train.json").read_text())["reason"] == "config changed"
  for name in ("retrain", "finetune"):
    want, got = (np.load(w / "signals" / f"{name}.npz") for w in (run["workdir"], workdir))
    np.testing.assert_array_equal(got["scaled_logit"], want["scaled_logit"])
  assert not (workdir / "checkpoints" / "train").exists()  # removed once the stage is done


def test_search_results_override_defaults(tmp_path):
  config = _tiny_config()
  assert ulira.best_hparams(config, "finetune") == (config.unlearn.finetune.to_dict(), "defaults")
  config.search_dir = str(tmp_path)
  best = search.SearchResult("finetune", {"learning_rate": 0.003}, (0.1, 0.0, 0.0, 0.0), 7, 8, 0)
  (tmp_path / "finetune.json").write_text(json.dumps(best._asdict()))
  hparams, source = ulira.best_hparams(config, "finetune")
  assert source == "search" and hparams["learning_rate"] == 0.003
  assert hparams["num_epochs"] == 1  # the rest stay as configured
  assert ulira.best_hparams(config, "original") == ({}, "defaults")
  config.search_dir = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="search_dir"):
    ulira.best_hparams(config, "finetune")


def test_bad_config_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="unknown config arguments"):
    ulira_config.get_config("cpu,epochs=3")
  config = _tiny_config()
  config.stop_after = "trainn"
  with pytest.raises(ValueError, match="not a stage"):
    ulira.run(config, tmp_path)
  config.stop_after = ""
  config.ulira.methods = ("finetun",)
  with pytest.raises(ValueError, match="ulira.methods: unknown method 'finetun'"):
    ulira.run(config, tmp_path)
  config.ulira.methods = ("finetune",)
  config.ulira.lira.num_splits, config.ulira.lira.num_forget_draws = 1, 1
  with pytest.raises(ValueError, match="raise ulira.lira.num_splits"):
    ulira.run(config, tmp_path / "few")
  (tmp_path / "main").mkdir()
  (tmp_path / "main" / "config.json").write_text(json.dumps({"seeds": [0, 1]}))
  with pytest.raises(ValueError, match="another pipeline's run"):
    ulira.run(config, tmp_path / "main")
