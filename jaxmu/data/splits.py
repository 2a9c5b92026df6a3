"""Deterministic index splits into a dataset's global index space (official train ‖ official test).

Every function returns a dict of numpy index arrays (int64; bool for masks). `save`/`load` keep
them in an .npz together with the fingerprint of the dataset they belong to. A config whose
forget set comes out empty (`iam`'s class_percentage, `lira`'s forget_ratio) is a `ConfigError`
naming the config field, raised before anything trains.
"""

from __future__ import annotations

import pathlib

import numpy as np
from sklearn.model_selection import train_test_split

from jaxmu import errors, stages

REFERENCE_KEYS = ("train", "retain", "forget", "val", "test")
_FINGERPRINT = "_dataset_fingerprint"


def _check_ratio(name, value, closed_right=False):
  if not (0 < value <= 1 if closed_right else 0 < value < 1):
    raise ValueError(f"{name} must lie in (0, 1{']' if closed_right else ')'}, got {value}")


def _check_count(name, value, low, high):
  if not low <= value <= high:
    raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")


def deepunlearn(num_train: int, num_test: int, val_ratio: float = 0.15,
                forget_ratio: float = 0.10, seed: int = 123) -> dict[str, np.ndarray]:
  """DeepUnlearn's fixed splits (deepunlearn-spec 1.5), index for index.

  train, val = train_test_split(arange(num_train), test_size=val_ratio, random_state=seed);
  retain, forget = train_test_split(train, test_size=forget_ratio, random_state=seed);
  test = the whole official test part. Arrays keep sklearn's shuffled order, like the
  reference's `.npy` files. CIFAR-10: 42,500 / 38,250 / 4,250 / 7,500 / 10,000.
  """
  _check_ratio("val_ratio", val_ratio)
  _check_ratio("forget_ratio", forget_ratio)
  train, val = train_test_split(np.arange(num_train), test_size=val_ratio, random_state=seed)
  retain, forget = train_test_split(train, test_size=forget_ratio, random_state=seed)
  test = np.arange(num_train, num_train + num_test)
  return dict(train=train, retain=retain, forget=forget, val=val, test=test)


def read_reference(directory) -> dict[str, np.ndarray]:
  """Reads the reference's own split files `<directory>/{train,retain,forget,val,test}.npy`
  (`artifacts/fixed_splits/<dataset>/123/`, deepunlearn-spec 1.5)."""
  directory = pathlib.Path(directory)
  return {k: np.load(directory / f"{k}.npy").astype(np.int64) for k in REFERENCE_KEYS}


def class_forget(labels, train_indices, cls: int, percentage: float = 1.0) -> dict[str, np.ndarray]:
  """Forgets class `cls` of `train_indices`: all of it, or its first floor(percentage · n_c)
  samples in the given order (IAM `one_class` / `class_percentage`, iam-spec 5.3-5.4; no
  randomness). Returns retain (the other indices, order kept) and forget."""
  labels, train_indices = np.asarray(labels), np.asarray(train_indices)
  _check_ratio("percentage", percentage, closed_right=True)
  present = np.unique(labels[train_indices])
  if cls not in present:
    raise ValueError(f"cls must be a class present in the training indices "
                     f"({present.min()}..{present.max()}), got {cls}")
  members = np.flatnonzero(labels[train_indices] == cls)
  forgotten = np.zeros(len(train_indices), bool)
  forgotten[members[:int(percentage * len(members))]] = True
  return dict(retain=train_indices[~forgotten], forget=train_indices[forgotten])


def one_class(labels, train_indices, cls: int) -> dict[str, np.ndarray]:
  """Forgets every sample of class `cls` (IAM `one_class`)."""
  return class_forget(labels, train_indices, cls, 1.0)


def iam_shadows(shadow_pool, num_shadows: int, first: int = 0, shadow_fix: int = 200,
                shadow_train_frac: float = 0.8, seed: int = 42) -> dict[str, np.ndarray]:
  """Train/test index sets of IAM shadow models `first .. first+num_shadows-1` (iam-spec 6.3).

  Structure as the reference: with P = |shadow_pool| and T = int(frac · P) − fix, shadow k trains
  on perm[:T] ++ the last `shadow_fix` pool positions (shared by every shadow) and holds out
  perm[T:], perm a random permutation of the first P − fix positions. CIFAR: 16,000 / 4,000.
  Deviation: perm comes from `default_rng([seed, k])`, so shadow k does not depend on which
  shadows are asked for together (the reference's torch seed chain did, iam-spec 12.10).
  Returns shadow_train [K, T + fix] and shadow_test [K, P − T − fix] (global indices).
  """
  shadow_pool = np.asarray(shadow_pool)
  size = len(shadow_pool)
  _check_ratio("shadow_train_frac", shadow_train_frac)
  n_random = int(shadow_train_frac * size) - shadow_fix
  _check_count("shadow_fix", shadow_fix, 0, int(shadow_train_frac * size))
  fixed = np.arange(size - shadow_fix, size)
  train, test = [], []
  for k in range(first, first + num_shadows):
    perm = np.random.default_rng([seed, k]).permutation(size - shadow_fix)
    train.append(shadow_pool[np.concatenate([perm[:n_random], fixed])])
    test.append(shadow_pool[perm[n_random:]])
  width = (n_random + shadow_fix, size - n_random - shadow_fix)
  return dict(shadow_train=np.array(train, np.int64).reshape(num_shadows, width[0]),
              shadow_test=np.array(test, np.int64).reshape(num_shadows, width[1]))


