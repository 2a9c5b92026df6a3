"""Tests of jaxmu.data.splits against sklearn / numpy calls written out here and hand counts."""

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from jaxmu import data, errors
from jaxmu.data import splits


@pytest.mark.parametrize("num_train,num_test,sizes", [
    (50_000, 10_000, dict(train=42_500, val=7_500, retain=38_250, forget=4_250, test=10_000)),  # CIFAR
    (60_000, 10_000, dict(train=51_000, val=9_000, retain=45_900, forget=5_100, test=10_000)),  # MNIST
    (18_967, 4_741, dict(train=16_121, val=2_846, retain=14_508, forget=1_613, test=4_741)),  # UTKFace
])
def test_deepunlearn_fixed_splits(num_train, num_test, sizes):
  s = splits.deepunlearn(num_train, num_test)
  assert {k: len(v) for k, v in s.items()} == sizes
  train, val = train_test_split(np.arange(num_train), test_size=0.15, random_state=123)
  retain, forget = train_test_split(train, test_size=0.10, random_state=123)
  for key, expected in dict(train=train, val=val, retain=retain, forget=forget,
                            test=np.arange(num_train, num_train + num_test)).items():
    np.testing.assert_array_equal(s[key], expected)
  assert set(s["retain"]) | set(s["forget"]) == set(s["train"])
  assert not set(s["val"]) & set(s["train"])


def test_read_reference(tmp_path):
  s = splits.deepunlearn(200, 50)
  for k, v in s.items():
    np.save(tmp_path / f"{k}.npy", v.astype(np.int64))
  read = splits.read_reference(tmp_path)
  assert set(read) == {"train", "retain", "forget", "val", "test"}
  for k in s:
    np.testing.assert_array_equal(read[k], s[k])


def test_class_forget():
  labels = np.array([0, 1, 2, 1, 1, 0, 1, 2, 1, 1, 1])
  order = np.array([10, 1, 3, 0, 4, 6, 8, 9, 2])  # class 1 in this order: 10, 1, 3, 4, 6, 8, 9
  half = splits.class_forget(labels, order, 1, 0.5)  # floor(0.5 * 7) = 3 first ones
  np.testing.assert_array_equal(half["forget"], [10, 1, 3])
  np.testing.assert_array_equal(half["retain"], [0, 4, 6, 8, 9, 2])
  whole = splits.one_class(labels, order, 1)
  np.testing.assert_array_equal(whole["forget"], [10, 1, 3, 4, 6, 8, 9])
  np.testing.assert_array_equal(whole["retain"], [0, 2])
  assert len(splits.class_forget(labels, order, 2, 0.1)["forget"]) == 0  # floor(0.1 * 1) = 0


def test_lira_deepunlearn_scheme():
  n, num_splits, draws = 50_000, 3, 2
  s = splits.lira(n, num_splits=num_splits, num_forget_draws=draws)
  perm = np.random.default_rng(123).permutation(np.arange(n))
  np.testing.assert_array_equal(s["val"], perm[-2500:])
  assert s["in"].shape == s["out"].shape == (3, 23_750)
  assert s["retain"].shape == (3, 2, 21_375) and s["forget"].shape == (3, 2, 2_375)
  for split in range(num_splits):
    p = np.random.default_rng(split).permutation(perm[:-2500])
    np.testing.assert_array_equal(s["in"][split], p[:23_750])
    np.testing.assert_array_equal(s["out"][split], p[23_750:])
    for f in range(draws):
      q = np.random.default_rng(f).permutation(p[:23_750])
      np.testing.assert_array_equal(s["retain"][split, f], q[:21_375])
      np.testing.assert_array_equal(s["forget"][split, f], q[21_375:])
    np.testing.assert_array_equal(np.flatnonzero(s["keep"][split]), np.sort(p[:23_750]))


