"""`jaxmu audit-llm`: saved per-chunk losses in (the reference's text files, generated here),
results.csv and report.md out; every bad input is one line naming the file, exit status 2, and
nothing written."""

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from jaxmu import errors
from jaxmu.attacks import llm
from jaxmu.commands import audit_llm as launcher

ROOT = Path(__file__).resolve().parents[1]
N, ROUNDS = 90, 40
ALL = ["iam_on", "lira_on", "rmia_on", "loss", "zlib", "ratio", "min_k", "min_k_plus_plus",
       "surp", "bag_of_words"]


def _column(path, values, header=None):
  lines = ([header] if header else []) + [repr(float(v)) if not isinstance(v, str) else v
                                          for v in values]
  path.write_text("\n".join(lines) + "\n")


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  labels = np.tile([1, 0, 1], N // 3)
  fit = rng.gamma(2.0, 0.5, N)
  nll = fit + (1 - labels) * rng.gamma(2.0, 0.3, N)
  t = 20
  logp = -rng.gamma(1.5, 1.0, (N, t)) - 0.5 * (1 - labels)[:, None]
  mask = np.arange(t)[None, :] < rng.integers(8, t + 1, N)[:, None]
  words = np.array(["market", "court", "vote", "storm", "league", "health", "the", "a"])
  text = np.array([" ".join(rng.choice(words[:5] if y else words[3:], 15)) for y in labels])
  return {"labels": labels, "nll": nll, "fit": fit, "ref": fit + rng.gamma(2.0, 0.4, N),
          "pop": [rng.gamma(2.0, 0.6, 30) for _ in range(3)], "logp": np.where(mask, logp, 0.0),
          "mask": mask, "entropy": rng.gamma(2.0, 1.0, (N, t)),
          "mu": -rng.gamma(20.0, 1.0, (N, t)), "sigma": rng.gamma(10.0, 0.3, (N, t)),
          "text": text}


def _write(directory, d, prefix="MUSE-News", pop=True, tokens=True, headers=True):
  directory.mkdir(parents=True, exist_ok=True)
  h = (lambda key: f"{key} :") if headers else (lambda key: None)
  _column(directory / f"{prefix}-label.txt", [str(int(v)) for v in d["labels"]], h("label"))
  _column(directory / f"{prefix}-nlloss.txt", d["nll"], h("nlloss"))
  _column(directory / f"{prefix}-fitRef_nlloss.txt", d["fit"], h("fitRef_nlloss"))
  _column(directory / f"{prefix}-ref_nlloss.txt", d["ref"], h("ref_nlloss"))
  if pop:
    for stem, values in zip(("pop_nlloss", "pop_fitRef_nlloss", "pop_ref_nlloss"), d["pop"]):
      _column(directory / f"{prefix}-{stem}.txt", values)
  if tokens:
    np.savez(directory / f"{prefix}-tokens.npz", text=d["text"], token_logp=d["logp"],
             token_mask=d["mask"], token_entropy=d["entropy"], vocab_mean=d["mu"],
             vocab_std=d["sigma"])
  return directory


@pytest.fixture()
def inputs():
  return _inputs()


def _run_main(**values):
  """``main`` in process with the flags parsed from strings, restored afterwards. (as_parsed
  parses just these flags: other command modules loaded in the same process may have required
  flags of their own.)"""
  values = {"bootstrap_rounds": str(ROUNDS), **{k: str(v) for k, v in values.items()}}
  with flagsaver.as_parsed(**values):
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    launcher.main(["audit-llm"])


def _error(capsys, **values):
  with pytest.raises(SystemExit) as exit_:
    _run_main(**values)
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
  return err


def test_every_attack_writes_csv_and_report(tmp_path, inputs, capsys):
  d = inputs
  directory = _write(tmp_path / "logs", d)
  out = tmp_path / "out"
  _run_main(nll_dir=directory, out=out)
  with open(out / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["attack", "auc", "auc_std", "tpr_at_fpr_0.1", "tpr_at_fpr_0.01"]
  assert [r["attack"] for r in rows] == ALL
  iam = llm.bootstrap_metrics(d["labels"], llm.iam_on(d["nll"], d["fit"], d["ref"]),
                              rounds=ROUNDS, seed=42)
  assert float(rows[0]["auc"]) == pytest.approx(iam["auc"], rel=1e-12)
  assert float(rows[0]["tpr_at_fpr_0.01"]) == pytest.approx(iam["tpr_at_fpr_0.01"], rel=1e-12)
  for r in rows:
    assert 0 <= float(r["auc"]) <= 1 and float(r["auc_std"]) >= 0
  assert float(rows[ALL.index("loss")]["auc"]) > 0.6  # forgotten chunks have higher losses
  report = (out / "report.md").read_text()
  assert f"mean ± std over {ROUNDS} balanced bootstrap rounds (the std is over rounds" in report
  assert "| IAM-On | " in report and "| IAM-On | " in report
  assert "| Min-K%++ | " in report and "IAM-On (normalised as above):" in report
  assert "Done:" in capsys.readouterr().out


def test_library_result_and_minimal_files(tmp_path, inputs):
  """labels + target losses alone run Loss only; the rest is reported as skipped."""
  d = inputs
  directory = tmp_path / "min"
  directory.mkdir()
  _column(directory / "x-label.txt", [str(v) for v in d["labels"]])
  _column(directory / "x-nlloss.txt", d["nll"])
  result = llm.audit_files(directory, rounds=ROUNDS)
  assert result.prefix == "x" and [r["attack"] for r in result.rows] == ["loss"]
  np.testing.assert_array_equal(result.scores["loss"], d["nll"])
  assert set(result.skipped) == set(ALL) - {"loss"} and result.iam_shares is None
  assert "Not run (missing input)" in llm.report_markdown(result, ROUNDS)
  full = llm.audit_files(_write(tmp_path / "full", d), rounds=ROUNDS, attacks=["iam_on", "loss"])
  assert [r["attack"] for r in full.rows] == ["iam_on", "loss"]
  raw = llm.iam_on(d["nll"], d["fit"], d["ref"], raw=True)
  assert full.iam_shares == llm.iam_threshold_shares(raw, d["labels"])
  assert full.rows[0]["mean_1"] == pytest.approx(llm.minmax(raw)[d["labels"] == 1].mean())


def test_reference_population_names_and_prefix_choice(tmp_path, inputs):
  d = inputs
  directory = _write(tmp_path / "logs", d, pop=False, tokens=False, headers=False)
  for name, values in zip(("population_target_nlloss.txt", "population_in_fitRef_nlloss.txt",
                           "population_out_ref_nlloss.txt"), d["pop"]):
    _column(directory / name, values, name.split("_", 2)[2][:-4] + " :")
  result = llm.audit_files(directory, rounds=ROUNDS)
  assert [r["attack"] for r in result.rows] == ["iam_on", "lira_on", "rmia_on", "loss", "ratio"]
  np.testing.assert_array_equal(result.scores["rmia_on"], llm.rmia_on(
      d["nll"], d["fit"], d["ref"], *d["pop"]))
  _write(directory, _inputs(1), prefix="other", pop=False, tokens=False)
  with pytest.raises(errors.InputError, match="several prefixes .*pass --prefix") as error:
    llm.audit_files(directory)
  assert len(error.value.problems) == 1  # the project's typed error, one line
  assert llm.audit_files(directory, "other", rounds=ROUNDS).prefix == "other"


def _corrupt(directory, name, lines):
  path = directory / name
  path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("case, match", [
    ("missing_nll", r"MUSE-News-nlloss\.txt: missing"),
    ("short_ref", r"MUSE-News-ref_nlloss\.txt: 89 values but MUSE-News-label\.txt has 90"),
    ("nan", r"MUSE-News-fitRef_nlloss\.txt: line 4 is nan"),
    ("label_2", r"MUSE-News-label\.txt: line 3 is 2; fix: labels are 1"),
    ("one_class", r"MUSE-News-label\.txt: every chunk has label 1"),
    ("word", r"MUSE-News-nlloss\.txt: line 2 \('abc'\) is not a number"),
    ("negative", r"MUSE-News-nlloss\.txt: negative value on line 1"),
    ("partial_pop", r"population losses .* without MUSE-News-pop_ref_nlloss\.txt"),
    ("pop_length", r"MUSE-News-pop_fitRef_nlloss\.txt: 29 values but"),
    ("npz_shape", r"MUSE-News-tokens\.npz: token_entropy has shape \(90, 19\)"),
    ("npz_key", r"MUSE-News-tokens\.npz: unknown keys \['logits'\]"),
    ("no_dir", r"nowhere: no such directory"),
    ("attack_needs_file", r"MUSE-News-pop_nlloss\.txt: missing, needed by rmia_on"),
    ("unknown_attack", r"--attacks: unknown \['lira'\]"),
    ("out_is_a_file", r"--out: .* is a file, not a directory"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, inputs, capsys, case, match):
  d = inputs
  directory = _write(tmp_path / "logs", d, pop=case in ("partial_pop", "pop_length"),
                     tokens=case in ("npz_shape", "npz_key"))
  values = {"nll_dir": directory, "out": tmp_path / "out"}
  labels = ["label :"] + [str(v) for v in d["labels"]]
  if case == "missing_nll":
    (directory / "MUSE-News-nlloss.txt").unlink()
  elif case == "short_ref":
    _column(directory / "MUSE-News-ref_nlloss.txt", d["ref"][:-1])
  elif case == "nan":
    _column(directory / "MUSE-News-fitRef_nlloss.txt", np.r_[d["fit"][:2], np.nan, d["fit"][3:]],
            "fitRef_nlloss :")
  elif case == "label_2":
    _corrupt(directory, "MUSE-News-label.txt", labels[:2] + ["2"] + labels[3:])
  elif case == "one_class":
    _corrupt(directory, "MUSE-News-label.txt", ["1"] * N)
  elif case == "word":
    _corrupt(directory, "MUSE-News-nlloss.txt", ["0.5", "abc"] + ["1.0"] * (N - 2))
  elif case == "negative":
    _column(directory / "MUSE-News-nlloss.txt", np.r_[-1.0, d["nll"][1:]])
  elif case == "partial_pop":
    (directory / "MUSE-News-pop_ref_nlloss.txt").unlink()
  elif case == "pop_length":
    _column(directory / "MUSE-News-pop_fitRef_nlloss.txt", d["pop"][1][:-1])
  elif case == "npz_shape":
    np.savez(directory / "MUSE-News-tokens.npz", token_logp=d["logp"],
             token_entropy=d["entropy"][:, :-1])
  elif case == "npz_key":
    np.savez(directory / "MUSE-News-tokens.npz", text=d["text"], logits=d["logp"])
  elif case == "no_dir":
    values["nll_dir"] = tmp_path / "nowhere"
  elif case == "attack_needs_file":
    values["attacks"] = "iam_on,rmia_on"
  elif case == "unknown_attack":
    values["attacks"] = "lira"
  elif case == "out_is_a_file":
    (tmp_path / "out").write_text("mine")
  err = _error(capsys, **values)
  assert re.search(match, err), err
  assert "fix:" in err
  if case == "out_is_a_file":
    assert (tmp_path / "out").read_text() == "mine"
  else:
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_exits_2_without_traceback(tmp_path):
  out = subprocess.run([sys.executable, "-m", "jaxmu", "audit-llm", f"--nll_dir={tmp_path}",
                        f"--out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().startswith("error: ") and "no <prefix>-label.txt" in out.stderr
  assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()