def iam(num_train: int, num_test: int, shadow_size: int, seed: int = 42, forget: str = "set_random",
        forget_size: int = 500, fixed_forget: int = 100, labels=None, forget_class: int = 0,
        class_ratio: float = 0.1, num_shadows: int = 0, shadow_fix: int = 200,
        shadow_train_frac: float = 0.8, holdout_ratio: float = 0.2, val_cap: int = 5000,
        split_seed: int = 42) -> dict[str, np.ndarray]:
  """IAM's splits for one forget seed (iam-spec 5, 6.3, 7.1); structure as the reference.

  1. Held-out part: the official test part; when there is none (num_test = 0, Purchase), a random
     `holdout_ratio` of the training part (train = first int((1 − ratio) · N) of a permutation).
  2. shadow_pool = the first `shadow_size` of a fixed permutation (`split_seed`) of the training
     part, pool (the target's training set, "cut_train_set") = the rest, in that order.
  3. Forget set, positions in pool, with `seed`: "set_random" = the last `fixed_forget` pool
     positions (forgotten in every seed) plus `forget_size − fixed_forget` random others;
     "class_percentage" = the first floor(class_ratio · n_c) of class `forget_class` in pool
     order; "one_class" = all of it (these two need `labels`, the dataset's labels).
     `flags` marks forgotten pool positions; retain and forget keep pool order.
  4. Held-out → test (first ceil(n/2) of a `seed` permutation) and val (the rest, capped to
     `val_cap`), seed dependent as in the reference.
  5. With num_shadows > 0: `iam_shadows(shadow_pool, num_shadows, ...)` (shared by all seeds).
  CIFAR-10: pool 30,000, shadow pool 20,000, forget 500, test 5,000, val 5,000.
  Deviation: indices come from numpy generators (`default_rng([seed, stream])`), not the
  reference's torch `randperm` chains, which cannot be reproduced exactly.
  """
  _check_count("shadow_size", shadow_size, 1, num_train - 1)
  if num_test:
    train, held_out = np.arange(num_train), np.arange(num_train, num_train + num_test)
  else:
    _check_ratio("holdout_ratio", holdout_ratio)
    perm = np.random.default_rng([split_seed, 0]).permutation(num_train)
    cut = int((1 - holdout_ratio) * num_train)
    train, held_out = perm[:cut], perm[cut:]
    _check_count("shadow_size", shadow_size, 1, cut - 1)
  perm = np.random.default_rng([split_seed, 1]).permutation(len(train))
  shadow_pool, pool = train[perm[:shadow_size]], train[perm[shadow_size:]]

  if forget == "set_random":
    n = len(pool)
    _check_count("forget_size", forget_size, 1, n)
    _check_count("fixed_forget", fixed_forget, 0, forget_size)
    shuffled = np.concatenate([np.random.default_rng([seed, 0]).permutation(n - fixed_forget),
                               np.arange(n - fixed_forget, n)])
    flags = np.zeros(n, bool)
    flags[shuffled[n - forget_size:]] = True
  elif forget in ("class_percentage", "one_class"):
    _check_ratio("class_ratio", class_ratio, closed_right=True)
    if labels is None:
      raise ValueError(f"forget={forget!r} needs labels=")
    ratio = class_ratio if forget == "class_percentage" else 1.0
    flags = np.isin(pool, class_forget(labels, pool, forget_class, ratio)["forget"])
    if not flags.any():
      members = int(np.sum(np.asarray(labels)[pool] == forget_class))
      raise errors.ConfigError([errors.Problem(
          "split.class_ratio", f"{class_ratio} of the {members} samples of class {forget_class} "
          "in the pool forgets none (floor)", f"set split.class_ratio >= {1 / members:.3g}")])
  else:
    raise ValueError("forget must be one of set_random, class_percentage, one_class, "
                     f"got {forget!r}")

  held = held_out[np.random.default_rng([seed, 1]).permutation(len(held_out))]
  n_test = (len(held) + 1) // 2
  out = dict(pool=pool, shadow_pool=shadow_pool, flags=flags, retain=pool[~flags],
             forget=pool[flags], test=held[:n_test], val=held[n_test:][:val_cap])
  if num_shadows:
    out.update(iam_shadows(shadow_pool, num_shadows, shadow_fix=shadow_fix,
                           shadow_train_frac=shadow_train_frac, seed=split_seed))
  return out


