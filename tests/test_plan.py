"""The plan of a run (`jaxmu.plan`): every shipped config at full counts, hand-counted FLOPs and
sample-passes, stage order, reuse of a real workdir, the launcher."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import finished_run, iam_recipe

from jaxmu.configs import deepunlearn as deepunlearn_config
from jaxmu.configs import iam as iam_config
from jaxmu.configs import quickstart, ulira
from jaxmu import models, plan
from jaxmu.models import small
from jaxmu.pipelines import deepunlearn, iam

ROOT = Path(__file__).resolve().parents[1]
ULIRA_STAGES = ("splits", "init", "train", "unlearn", "ulira", "report")
# The arch setting's shadow architecture for each target model.
OTHER_ARCH = {"resnet18": ("small_cnn", {}), "small_cnn": ("resnet18", {"stem": "cifar"}),
              "purchase_mlp": ("purchase_mlp", {})}


def _kinds(p):
  """Stage names in order, per-method and U-LiRA sub-stages folded into their pipeline stage."""
  out = []
  for s in p.stages:
    name = s.name.split("/")[0]
    kind = name.split("_")[0] if name.startswith(("unlearn_", "approx_")) else name
    if not out or out[-1] != kind:
      out.append(kind)
  return out


def _check(p, stage_order):
  kinds = _kinds(p)
  assert kinds == [k for k in stage_order if k in kinds], kinds
  assert p.totals["flops"] > 0 and p.totals["disk_bytes"] > 0
  for s in p.stages:
    assert s.programs <= s.models and (s.programs > 0 or not s.sample_passes), s
    assert s.memory_bytes > 0 or not s.sample_passes, s
    assert s.device_seconds == pytest.approx(s.flops / (p.rate_tflops * 1e12))
  text = p.markdown()
  assert all(f"| {s.name} |" in text for s in p.stages)


def _stage(p, name):
  return next(s for s in p.stages if s.name == name)


@pytest.mark.parametrize("dataset", ("mnist", "fashion_mnist", "cifar10", "cifar100", "utkface"))
def test_deepunlearn_every_dataset_and_model(dataset):
  for model in ("resnet18", "tinyvit_11m"):
    c = deepunlearn_config.get_config(f"dataset={dataset},model={model}")
    c.ulira.enabled = True
    p = plan.make(c)
    assert p.pipeline == "deepunlearn"
    _check(p, deepunlearn.STAGES)
    n_train = {"mnist": 60000, "fashion_mnist": 60000, "utkface": 18967}.get(dataset, 50000)
    train_part = n_train - -(-15 * n_train // 100)  # sklearn: ceil(0.15 n) held out
    forget = -(-train_part // 10)
    train = _stage(p, "train")
    assert (train.models, train.programs) == (20, 1)
    assert train.sample_passes == c.train.epochs * 10 * (train_part + train_part - forget)
    assert _stage(p, "search").models == 18 * 100 * 3
    assert sum(s.name.startswith("unlearn_") for s in p.stages) == 18
    ulira_train = _stage(p, "ulira/train")
    assert (ulira_train.models, ulira_train.programs) == (64 + 640, 11)


def test_ulira_alone_counts_by_hand():
  p = plan.make(ulira.get_config())
  assert p.pipeline == "ulira"
  _check(p, ULIRA_STAGES)
  # CIFAR-10: val 2,500, IN 23,750, retain 21,375; 64 originals + 640 retrained, 91 epochs.
  assert _stage(p, "train").sample_passes == 91 * (64 * 23750 + 640 * 21375) == 1_383_200_000
  assert _stage(p, "unlearn_original").sample_passes == 0
  assert _stage(p, "unlearn_finetune").sample_passes == 640 * 5 * 21375


@pytest.mark.parametrize("dataset", ("cifar10", "cifar100", "cinic10", "purchase100", "digits"))
def test_iam_every_dataset_setting_and_type(dataset, tmp_path):
  for setting in ("exact", "arch", "shifted", "incremental"):
    for forget in ("set_random", "class_percentage", "one_class", "set_random+class_percentage"):
      c = iam_recipe(dataset, setting, forget, tmp_path)
      if setting == "arch":
        c.shadow_model.name, c.shadow_model.options = OTHER_ARCH[c.model.name]
      p = plan.make(c)
      assert p.pipeline == "iam"
      _check(p, iam.STAGES)
      assert set(p.archs) == {"model", "shadow"}
      assert p.archs["shadow"].name == (c.shadow_model.name or c.model.name)
      shadows = _stage(p, "shadows")
      assert shadows.models == (0 if setting == "incremental" else c.num_shadows + 1)
      assert (shadows.sample_passes == 0) == (setting == "incremental")
  c = iam_config.get_config(f"dataset={dataset}")
  c.reuse.shadows = c.reuse.targets = finished_run(tmp_path / "reused",
                                                   iam_config.get_config(f"dataset={dataset}"))
  p = plan.make(c)
  assert [_stage(p, s).sample_passes for s in ("shadows", "ref_in", "targets")] == [0, 0, 0]


def test_iam_cifar100_counts_by_hand():
  c = iam_config.get_config("dataset=cifar100")
  p = plan.make(c)
  # Shadows: 10 on int(0.8 x 20,000) + the origin on 20,000; targets: the original on the
  # 30,000 pool, 10 set_random retrained on 29,500, 10 class_percentage on 30,000 - 30.
  assert _stage(p, "shadows").sample_passes == 201 * (10 * 16000 + 20000)
  assert _stage(p, "targets").sample_passes == 201 * (30000 + 10 * 29500 + 10 * 29970)
  assert _stage(p, "score_ui").sample_passes == c.score_ui.epochs * 10 * 30000
  assert _stage(p, "targets").models == 21


def test_small_cnn_step_flops_match_a_hand_count():
  """XLA's count of the lowered step against 3 x 2 x the multiply-adds of the convolutions and
  the dense layer (forward, then backward twice as much), within a factor 1.5."""
  c = quickstart.get_config()
  arch = plan.make(c).archs["model"]
  b, w = c.train.batch_size, 32  # 8x8x1 digits; small_cnn width 32
  macs = b * (8 * 8 * 9 * 1 * w + 4 * 4 * 9 * w * 2 * w + 2 * w * 10)
  assert 1 / 1.5 < arch.step_flops / (3 * 2 * macs) < 1.5
  assert 1 / 1.5 < arch.forward_flops * b / (2 * macs) < 1.5
  assert arch.variable_bytes >= 4 * (9 * w + 9 * w * 2 * w + 2 * w * 10)
  assert arch.state_bytes > arch.variable_bytes


def test_rate_scales_device_time():
  c = quickstart.get_config()
  slow, fast = plan.make(c, rate_tflops=50), plan.make(c, rate_tflops=200)
  assert slow.totals["flops"] == fast.totals["flops"]
  assert slow.totals["device_hours"] == pytest.approx(4 * fast.totals["device_hours"])


def _snapshot(root):
  return {str(p): p.stat().st_mtime_ns for p in Path(root).rglob("*")}


def test_reuse_of_a_real_workdir(tmp_path):
  config = quickstart.get_config()
  config.stop_after = "init"
  deepunlearn.run(config, tmp_path)
  before = _snapshot(tmp_path)
  reuse = {s.name: s.reuse for s in plan.make(config, tmp_path).stages}
  assert _snapshot(tmp_path) == before  # only read
  assert reuse["splits"] == reuse["init"] == "reused"
  assert reuse["train"] == "new" and reuse["ulira/train"] == "new"
  assert reuse["search"].startswith("runs")
  config.seeds = (0, 1, 2)
  config.search.seeds = (0, 1, 2)
  reuse = {s.name: s.reuse for s in plan.make(config, tmp_path).stages}
  assert (reuse["splits"], reuse["init"]) == ("reused", "config changed: seeds")
  config.seeds = (0, 1, 2, 3)
  config.split.val_ratio = 0.2
  reuse = {s.name: s.reuse for s in plan.make(config, tmp_path).stages}
  assert reuse["splits"] == "config changed: split.val_ratio"
  assert reuse["init"] == "reused"  # it reads no split
  config.split.val_ratio = 0.15
  (tmp_path / "models" / "init").rename(tmp_path / "moved")
  assert _stage(plan.make(config, tmp_path), "init").reuse == "outputs missing"
  assert all(s.reuse == "" for s in plan.make(config, tmp_path / "absent").stages)


def test_launcher_writes_plan_md_and_json(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "jaxmu", "plan", "--config=quickstart:iam",
       f"--workdir={tmp_path}", "--rate_tflops=50", "--compilation_cache="],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "| shadows |" in out.stdout and "50 TFLOP/s" in out.stdout
  saved = json.loads((tmp_path / "plan.json").read_text())
  assert saved["pipeline"] == "iam" and saved["rate_tflops"] == 50
  assert [s["name"] for s in saved["stages"]][:4] == ["splits", "shadows", "ref_in", "targets"]
  assert (tmp_path / "plan.md").read_text().startswith("# Plan: iam: digits / small_cnn")


def test_arch_costs_follow_the_architecture_not_its_name(monkeypatch):
  """A model registered again under the same name (as `jaxmu.smoke.tiny_models` does) is lowered
  again: the cache is keyed by the module (class and fields), not by ``model.name``."""
  c = quickstart.get_config()
  narrow = plan.make(c).archs["model"]
  monkeypatch.setitem(models._FACTORIES, "small_cnn", lambda n, width=32: small.small_cnn(n, 64))
  wide = plan.make(c).archs["model"]
  assert wide.name == narrow.name == "small_cnn"
  assert wide.variable_bytes > 3 * narrow.variable_bytes and wide.step_flops > narrow.step_flops


def test_defaults_runs_faithful_variants_and_sensitivity_are_planned():
  c = quickstart.get_config()  # msg, ct, neggrad_plus also at their defaults and most accurate
  p = plan.make(c)
  runs = [f"{m}{v}" for v in ("@defaults", "@accurate") for m in c.search.methods]
  assert [s.name for s in p.stages if "@" in s.name] == [f"unlearn_{r}" for r in runs]
  evaluate, n = _stage(p, "evaluate"), len(c.seeds)
  assert {f"unlearn_{r}" for r in runs} <= set(evaluate.deps)
  assert evaluate.forward_passes == (2 + len(c.methods) + len(runs)) * n * 1797
  c = iam_config.get_config("dataset=cifar100")
  p = plan.make(c)
  assert [s.name for s in p.stages][5:8] == ["binui", "scoring", "sensitivity"]
  approx = {s.name: s for s in p.stages if s.name.startswith("approx_")}
  faithful = {f"approx_{m}@faithful" for m in c.approx.faithful}
  assert faithful <= set(approx) and "approx_ssd" in approx
  assert approx["approx_forsaken@faithful"].record == "approx_forsaken"
  r = _stage(p, "targets").models - 1
  assert approx["approx_forsaken@faithful"].sample_passes == r * 1 * 10 * 128  # one iteration
  c.approx.faithful = ()
  c.sensitivity.eps = ()
  p = plan.make(c)
  assert _stage(p, "approx_forsaken").sample_passes == r * 100 * 10 * 128
  assert "sensitivity" not in [s.name for s in p.stages]


def test_wall_time_over_processes_divides_the_split_stages_only():
  """The DeepUnlearn recipe (10 seeds): the 20-model training stack, each unlearning and
  evaluated stack of 10 and each trial's tuning stack split over processes by their largest
  share; the rest not. Checked against the shares computed here by hand."""
  p = plan.make(deepunlearn_config.get_config())
  hours = {s.name: s.device_seconds / 3600 for s in p.stages}
  seeds, tuning = 10, len(deepunlearn_config.get_config().search.seeds)
  stacks = sum(h for n, h in hours.items() if n.startswith("unlearn_") or n == "evaluate")
  whole = sum(h for n, h in hours.items() if n not in ("train", "search", "evaluate") and
              not n.startswith("unlearn_"))
  assert hours["evaluate"] > 0
  by_p = {r["processes"]: r for r in p.over_processes}
  assert by_p[1]["wall_hours"] == pytest.approx(p.totals["device_hours"])
  for procs, train_share, seeds_share in ((2, 10 / 20, 5 / seeds), (4, 5 / 20, 3 / seeds),
                                          (16, 2 / 20, 1.0)):  # 10 < 16: whole on each
    search_share = 1.0 if tuning < procs else -(-tuning // procs) / tuning
    want = (hours["train"] * train_share + stacks * seeds_share
            + hours["search"] * search_share + whole)
    assert by_p[procs]["wall_hours"] == pytest.approx(want)
    assert by_p[procs]["device_hours"] == pytest.approx(procs * want)
  assert "| 4 |" in p.markdown() and p.to_json()["over_processes"][2]["processes"] == 4


def test_iam_signals_split_each_stack_it_predicts():
  """IAM on CIFAR-100: the signals stage's forward passes by stack (10 shadows, the original,
  20 targets, single models), each stack's largest share on 2 and 16 processes."""
  signals = _stage(plan.make(iam_config.get_config("dataset=cifar100")), "signals")
  pool, shadow_pool, val, r = 30000, 20000, 5000, 20  # val: half the 10,000 test samples
  assert signals.stacks == ((10, 10 * (pool + r * val + shadow_pool)), (1, pool), (r, r * pool),
                            (1, 2 * r * val + shadow_pool))
  assert signals.forward_passes == sum(f for _, f in signals.stacks)
  shadows, targets = signals.stacks[0][1], signals.stacks[2][1]
  alone = plan.Plan("iam", "signals", 100.0, [signals], {}, None)
  for procs, shadow_share, target_share in ((2, 5 / 10, 10 / 20), (16, 1.0, 2 / 20)):
    want = 1 - (shadows * (1 - shadow_share) + targets * (1 - target_share)) / (
        signals.forward_passes)
    assert alone.wall_hours(procs) == pytest.approx(signals.device_seconds / 3600 * want)
