"""Bad inputs, table-driven: every `jaxmu` subcommand (the library's: test_bad_inputs_library.py).

Each case runs in-process through `jaxmu.cli.main` (a handful through subprocesses, for the exit
status and stderr of the real command) and asserts the exit status, that stderr is one
``error: ...`` line per problem naming the field or file (no traceback), and that nothing was
written. The categories (docs/reliability.md counts them): ``flag`` (missing, unknown, stray
arguments), ``config`` (typos, types, config arguments), ``value`` (a rule of `jaxmu.validate`),
``file`` (missing, empty, corrupt, wrong keys), ``array`` (NaN, dtypes, label ranges, masks),
``output`` (--out or --workdir a file, another pipeline's workdir), ``network`` (offline).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxmu import cli, errors

ROOT = Path(__file__).resolve().parents[1]
N, C, K, Z = 40, 4, 2, 20


def _audit_arrays(**changes):
  rng = np.random.default_rng(0)
  arrays = dict(
      original=rng.normal(size=(N, C)).astype(np.float32),
      target=rng.normal(size=(N, C)).astype(np.float32),
      shadows=rng.normal(size=(K, N, C)).astype(np.float32), labels=rng.integers(0, C, N),
      forget=(np.arange(N) < 10).astype(np.int64),
      population_target=rng.normal(size=(Z, C)).astype(np.float32),
      population_shadows=rng.normal(size=(K, Z, C)).astype(np.float32),
      population_labels=rng.integers(0, C, Z),
      shadow_train_logits=rng.normal(size=(K, 8, C)).astype(np.float32),
      shadow_train_labels=rng.integers(0, C, (K, 8)))
  for key, change in changes.items():
    if change is None:
      del arrays[key]
    else:
      arrays[key] = change(arrays[key].copy()) if callable(change) else change
  return arrays


def _set(index, value):
  def change(a):
    a[index] = value
    return a
  return change


AUDIT_FILES = {  # name -> arrays of an audit .npz in the case's directory
    "good": _audit_arrays(),
    "nan_original": _audit_arrays(original=_set((0, 0), np.nan)),
    "inf_shadows": _audit_arrays(shadows=_set((0, 0, 0), np.inf)),
    "nan_population": _audit_arrays(population_target=_set((0, 0), np.nan)),
    "float16": {k: v.astype(np.float16) if v.dtype == np.float32 else v
                for k, v in _audit_arrays().items()},
    "labels_big": _audit_arrays(labels=_set(0, 2 ** 40)),
    "labels_float": _audit_arrays(labels=lambda y: y.astype(np.float64)),
    "population_labels": _audit_arrays(population_labels=_set(0, C + 3)),
    "shadow_train_labels": _audit_arrays(shadow_train_labels=_set((0, 0), C)),
    "mask_all_one": _audit_arrays(forget=np.ones(N, np.int64)),
    "mask_all_zero": _audit_arrays(forget=np.zeros(N, np.int64)),
    "mask_values": _audit_arrays(forget=_set(0, 2)),
    "no_shadows": _audit_arrays(shadows=None),
    "shadows_shape": _audit_arrays(shadows=lambda s: s[:, :-1]),
    "no_queries": _audit_arrays(original=np.zeros((0, C), np.float32),
                                target=np.zeros((0, C), np.float32),
                                shadows=np.zeros((K, 0, C), np.float32),
                                labels=np.zeros(0, np.int64), forget=np.zeros(0, np.int64)),
}


@pytest.fixture
def world(tmp_path):
  """A directory of inputs: audit files, broken files, another pipeline's workdirs."""
  for name, arrays in AUDIT_FILES.items():
    np.savez(tmp_path / f"{name}.npz", **arrays)
  (tmp_path / "empty.npz").write_bytes(b"")
  (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip file")
  np.savez(tmp_path / "unknown_key.npz", **_audit_arrays(), extra=np.zeros(3))
  (tmp_path / "afile").write_text("a file, not a directory\n")
  for name, config in (("du_run", {"search": {}, "methods": ["finetune"], "split": {}}),
                       ("iam_run", {"num_shadows": 2, "model": {"name": "small_cnn"}})):
    run = tmp_path / name
    (run / "stages").mkdir(parents=True)
    (run / ".tmp").mkdir()
    (run / "config.json").write_text(json.dumps(config))
    (run / "splits.npz").write_bytes(b"their splits")
  (tmp_path / "du_run" / "search").mkdir()
  return tmp_path


def _snapshot(root):
  return sorted((str(p.relative_to(root)), p.is_dir() or p.read_bytes())
                for p in root.rglob("*"))


QS = "--config=quickstart"
QI = "--config=quickstart:iam"
UL = "--config=ulira:cpu"
W = "--workdir={w}/new"  # a new workdir: must not appear
BENCH = "--config=bench"
LLM = ("audit-llm", "--out={w}/a")  # audit-llm folders: {l}/<name> (test_audit_llm.bad_logs)
GOOD = "--nll_dir={l}/good"

# id -> (category, argv after `jaxmu`, exit status, texts stderr must hold)
CASES = {
    # deepunlearn
    "deepunlearn/no_workdir": ("flag", ["deepunlearn", QS], 2, ["--workdir"]),
    "deepunlearn/unknown_flag": ("flag", ["deepunlearn", QS, W, "--wrokers=2"], 2, ["wrokers"]),
    "deepunlearn/stray_argument": ("flag", ["deepunlearn", QS, W, "now"], 2,
                                   ["unexpected arguments"]),
    "deepunlearn/config_typo": ("config", ["deepunlearn", QS, W, "--config.trian.epochs=3"], 2,
                                ["unknown config field 'trian'", 'Did you mean "train"']),
    "deepunlearn/config_type": ("config", ["deepunlearn", QS, W, "--config.train.epochs=abc"], 2,
                                ["--config.train.epochs=abc"]),
    "deepunlearn/config_argument": ("config", ["deepunlearn", "--config=quickstart:foo", W], 2,
                                    ["unknown quickstart argument 'foo'"]),
    "deepunlearn/config_missing": ("config", ["deepunlearn", "--config=nosuch", W], 2,
                                   ["nosuch"]),
    "deepunlearn/epochs_negative": ("value", ["deepunlearn", QS, W, "--config.train.epochs=-3"],
                                    2, ["train.epochs: -3 is below 1; fix:"]),
    "deepunlearn/methods_empty": ("value", ["deepunlearn", QS, W, "--config.methods=()"], 2,
                                  ["methods: is empty"]),
    "deepunlearn/methods_twice": ("value", ["deepunlearn", QS, W,
                                            "--config.methods=('finetune','finetune')"], 2,
                                  ["methods: method 'finetune' appears twice"]),
    "deepunlearn/method_epochs": ("value", ["deepunlearn", QS, W,
                                            "--config.unlearn.finetune.num_epochs=-1"], 2,
                                  ["unlearn.finetune.num_epochs"]),
    "deepunlearn/learning_rate": ("value", ["deepunlearn", QS, W,
                                            "--config.unlearn.finetune.learning_rate=-0.1"], 2,
                                  ["unlearn.finetune.learning_rate"]),
    "deepunlearn/ulira_epochs": ("value", ["deepunlearn", QS, W, "--config.ulira.epochs=0"], 2,
                                 ["ulira.epochs"]),
    "deepunlearn/data_dir_missing": ("file", ["deepunlearn", QS, W,
                                              "--config.dataset.name=purchase100",
                                              "--config.model.name=purchase_mlp"], 1,
                                     ["--config.dataset.data_dir"]),
    "deepunlearn/failed_run_keeps_config": ("file", ["deepunlearn", QS, "--workdir={w}/du_run",
                                                     "--config.dataset.name=purchase100",
                                                     "--config.model.name=purchase_mlp"], 1,
                                            ["--config.dataset.data_dir"]),
    "deepunlearn/workdir_file": ("output", ["deepunlearn", QS, "--workdir={w}/afile"], 2,
                                 ["afile is a file"]),
    "deepunlearn/iam_workdir": ("output", ["deepunlearn", QS, "--workdir={w}/iam_run"], 2,
                                ["--workdir", "holds a run of iam", "iam_run/deepunlearn"]),
    # ulira
    "ulira/no_config": ("flag", ["ulira", W], 2, ["--config"]),
    "ulira/search_dir_missing": ("value", ["ulira", UL, W, "--config.search_dir={w}/nosearch"],
                                 2, ["search_dir:", "is not a directory"]),
    "ulira/search_dir_workdir": ("value", ["ulira", UL, W, "--config.search_dir={w}/du_run"], 2,
                                 ["search_dir:", "DeepUnlearn work directory",
                                  "du_run/search"]),
    "ulira/methods_empty": ("value", ["ulira", UL, W, "--config.ulira.methods=()"], 2,
                            ["ulira.methods: is empty"]),
    "ulira/epochs": ("value", ["ulira", UL, W, "--config.ulira.epochs=-2"], 2, ["ulira.epochs"]),
    "ulira/config_typo": ("config", ["ulira", UL, W, "--config.serch_dir=x"], 2,
                          ["unknown config field 'serch_dir'"]),
    "ulira/data_file_missing": ("file", ["ulira", UL, W, "--config.dataset.name=npz",
                                         "--config.dataset.data_dir={w}/nothing.npz"], 1,
                                ["nothing.npz does not exist", "--config.dataset.data_dir"]),
    "ulira/deepunlearn_workdir": ("output", ["ulira", UL, "--workdir={w}/du_run"], 2,
                                  ["holds a run of deepunlearn", "du_run/ulira"]),
    "ulira/iam_workdir": ("output", ["ulira", UL, "--workdir={w}/iam_run"], 2,
                          ["holds a run of iam", "iam_run/ulira"]),
    # iam
    "iam/no_workdir": ("flag", ["iam", QI], 2, ["--workdir"]),
    "iam/data_file_missing": ("file", ["iam", QI, W, "--config.dataset.name=npz",
                                       "--config.dataset.data_dir={w}/nothing.npz"], 1,
                              ["nothing.npz does not exist", "--config.dataset.data_dir"]),
    "iam/config_typo": ("config", ["iam", QI, W, "--config.aprox.methods=()"], 2,
                        ["unknown config field 'aprox'"]),
    "iam/approx_typo": ("value", ["iam", QI, W, "--config.approx.methods=('finetun',)"], 2,
                        ["approx.methods: unknown method 'finetun'"]),
    "iam/target_epochs": ("value", ["iam", QI, W, "--config.train.target_epochs=-1"], 2,
                          ["train.target_epochs"]),
    "iam/seeds_empty": ("value", ["iam", QI, W, "--config.seeds=()"], 2, ["seeds: is empty"]),
    "iam/num_shadows": ("value", ["iam", QI, W, "--config.num_shadows=0"], 2, ["num_shadows"]),
    "iam/forget_type": ("value", ["iam", QI, W, "--config.split.forget=everything"], 2,
                        ["split.forget"]),
    "iam/deepunlearn_workdir": ("output", ["iam", QI, "--workdir={w}/du_run"], 2,
                                ["holds a run of deepunlearn", "du_run/iam"]),
    # iam-matrix
    "iam-matrix/no_workdirs": ("flag", ["iam-matrix"], 2, ["--workdirs"]),
    "iam-matrix/no_match": ("file", ["iam-matrix", "--workdirs={w}/nothing*"], 1,
                            ["--workdirs: no work directory matches"]),
    "iam-matrix/not_a_run": ("file", ["iam-matrix", "--workdirs={w}/du_run",
                                      "--out={w}/matrix"], 1, ["du_run"]),
    "iam-matrix/out_file": ("output", ["iam-matrix", "--workdirs={w}/iam_run",
                                       "--out={w}/afile"], 1, ["--out: ", "afile is a file"]),
    # audit
    "audit/no_logits": ("flag", ["audit"], 2, ["--logits"]),
    "audit/stray_argument": ("flag", ["audit", "--logits={w}/good.npz", "x"], 2,
                             ["unexpected arguments"]),
    "audit/signal": ("flag", ["audit", "--logits={w}/good.npz", "--signal=logit"], 2,
                     ["--signal"]),
    "audit/rmia_dataset": ("flag", ["audit", "--logits={w}/good.npz", "--rmia_dataset=mnist"],
                           2, ["--rmia_dataset"]),
    "audit/attack": ("value", ["audit", "--logits={w}/good.npz", "--attacks=lira"], 1,
                     ["unknown attack 'lira'"]),
    "audit/missing_file": ("file", ["audit", "--logits={w}/nothing.npz", "--out={w}/a"], 1,
                           ["nothing.npz: expected an .npz file"]),
    "audit/empty_file": ("file", ["audit", "--logits={w}/empty.npz", "--out={w}/a"], 1,
                         ["empty.npz: not a readable NumPy file (empty)"]),
    "audit/corrupt_file": ("file", ["audit", "--logits={w}/corrupt.npz", "--out={w}/a"], 1,
                           ["corrupt.npz: not a readable NumPy file"]),
    "audit/unknown_key": ("file", ["audit", "--logits={w}/unknown_key.npz", "--out={w}/a"], 1,
                          ["unknown keys ['extra']"]),
    "audit/missing_key": ("file", ["audit", "--logits={w}/no_shadows.npz", "--out={w}/a"], 1,
                          ["missing keys ['shadows']"]),
    "audit/shape": ("array", ["audit", "--logits={w}/shadows_shape.npz", "--out={w}/a"], 1,
                    ["shadows has shape"]),
    "audit/nan_original": ("array", ["audit", "--logits={w}/nan_original.npz", "--out={w}/a"],
                           1, ["original holds 1 NaN"]),
    "audit/inf_shadows": ("array", ["audit", "--logits={w}/inf_shadows.npz", "--out={w}/a"], 1,
                          ["shadows holds 1 NaN or infinite"]),
    "audit/nan_population": ("array", ["audit", "--logits={w}/nan_population.npz",
                                       "--out={w}/a"], 1, ["population_target holds 1 NaN"]),
    "audit/labels_big": ("array", ["audit", "--logits={w}/labels_big.npz", "--out={w}/a"], 1,
                         ["labels must lie in [0, 4)", "1099511627776"]),
    "audit/labels_float": ("array", ["audit", "--logits={w}/labels_float.npz", "--out={w}/a"],
                           1, ["labels must be integers"]),
    "audit/population_labels": ("array", ["audit", "--logits={w}/population_labels.npz",
                                          "--out={w}/a"], 1, ["population_labels must lie"]),
    "audit/shadow_train_labels": ("array", ["audit", "--logits={w}/shadow_train_labels.npz",
                                            "--out={w}/a"], 1,
                                  ["shadow_train_labels[0] must lie in [0, 4)"]),
    "audit/mask_all_one": ("array", ["audit", "--logits={w}/mask_all_one.npz", "--out={w}/a"], 1,
                           ["forget_mask marks every sample"]),
    "audit/mask_all_zero": ("array", ["audit", "--logits={w}/mask_all_zero.npz", "--out={w}/a"],
                            1, ["forget_mask marks no sample"]),
    "audit/mask_values": ("array", ["audit", "--logits={w}/mask_values.npz", "--out={w}/a"], 1,
                          ["forget_mask must be bool or 0/1"]),
    "audit/no_queries": ("array", ["audit", "--logits={w}/no_queries.npz", "--out={w}/a"], 1,
                         ["no query samples"]),
    "audit/out_file": ("output", ["audit", "--logits={w}/good.npz", "--out={w}/afile"], 1,
                       ["--out: ", "afile is a file"]),
    # plan
    "plan/no_config": ("flag", ["plan"], 2, ["--config"]),
    "plan/config_typo": ("config", ["plan", QS, "--config.sead=1"], 2, ["'sead'"]),
    "plan/methods_empty": ("value", ["plan", QS, "--config.methods=()"], 2,
                           ["methods: is empty"]),
    "plan/iam_value": ("value", ["plan", QI, "--config.audit.k_sweep=(1,64)"], 2,
                       ["audit.k_sweep"]),
    "plan/workdir_file": ("output", ["plan", QS, "--workdir={w}/afile"], 1,
                          ["--workdir: ", "afile is a file"]),
    # prepare-data
    "prepare-data/no_dataset": ("flag", ["prepare-data"], 2, ["--dataset"]),
    "prepare-data/unknown_dataset": ("flag", ["prepare-data", "--dataset=cifar11"], 2,
                                     ["cifar11"]),
    "prepare-data/data_dir_file": ("output", ["prepare-data", "--dataset=cifar10",
                                              "--data_dir={w}/afile"], 1,
                                   ["--data_dir: ", "afile is a file"]),
    # benchmark
    "benchmark/no_config": ("flag", ["benchmark"], 2, ["--config"]),
    "benchmark/config_typo": ("config", ["benchmark", BENCH, "--config.step=3"], 2,
                              ["unknown config field 'step'"]),
    "benchmark/section": ("value", ["benchmark", BENCH, "--config.section=foo"], 2,
                          ["section: unknown section 'foo'"]),
    "benchmark/steps_zero": ("value", ["benchmark", BENCH, "--config.steps=0"], 2,
                             ["steps: 0 is not a whole number >= 1"]),
    "benchmark/model": ("value", ["benchmark", BENCH, "--config.models=('resnet19',)"], 2,
                        ["models: unknown model 'resnet19'"]),
    "benchmark/strategy": ("value", ["benchmark", BENCH, "--config.strategies=('fast',)"], 2,
                           ["strategies"]),
    "benchmark/out_dir": ("output", ["benchmark", BENCH, "--out={w}"], 2,
                          ["--out: ", "is a directory"]),
    "benchmark/stray_argument": ("flag", ["benchmark", BENCH, "x"], 2, ["unexpected arguments"]),
    # audit-llm
    "audit-llm/no_nll_dir": ("flag", [*LLM], 2, ["--nll_dir: missing; fix:"]),
    "audit-llm/stray_argument": ("flag", [*LLM, GOOD, "x"], 2, ["unexpected arguments"]),
    "audit-llm/unknown_flag": ("flag", [*LLM, GOOD, "--atacks=loss"], 2, ["'atacks'"]),
    "audit-llm/rounds_type": ("flag", [*LLM, GOOD, "--bootstrap_rounds=many"], 2,
                              ["--bootstrap_rounds=many"]),
    "audit-llm/rounds": ("value", [*LLM, GOOD, "--bootstrap_rounds=0"], 2,
                         ["--bootstrap_rounds: 0 is below 1; fix:"]),
    "audit-llm/iam_batch": ("value", [*LLM, GOOD, "--iam_batch=-1"], 2, ["--iam_batch: -1 is"]),
    "audit-llm/seed": ("value", [*LLM, GOOD, "--seed=-1"], 2, ["--seed: -1 is below 0; fix:"]),
    "audit-llm/attack": ("value", [*LLM, GOOD, "--attacks=lira"], 2,
                         ["--attacks: unknown ['lira']; fix:"]),
    "audit-llm/attack_twice": ("value", [*LLM, GOOD, "--attacks=loss,loss"], 2,
                               ["--attacks: ", "names an attack twice; fix:"]),
    "audit-llm/attack_needs_file": ("file", [*LLM, "--nll_dir={l}/no_pop", "--attacks=rmia_on"],
                                    2, ["MUSE-News-pop_nlloss.txt: missing, needed by rmia_on"]),
    "audit-llm/no_dir": ("file", [*LLM, "--nll_dir={w}/nowhere"], 2, ["nowhere: no such dir"]),
    "audit-llm/dir_is_file": ("file", [*LLM, "--nll_dir={w}/afile"], 2,
                              ["afile: is a file, not a directory; fix: pass --nll_dir"]),
    "audit-llm/no_label_file": ("file", [*LLM, "--nll_dir={w}"], 2, ["no <prefix>-label.txt"]),
    "audit-llm/prefix": ("file", [*LLM, GOOD, "--prefix=nope"], 2, ["nope-label.txt: missing"]),
    "audit-llm/two_prefixes": ("file", [*LLM, "--nll_dir={l}/two_prefixes"], 2,
                               ["several prefixes (MUSE-News, other); fix: pass --prefix"]),
    **{f"audit-llm/{name}": ("file", [*LLM, f"--nll_dir={{l}}/{name}"], 2, [text])
       for name, text in {
           "binary_label": "MUSE-News-label.txt: not a text file",
           "word": "MUSE-News-nlloss.txt: line 2 ('abc') is not a number",
           "nan": "MUSE-News-fitRef_nlloss.txt: line 4 is nan",
           "negative": "MUSE-News-nlloss.txt: negative value on line 1",
           "label_2": "MUSE-News-label.txt: line 3 is 2; fix: labels are 1",
           "one_class": "MUSE-News-label.txt: every chunk has label 1",
           "nll_is_dir": "MUSE-News-nlloss.txt: is a directory",
           "short": "MUSE-News-ref_nlloss.txt: 89 values but MUSE-News-label.txt has 90",
           "no_values": "MUSE-News-nlloss.txt: no values",
           "partial_pop": "without MUSE-News-pop_ref_nlloss.txt",
           "pop_length": "MUSE-News-pop_fitRef_nlloss.txt: 29 values but",
           "tokens_empty": "MUSE-News-tokens.npz: not a readable .npz",
           "tokens_key": "MUSE-News-tokens.npz: unknown keys ['logits']",
           "tokens_shape": "MUSE-News-tokens.npz: token_entropy has shape (90, 19)"}.items()},
    **{f"audit-llm/{name}": ("array", [*LLM, f"--nll_dir={{l}}/{name}", *flags], 2, [text])
       for name, flags, text in (
           ("tokens_str", (), "MUSE-News-tokens.npz: token_logp holds <U"),
           ("tokens_mask", (), "MUSE-News-tokens.npz: token_mask is not 0/1"),
           ("tokens_text", (), "MUSE-News-tokens.npz: text of chunk 89 is empty"),
           ("ref_zero", ("--attacks=ratio",), "ratio: ref_nll must be > 0"),
           ("few", ("--attacks=bag_of_words",), "bag_of_words needs >= 5 chunks of each label"))},
    "audit-llm/out_file": ("output", ["audit-llm", GOOD, "--out={w}/afile"], 2,
                           ["--out: ", "afile is a file"]),
    "audit-llm/out_in_file": ("output", ["audit-llm", GOOD, "--out={w}/afile/a"], 2,
                              ["--out: ", "afile is a file"]),
}


@pytest.fixture(autouse=True, scope="module")
def _restore_commands():
  """`cli.main` unregisters the flags of other command modules; afterwards the modules loaded
  before (e.g. imported by another test file) are loaded again with their flags."""
  import importlib

  import jaxmu.commands
  before = {n: m for n, m in sys.modules.items() if n.startswith("jaxmu.commands.")}
  yield
  from absl import flags
  flags.FLAGS.unparse_flags()
  cli._forget_other_commands("")
  for name, module in before.items():
    sys.modules[name] = module
    importlib.reload(module)
    setattr(jaxmu.commands, name.rpartition(".")[2], module)


@pytest.fixture(autouse=True)
def _no_training(monkeypatch):
  """A bad input must stop before data loads: loading anything but the file-based dataset of
  the data_dir case fails the test at once instead of training."""
  from jaxmu.pipelines import common
  real = common.load_dataset

  def load_dataset(spec):
    if spec.name not in ("purchase100", "npz"):
      raise RuntimeError(f"a bad input reached data loading ({spec.name})")
    return real(spec)

  monkeypatch.setattr(common, "load_dataset", load_dataset)
  yield
  from absl import flags
  flags.FLAGS.unparse_flags()


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
  """The audit-llm folders (`test_audit_llm.bad_logs`), read only."""
  from test_audit_llm import bad_logs
  return bad_logs(tmp_path_factory.mktemp("llm"))


def _run(argv, capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["jaxmu", *argv])
  return exit_.value.code, capsys.readouterr()


def _check_lines(err, texts):
  lines = err.strip().splitlines()
  assert lines and all(line.startswith("error: ") for line in lines), err
  assert "Traceback" not in err
  for text in texts:
    assert text in err, (text, err)


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_line_per_problem_and_writes_nothing(case, world, llm, capsys):
  _, argv, code, texts = CASES[case]
  before, inputs = _snapshot(world), _snapshot(llm)
  got, captured = _run([a.format(w=world, l=llm) for a in argv], capsys)
  assert got == code, captured.err
  _check_lines(captured.err, [t.format(w=world) for t in texts])
  assert _snapshot(world) == before and _snapshot(llm) == inputs


def test_prepare_data_offline_says_so_within_seconds(world, capsys, monkeypatch):
  """No real traffic: the connection to the download host fails as it does offline."""
  calls = []

  def unreachable(address, timeout=None, *args, **kwargs):
    calls.append((address, timeout))
    raise socket.timeout("timed out")

  monkeypatch.setattr(socket, "create_connection", unreachable)
  before, start = _snapshot(world), time.perf_counter()
  code, captured = _run(["prepare-data", "--dataset=cifar10", f"--data_dir={world}/tfds"], capsys)
  assert time.perf_counter() - start < 5
  assert code == 1 and calls == [(("www.cs.toronto.edu", 443), 3.0)]
  _check_lines(captured.err, ["network: cannot reach www.cs.toronto.edu", "timed out",
                              "on a machine with internet", "--config.dataset.data_dir"])
  assert _snapshot(world) == before


def test_float16_logits_are_audited_like_float32(world, capsys):
  code = None
  try:
    cli.main(["jaxmu", "audit", f"--logits={world}/float16.npz", f"--out={world}/a16",
              "--attacks=iam_on,lira_on"])
  except SystemExit as e:
    code = e.code
  assert not code, capsys.readouterr().err
  rows = (world / "a16" / "metrics.csv").read_text()
  assert "iam_on" in rows and "lira_on" in rows


def test_a_failed_benchmark_row_is_kept_and_the_command_fails(world, capsys):
  """A row that fails at run time (here a model option the model does not take) stays in the
  JSON with its error, the other rows are measured, and the command exits 1 naming the row."""
  code, captured = _run(["benchmark", BENCH, f"--out={world}/bench.json",
                         "--config.models=('purchase_mlp:nosuch=1','purchase_mlp:num_features=8')",
                         "--config.num_models=(1,)", "--config.dtypes=('float32',)",
                         "--config.strategies=('vmap',)", "--config.steps=1",
                         "--config.warmup_steps=0", "--config.repeats=1",
                         "--config.input_shape=(8,)", "--config.batches_per_epoch=1",
                         "--config.batch_size=4", "--config.augment=none"], capsys)
  assert code == 1
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: row model=purchase_mlp:nosuch=1 N=1")
  rows = json.loads((world / "bench.json").read_text())["rows"]
  assert "error" in rows[0] and rows[1]["images_per_s"] > 0


# ---------------------------------------------------------------- the real command


def _command(*args, env=None):
  return subprocess.run([sys.executable, "-m", "jaxmu", *args], capture_output=True, text=True,
                        timeout=300, cwd=ROOT, env={**os.environ, **(env or {})})


def test_the_command_exits_nonzero_with_one_line_and_debug_shows_the_traceback(tmp_path):
  missing = f"--logits={tmp_path}/nothing.npz"
  out = _command("audit", missing, f"--out={tmp_path}/a")
  assert out.returncode == 1 and out.stdout == ""
  assert out.stderr.strip().splitlines() == [
      f"error: {tmp_path}/nothing.npz: expected an .npz file or a directory of <key>.npy files"]
  debug = _command("audit", missing, env={"JAXMU_DEBUG": "1"})
  assert debug.returncode != 0 and "Traceback" in debug.stderr
  assert "FileNotFoundError" in debug.stderr
  assert not any(tmp_path.iterdir())


def test_the_command_validates_before_writing(tmp_path):
  out = _command("deepunlearn", QS, f"--workdir={tmp_path}/w", "--config.train.epochs=-3",
                 "--config.methods=('finetune','finetune')")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "error: train.epochs: -3 is below 1; fix: set train.epochs >= 1",
      "error: methods: method 'finetune' appears twice; fix: list it once"]
  assert not any(tmp_path.iterdir())


def test_debug_flag_raises_in_process(world, capsys):
  with pytest.raises(errors.ConfigError, match="methods: is empty"):
    cli.main(["jaxmu", "deepunlearn", QS, f"--workdir={world}/new", "--config.methods=()",
              "--debug"])


def test_an_interrupt_is_one_line_saying_how_to_resume(capsys):
  def main(argv):
    raise KeyboardInterrupt

  with pytest.raises(SystemExit) as exit_:
    cli.guarded(main)(["jaxmu x"])
  assert exit_.value.code == 130
  _check_lines(capsys.readouterr().err, ["interrupted", "run the same command again"])