def _padded(rows) -> np.ndarray:
  """Stacks 1-D index arrays into [len(rows), longest], padding shorter rows with -1."""
  out = np.full((len(rows), max(map(len, rows))), -1, np.int64)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def lira(num_train: int, num_splits: int = 64, num_forget_draws: int = 10, scheme: str = "deepunlearn",
         val_ratio: float = 0.05, forget_ratio: float = 0.1, seed: int = 123) -> dict[str, np.ndarray]:
  """LiRA / U-LiRA splits of the official training part.

  scheme="deepunlearn" follows deepunlearn-spec 7.1 exactly: perm = default_rng(seed).permutation(
  num_train); val = perm[-int(num_train · val_ratio):]; dev = the rest. Split s: p =
  default_rng(s).permutation(dev), in = p[:len(dev) // 2], out = the rest. Draw f: q =
  default_rng(f).permutation(in_s), forget = the last int(len(in_s) · forget_ratio) of q, retain
  the rest. CIFAR-10: val 2,500, in/out 23,750, retain 21,375, forget 2,375.
  scheme="balanced" (Carlini et al.'s LiRA): per example, random ranks across the splits; the
  example is IN for the splits where its rank < num_splits / 2, so each example is IN in exactly
  half the splits (split sizes vary); forget draws from `default_rng([seed, s, f])`.
  Returns val [V], in / out [S, ·], retain / forget [S, F, ·] (for "balanced", rows are padded
  with -1 to a common length), and keep [S, num_train] (bool, IN membership; val never IN).
  """
  _check_ratio("val_ratio", val_ratio)
  _check_ratio("forget_ratio", forget_ratio)
  if num_splits < 1 or num_forget_draws < 1:
    raise ValueError(f"num_splits and num_forget_draws must be >= 1, got {num_splits}, "
                     f"{num_forget_draws}")
  n_val = int(num_train * val_ratio)
  _check_count("int(num_train * val_ratio)", n_val, 1, num_train - 2)
  perm = np.random.default_rng(seed).permutation(num_train)
  val, dev = perm[-n_val:], perm[:-n_val]

  if scheme == "deepunlearn":
    ins, outs = [], []
    for s in range(num_splits):
      p = np.random.default_rng(s).permutation(dev)
      ins.append(p[:len(dev) // 2])
      outs.append(p[len(dev) // 2:])
    draws = [[np.random.default_rng(f).permutation(in_s) for f in range(num_forget_draws)]
             for in_s in ins]
  elif scheme == "balanced":
    if num_splits % 2:
      raise ValueError(f"num_splits must be even for scheme='balanced', got {num_splits}")
    ranks = np.random.default_rng(seed).random((num_splits, len(dev))).argsort(0).argsort(0)
    keep_dev = ranks < num_splits // 2
    ins = [np.sort(dev[k]) for k in keep_dev]
    outs = [np.sort(dev[~k]) for k in keep_dev]
    draws = [[np.random.default_rng([seed, s, f]).permutation(in_s) for f in range(num_forget_draws)]
             for s, in_s in enumerate(ins)]
  else:
    raise ValueError(f"scheme must be 'deepunlearn' or 'balanced', got {scheme!r}")

  n_keep = [len(in_s) - int(len(in_s) * forget_ratio) for in_s in ins]
  smallest = min(map(len, ins))
  if int(smallest * forget_ratio) < 1:
    raise errors.ConfigError([errors.Problem(
        "ulira.lira.forget_ratio", f"{forget_ratio} of a split's {smallest} IN samples forgets "
        "none (floor)", f"set ulira.lira.forget_ratio >= {1 / smallest:.3g}")])
  retain = _padded([q[:n] for n, qs in zip(n_keep, draws) for q in qs])
  forget = _padded([q[n:] for n, qs in zip(n_keep, draws) for q in qs])
  keep = np.zeros((num_splits, num_train), bool)
  for s, in_s in enumerate(ins):
    keep[s, in_s] = True
  shape = (num_splits, num_forget_draws, -1)
  return {"val": val, "in": _padded(ins), "out": _padded(outs), "retain": retain.reshape(shape),
          "forget": forget.reshape(shape), "keep": keep}


def save(path, splits: dict[str, np.ndarray], dataset) -> None:
  """Writes `splits` to the .npz `path` with `dataset.fingerprint`, atomically
  (`jaxmu.stages.atomic_write`)."""
  if _FINGERPRINT in splits:
    raise ValueError(f"split name {_FINGERPRINT!r} is reserved")
  with stages.atomic_write(path) as f:
    np.savez(f, **{k: np.asarray(v) for k, v in splits.items()},
             **{_FINGERPRINT: dataset.fingerprint})


def load(path, dataset) -> dict[str, np.ndarray]:
  """Reads splits written by `save`; ValueError if they belong to another dataset."""
  with np.load(path) as z:
    found = str(z[_FINGERPRINT])
    if found != dataset.fingerprint:
      raise ValueError(f"split file {path} belongs to another dataset: its fingerprint is "
                       f"{found}, dataset {dataset.name!r} has {dataset.fingerprint}")
    return {k: z[k] for k in z.files if k != _FINGERPRINT}
