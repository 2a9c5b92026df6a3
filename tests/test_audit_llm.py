"""`jaxmu audit-llm`: saved per-chunk losses in (the reference's text files, generated here),
results.csv and report.md out. Its bad inputs (`bad_logs`) are cases of tests/test_bad_inputs.py:
one line naming the file or flag, exit status 2, nothing written."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_command

from jaxmu import errors
from jaxmu.attacks import llm

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
  run_command("audit-llm", bootstrap_rounds=ROUNDS, **values)


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


def bad_logs(root):
  """Folders of the reference's files at ``root``, each broken one way (the audit-llm cases of
  tests/test_bad_inputs.py): "good" is whole; the others replace files of it (lines, bytes,
  arrays of an .npz, None: removed, ...: a directory in its place) or write fewer files."""
  d, p = _inputs(), "MUSE-News-"
  labels, nums = [str(v) for v in d["labels"]], lambda values: [repr(float(v)) for v in values]
  variants = {
      "good": {}, "binary_label": {p + "label.txt": b"\xff\xfe not text"},
      "word": {p + "nlloss.txt": ["0.5", "abc"] + nums(d["nll"][2:])},
      "nan": {p + "fitRef_nlloss.txt": nums(d["fit"][:3]) + ["nan"] + nums(d["fit"][4:])},
      "negative": {p + "nlloss.txt": ["-1.0"] + nums(d["nll"][1:])},
      "label_2": {p + "label.txt": labels[:2] + ["2"] + labels[3:]},
      "one_class": {p + "label.txt": ["1"] * N}, "nll_is_dir": {p + "nlloss.txt": ...},
      "short": {p + "ref_nlloss.txt": nums(d["ref"][:-1])},
      "no_values": {p + "nlloss.txt": ["nlloss :"]}, "ref_zero": {p + "ref_nlloss.txt": ["0"] * N},
      "partial_pop": {p + "pop_ref_nlloss.txt": None},
      "pop_length": {p + "pop_fitRef_nlloss.txt": nums(d["pop"][1][:-1])},
      "no_pop": {p + s: None for s in ("pop_nlloss.txt", "pop_fitRef_nlloss.txt",
                                        "pop_ref_nlloss.txt")},
      "two_prefixes": {"other-label.txt": labels},
      "tokens_empty": {p + "tokens.npz": b""},
      "tokens_key": {p + "tokens.npz": {"text": d["text"], "logits": d["logp"]}},
      "tokens_shape": {p + "tokens.npz": {"token_logp": d["logp"],
                                          "token_entropy": d["entropy"][:, :-1]}},
      "tokens_str": {p + "tokens.npz": {"token_logp": np.full(d["logp"].shape, "x")}},
      "tokens_mask": {p + "tokens.npz": {"token_logp": d["logp"], "token_mask": d["mask"] * 0.5}},
      "tokens_text": {p + "tokens.npz": {"text": np.r_[d["text"][:-1], [""]]}},
      "few": {p + "label.txt": ["1", "0"] * 3, p + "nlloss.txt": ["1.0"] * 6,
              p + "tokens.npz": {"text": np.array(["a b c"] * 6)},
              p + "ref_nlloss.txt": None, p + "fitRef_nlloss.txt": None,
              **{p + s: None for s in ("pop_nlloss.txt", "pop_fitRef_nlloss.txt",
                                       "pop_ref_nlloss.txt")}},
  }
  for name, files in variants.items():
    folder = _write(root / name, d)
    for file, content in files.items():
      path = folder / file
      path.unlink(missing_ok=True)
      if isinstance(content, dict):
        np.savez(path, **content)
      elif isinstance(content, bytes):
        path.write_bytes(content)
      elif content is ...:
        path.mkdir()
      elif content is not None:
        path.write_text("\n".join(content) + "\n")
  return root


def test_cli_bad_input_exits_2_without_traceback(tmp_path):
  out = subprocess.run([sys.executable, "-m", "jaxmu", "audit-llm", f"--nll_dir={tmp_path}",
                        f"--out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().startswith("error: ") and "no <prefix>-label.txt" in out.stderr
  assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()
