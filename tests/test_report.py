"""The benchmark report on hand-made rows: summary, RetDev of seed means, ranking, files."""

import numpy as np
import pytest

from jaxmu import report

# Two seeds per method; RetDev per seed is computed by hand below, not by the code under test.
ACC = {  # method: [(retain, forget, test) of seed 0, of seed 1]
    "original": [(1.0, 1.0, 0.90), (1.0, 1.0, 0.92)],
    "retrain": [(1.0, 0.80, 0.90), (0.98, 0.84, 0.90)],
    "close": [(0.99, 0.82, 0.89), (0.99, 0.82, 0.91)],
    "far": [(0.50, 0.40, 0.45), (0.70, 0.60, 0.65)],
    "tie": [(0.99, 0.82, 0.89), (0.99, 0.82, 0.91)],  # = close, but a worse MIA
}
TEST_MIA = {"original": (0.6, 0.6), "retrain": (0.5, 0.52), "close": (0.52, 0.54),
            "far": (0.5, 0.5), "tie": (0.7, 0.7)}


def _rows():
  rows = []
  for method, seeds in ACC.items():
    for seed, (r, f, t) in enumerate(seeds):
      ref = ACC["retrain"][seed]
      retdev = abs(r / ref[0] - 1) + abs(f / ref[1] - 1) + abs(t / ref[2] - 1)
      rows.append({"method": method, "seed": float(seed), "retain_acc": r, "forget_acc": f,
                   "test_acc": t, "test_mia": TEST_MIA[method][seed], "retdev": retdev,
                   "seconds": 2.0 * (seed + 1), "rte": 10.0 / (2.0 * (seed + 1))})
  return rows


def test_summary_means_stds_and_aggregates_of_seed_means():
  summary = {s["method"]: s for s in report.benchmark_summary(_rows())}
  far = summary["far"]
  assert far["seeds"] == 2
  assert far["retain_acc_mean"] == pytest.approx(0.6) and far["retain_acc_std"] == pytest.approx(0.1)
  assert far["rte_mean"] == pytest.approx((5.0 + 2.5) / 2)
  # RetDev of seed means against the retrained model's seed means (deepunlearn-spec 6.4, 9.2):
  ref = np.mean(ACC["retrain"], axis=0)
  means = np.mean(ACC["far"], axis=0)
  assert far["retdev_of_means"] == pytest.approx(np.abs(means / ref - 1).sum())
  assert far["retdev_of_means"] != pytest.approx(far["retdev_mean"])  # not the mean of per-seed
  assert summary["retrain"]["retdev_of_means"] == 0.0
  assert summary["close"]["indisc_of_means"] == pytest.approx(1 - abs(2 * 0.53 - 1))


def test_ranking_by_retdev_then_indisc_with_references_apart():
  summary = report.benchmark_summary(_rows())
  assert [s["method"] for s in report.rank(summary)] == ["close", "tie", "far"]
  undefined = [dict(s, indisc_of_means=np.nan) if s["method"] == "close" else s for s in summary]
  assert [s["method"] for s in report.rank(undefined)] == ["tie", "close", "far"]
  table = report.paper_table(summary).splitlines()
  assert [line.split(" | ")[1] for line in table[2:]] == [
      "*retrain*", "*original*", "close", "tie", "far"]
  assert table[4].startswith("| 1 | close | 0.9900 ± 0.0000 | 0.8200 ± 0.0000 | 0.9000 ± 0.0100 |")


def test_retdev_is_undefined_against_a_zero_retrained_accuracy():
  rows = [dict(r, forget_acc=0.0) if r["method"] == "retrain" else r for r in _rows()]
  summary = report.benchmark_summary(rows)
  assert all(np.isnan(s["retdev_of_means"]) for s in summary)
  # Every RetDev undefined: ranked by Indisc (far's T-MIA is 0.5, close's 0.53, tie's 0.7).
  assert [s["method"] for s in report.rank(summary)] == ["far", "close", "tie"]
  assert "| 1 | far | 0.6000 ± 0.1000 | 0.5000 ± 0.1000 | 0.5500 ± 0.1000 | — | 1.0000 |" in (
      report.paper_table(summary))


def test_summary_needs_the_retrained_rows():
  with pytest.raises(ValueError, match="no 'retrain' method"):
    report.benchmark_summary([r for r in _rows() if r["method"] != "retrain"])


def test_report_files_with_tuning_stages_and_ulira(tmp_path):
  ulira = tmp_path / "ulira"
  (ulira / "roc").mkdir(parents=True)
  report.write_csv(ulira / "ulira.csv", [
      {"method": "close", "balanced_accuracy": 0.52, "ci_low": 0.5, "ci_high": 0.54, "auc": 0.51,
       "num_samples": 100, "mean_member_prob": 0.49, "population_mia": 0.55,
       "population_mia_std": 0.01, "models": 8, "hparams": "search"}])
  np.savez(ulira / "roc" / "close.npz", fpr=np.linspace(0, 1, 5), tpr=np.linspace(0, 1, 5) ** 0.5)
  times = {"models": 4, "epochs": 2, "stack_seconds": 20.0, "seconds_per_model": 5.0}
  path = report.write_benchmark_report(
      tmp_path / "out", "T", _rows(), times,
      tuning={"close": {"trials_complete": 4, "trials_failed": 1, "seeds": (0, 1), "mode": "tpe",
                        "best_trial": 2, "best_params": {"num_epochs": 3, "lr": 0.012345}}},
      stages_run={"train": "reused", "unlearn_close": "config changed", "report": "new"},
      ulira_dir=ulira)
  text = path.read_text()
  assert text.startswith("# T\n\n**Closest to retraining:** close")
  assert "| 1 | close |" in text and text.count("| U-LiRA |") == 1
  assert "0.520 [0.500, 0.540]" in text
  assert "## U-LiRA" in text and "| close | 0.5200 | [0.5000, 0.5400] | 0.5100 | 100 |" in text
  assert "| close | tpe | 0, 1 | 4 | 1 | 2 | lr=0.0123, num_epochs=3 |" in text
  assert "Not tuned (the config's hyper-parameters): tie, far." in text
  assert "Stages recomputed in this run: unlearn_close (config changed), report (new)." in text
  assert "Stages reused from earlier runs: train." in text
  for name in report.figure_names(with_ulira=True):
    assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    assert f"]({name})" in text