def test_lira_balanced_scheme():
  n, num_splits = 1_000, 8
  s = splits.lira(n, num_splits=num_splits, num_forget_draws=3, scheme="balanced", seed=5)
  keep, val = s["keep"], s["val"]
  assert len(val) == 50 and not keep[:, val].any()
  dev = np.setdiff1d(np.arange(n), val)
  np.testing.assert_array_equal(keep[:, dev].sum(0), num_splits // 2)  # IN in exactly half
  for split in range(num_splits):
    members = s["in"][split][s["in"][split] >= 0]
    np.testing.assert_array_equal(members, np.flatnonzero(keep[split]))
    np.testing.assert_array_equal(np.sort(np.concatenate([members, s["out"][split][s["out"][split] >= 0]])), dev)
    for f in range(3):
      retain, forget = (s[k][split, f][s[k][split, f] >= 0] for k in ("retain", "forget"))
      assert len(forget) == int(len(members) * 0.1)
      np.testing.assert_array_equal(np.sort(np.concatenate([retain, forget])), members)
  again = splits.lira(n, num_splits=num_splits, num_forget_draws=3, scheme="balanced", seed=5)
  np.testing.assert_array_equal(again["forget"], s["forget"])
  assert not np.array_equal(splits.lira(n, num_splits=num_splits, scheme="balanced", seed=6)["keep"], keep)


def test_iam_set_random_cifar_structure():
  s = splits.iam(50_000, 10_000, shadow_size=20_000, seed=42, num_shadows=3)
  assert len(s["pool"]) == 30_000 and len(s["shadow_pool"]) == 20_000
  assert len(s["forget"]) == 500 and len(s["retain"]) == 29_500
  assert len(s["test"]) == len(s["val"]) == 5_000
  assert set(s["pool"]) | set(s["shadow_pool"]) == set(range(50_000))
  assert set(s["test"]) | set(s["val"]) == set(range(50_000, 60_000))
  np.testing.assert_array_equal(s["forget"], s["pool"][s["flags"]])
  np.testing.assert_array_equal(s["retain"], s["pool"][~s["flags"]])
  assert s["flags"][-100:].all()  # the last 100 pool positions are forgotten in every seed
  other = splits.iam(50_000, 10_000, shadow_size=20_000, seed=43)
  np.testing.assert_array_equal(other["pool"], s["pool"])
  np.testing.assert_array_equal(other["forget"][-100:], s["forget"][-100:])
  assert len(set(other["forget"]) & set(s["forget"])) < 120
  assert not np.array_equal(other["val"], s["val"])  # the held-out split depends on the seed
  # shadows: 15,800 random + the 200 last shadow-pool positions; 4,000 held out
  assert s["shadow_train"].shape == (3, 16_000) and s["shadow_test"].shape == (3, 4_000)
  fixed = s["shadow_pool"][-200:]
  for k in range(3):
    train, test = s["shadow_train"][k], s["shadow_test"][k]
    assert set(fixed) <= set(train) and not set(train) & set(test)
    assert set(train) | set(test) == set(s["shadow_pool"])
  assert len(set(s["shadow_train"][0]) & set(s["shadow_train"][1])) < 13_500
  more = splits.iam_shadows(s["shadow_pool"], 2, first=2)  # shadow k never depends on the batch
  np.testing.assert_array_equal(more["shadow_train"][0], s["shadow_train"][2])


def test_iam_purchase_holdout_and_class_modes():
  s = splits.iam(197_324, 0, shadow_size=40_000)
  assert len(s["pool"]) == 117_859 and len(s["test"]) == 19_733 and len(s["val"]) == 5_000
  assert len(set(s["pool"]) | set(s["shadow_pool"]) | set(s["test"])) == 117_859 + 40_000 + 19_733
  labels = np.random.default_rng(0).integers(0, 10, 600)
  c = splits.iam(500, 100, shadow_size=200, labels=labels, forget="class_percentage",
                 forget_class=3, class_ratio=0.5)
  members = c["pool"][labels[c["pool"]] == 3]
  np.testing.assert_array_equal(c["forget"], members[:len(members) // 2])
  one = splits.iam(500, 100, shadow_size=200, labels=labels, forget="one_class", forget_class=3)
  np.testing.assert_array_equal(one["forget"], members)


def test_save_load_roundtrip_and_fingerprint_mismatch(tmp_path):
  ds = data.load("synthetic", num_train=40, num_test=10)
  s = splits.deepunlearn(ds.num_train, ds.num_test)
  s["keep"] = np.ones((2, 40), bool)
  path = tmp_path / "splits.npz"
  splits.save(path, s, ds)
  assert [p.name for p in tmp_path.iterdir()] == ["splits.npz"]  # no temp file left
  loaded = splits.load(path, ds)
  assert set(loaded) == set(s)
  for k in s:
    np.testing.assert_array_equal(loaded[k], s[k])
  other = data.load("synthetic", num_train=40, num_test=10, seed=1)
  with pytest.raises(ValueError, match=f"another dataset.*{ds.fingerprint}.*{other.fingerprint}"):
    splits.load(path, other)


@pytest.mark.parametrize("call,parameter", [
    (lambda: splits.deepunlearn(100, 10, val_ratio=1.0), r"val_ratio must lie in \(0, 1\)"),
    (lambda: splits.deepunlearn(100, 10, forget_ratio=0.0), r"forget_ratio must lie in \(0, 1\)"),
    (lambda: splits.lira(100, val_ratio=-0.1), r"val_ratio must lie in \(0, 1\)"),
    (lambda: splits.lira(100, num_splits=3, scheme="balanced"), "num_splits must be even"),
    (lambda: splits.lira(100, scheme="carlini"), "scheme"),
    (lambda: splits.class_forget(np.arange(5) % 2, np.arange(5), 7), r"cls must be a class present .*0\.\.1"),
    (lambda: splits.class_forget(np.arange(5) % 2, np.arange(5), 1, 1.5), r"percentage must lie in \(0, 1\]"),
    (lambda: splits.class_forget(np.arange(5) % 2, np.arange(5), 1, 0.0), r"percentage must lie in \(0, 1\]"),
    (lambda: splits.iam(1000, 100, shadow_size=1000), r"shadow_size must lie in \[1, 999\]"),
    (lambda: splits.iam(1000, 100, shadow_size=400, forget_size=601), r"forget_size must lie in \[1, 600\]"),
    (lambda: splits.iam(1000, 100, shadow_size=400, forget_size=50), r"fixed_forget must lie in \[0, 50\]"),
    (lambda: splits.iam(1000, 100, shadow_size=400, forget="one_class"), "needs labels"),
    (lambda: splits.iam(1000, 100, shadow_size=400, forget="class_percentage", class_ratio=2.0),
     r"class_ratio must lie in \(0, 1\]"),
    (lambda: splits.iam_shadows(np.arange(100), 1, shadow_fix=81), r"shadow_fix must lie in \[0, 80\]"),
])
def test_bad_inputs_name_parameter_and_range(call, parameter):
  with pytest.raises(ValueError, match=parameter):
    call()


def test_an_empty_forget_set_names_the_config_field():
  """class_percentage flooring to no sample (40 of class 3 in the pool x 0.02) and a LiRA
  forget_ratio flooring to none are `ConfigError`s at split time, one line with the fix."""
  labels = np.arange(600) % 10
  with pytest.raises(errors.ConfigError) as raised:
    splits.iam(500, 100, shadow_size=100, labels=labels, forget="class_percentage",
               forget_class=3, class_ratio=0.02)
  assert str(raised.value) == ("split.class_ratio: 0.02 of the 40 samples of class 3 in the pool "
                               "forgets none (floor); fix: set split.class_ratio >= 0.025")
  with pytest.raises(errors.ConfigError, match=r"^ulira.lira.forget_ratio: 0.01 of a split's 47 "
                     r"IN samples forgets none \(floor\); fix: .* >= 0.0213$"):
    splits.lira(100, num_splits=2, num_forget_draws=1, forget_ratio=0.01)
