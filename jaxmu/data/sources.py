"""Dataset sources: every dataset is a uint8 array plus int32 labels in one global index space.

The global index space is the reference's `ConcatDataset([official_train, official_test])`
(deepunlearn-spec 1.4): indices `0 .. num_train-1` are the official training part and
`num_train .. N-1` the official test part, each in its native order. Split files (see
`jaxmu.data.splits`) hold indices into this space.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import pathlib
import zipfile
from typing import NamedTuple

import ml_collections
import numpy as np

from jaxmu.errors import InputError, problem


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A whole dataset in memory: official train part followed by official test part.

  Attributes:
    name: source name (`load`'s first argument).
    inputs: uint8, NHWC for images, [N, D] for tabular data.
    labels: int32 [N], 0-based.
    num_classes: number of classes.
    num_train: size of the official training part (the first `num_train` rows).
  """

  name: str
  inputs: np.ndarray
  labels: np.ndarray
  num_classes: int
  num_train: int

  def __post_init__(self):
    if self.inputs.dtype != np.uint8 or self.inputs.ndim not in (2, 4):
      raise ValueError(f"inputs must be uint8 of rank 2 ([N, D]) or 4 (NHWC), got "
                       f"{self.inputs.dtype} of shape {self.inputs.shape}")
    if self.labels.dtype != np.int32 or self.labels.shape != self.inputs.shape[:1]:
      raise ValueError(f"labels must be int32 of shape {self.inputs.shape[:1]}, got "
                       f"{self.labels.dtype} of shape {self.labels.shape}")
    if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < self.num_classes:
      raise ValueError(f"labels must lie in [0, num_classes={self.num_classes})")
    if not 0 <= self.num_train <= len(self.labels):
      raise ValueError(f"num_train must lie in [0, {len(self.labels)}], got {self.num_train}")

  @property
  def num_test(self) -> int:
    return len(self.labels) - self.num_train

  @property
  def is_image(self) -> bool:
    return self.inputs.ndim == 4

  @functools.cached_property
  def fingerprint(self) -> str:
    """sha256 (16 hex digits) of shape, dtype and bytes of inputs and labels, and num_train."""
    h = hashlib.sha256()
    for a in (self.inputs, self.labels):
      h.update(f"{a.shape}{a.dtype}".encode())
      h.update(np.ascontiguousarray(a).data)
    h.update(str(self.num_train).encode())
    return h.hexdigest()[:16]


def _dataset(name, inputs, labels, num_classes, num_train) -> Dataset:
  return Dataset(name, np.ascontiguousarray(inputs, np.uint8),
                 np.asarray(labels, np.int32), int(num_classes), int(num_train))


# ---------------------------------------------------------------- image helpers


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """PIL bilinear resize of one HxWxC uint8 image to size x size (torchvision `Resize` on PIL)."""
  from PIL import Image
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  return np.asarray(pil.resize((size, size), Image.BILINEAR)).reshape(size, size, -1)


def _reshape(images: np.ndarray, image_size: int | None, channels: int | None) -> np.ndarray:
  """Resizes a NHWC batch (host side, PIL bilinear) and replicates grey to `channels`."""
  if image_size and images.shape[1:3] != (image_size, image_size):
    images = np.stack([_resize(im, image_size) for im in images])
  if channels and channels != images.shape[-1]:
    if images.shape[-1] != 1:
      raise ValueError(f"channels={channels} needs grey images, got {images.shape[-1]} channels")
    images = np.repeat(images, channels, axis=-1)
  return images


def _read_image(path: pathlib.Path, image_size: int | None) -> np.ndarray:
  """One image file as RGB uint8 HxWx3, resized to image_size (PIL bilinear) when given."""
  from PIL import Image
  with Image.open(path) as im:
    image = np.asarray(im.convert("RGB"))
  return _resize(image, image_size) if image_size and image.shape[:2] != (image_size,) * 2 else image


def _path(data_dir, path, name) -> pathlib.Path:
  """The file or folder of a file-based source: `path=` or else `data_dir`."""
  where = path or data_dir
  if not where:
    raise problem("dataset.data_dir", f"dataset {name!r} is read from local files and none is "
                  "given", f"pass --config.dataset.data_dir=<{_WHAT[name]}> (in Python: "
                  f"data.load({name!r}, data_dir=...)); README, \"Datasets\"")
  where = pathlib.Path(where).expanduser()
  if not where.exists():
    raise FileNotFoundError(f"dataset.data_dir: {where} does not exist (dataset {name!r}); fix: "
                            f"give the {_WHAT[name]} as --config.dataset.data_dir")
  return where


_WHAT = {"utkface": "folder of UTKFace .jpg files", "cinic10": "CINIC-10 folder (train/ valid/ "
         "test/)", "purchase100": "folder or file of dataset_purchase / purchase.npy",
         "npz": ".npz file with x, y"}


# ---------------------------------------------------------------- sources


def _digits(data_dir=None, image_size=None, channels=None) -> Dataset:
  """sklearn's bundled 8x8 digits (1,797 images, offline): the embedded default.

  Official train/test = `train_test_split(test_size=0.2, stratify=y, random_state=0)` (1,437 / 360).
  Pixels 0..16 become uint8 round(x * 255 / 16). `image_size=32, channels=3` resizes (PIL bilinear)
  and replicates the grey channel, as the reference does for MNIST (deepunlearn-spec 1.2).
  """
  del data_dir
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  x, y = load_digits(return_X_y=True)
  train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
  order = np.concatenate([train, test])
  images = np.round(x[order] * 255 / 16).astype(np.uint8).reshape(-1, 8, 8, 1)
  return _dataset("digits", _reshape(images, image_size, channels), y[order], 10, len(train))


def _synthetic(data_dir=None, num_train=64, num_test=16, shape=(8, 8, 1), num_classes=10,
               seed=0) -> Dataset:
  """Random uint8 inputs of any `shape` and uniform random labels, deterministic in `seed`."""
  del data_dir
  rng = np.random.default_rng(seed)
  n = num_train + num_test
  inputs = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  return _dataset("synthetic", inputs, rng.integers(0, num_classes, n), num_classes, num_train)


_TFDS = {  # name -> (num_classes, default load options: the reference's model input)
    "mnist": (10, dict(image_size=32, channels=3)),
    "fashion_mnist": (10, dict(image_size=32, channels=3)),
    "cifar10": (10, {}),
    "cifar100": (100, {}),  # tfds "label" is the fine label
}


def _read_native(source, split, chunk=4096) -> tuple[np.ndarray, np.ndarray]:
  """All (images, labels) of a tfds split, in the order of the original files.

  tfds stores the examples of these datasets sorted by md5(split name + str(original index))
  (`tfds.core.hashing`, stable across tfds versions); record j is therefore original example
  `argsort(hashes)[j]`. (Check: CIFAR-10's first train record is "train_16399", as in the tfds
  catalog.)
  """
  n = len(source)
  chunks = (list(range(s, min(n, s + chunk))) for s in range(0, n, chunk))
  records = [record for keys in chunks for record in source.__getitems__(keys)]
  hashes = [int(hashlib.md5(f"{split}{i}".encode()).hexdigest(), 16) for i in range(n)]
  native = np.empty(n, np.int64)
  native[np.argsort(hashes)] = np.arange(n)  # native[i] = record position of example i
  return (np.stack([records[j]["image"] for j in native]),
          np.array([records[j]["label"] for j in native]))


def _tfds(name, data_dir=None, image_size=None, channels=None) -> Dataset:
  """MNIST, Fashion-MNIST, CIFAR-10/100 from a prepared tensorflow-datasets folder.

  Reads with `tfds.data_source(download=False)` (no TensorFlow needed); never downloads. MNIST and
  Fashion-MNIST become 32x32x3 by default like the reference (deepunlearn-spec 1.1/1.2: PIL
  bilinear `Resize((32, 32))` + RGB replication); pass `image_size=None, channels=None` to keep
  28x28x1. CIFAR-100 uses the fine labels. The official train/test parts keep the order of the
  original files, which torchvision reads too, so reference split files index the same examples.
  """
  import tensorflow_datasets as tfds
  parts = []
  for split in ("train", "test"):
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises NotImplementedError, FileNotFoundError, ... when absent
      flag = f" --data_dir={data_dir}" if data_dir else ""
      raise FileNotFoundError(
          f"dataset {name!r} is not prepared (array_record format) in the tfds data_dir "
          f"{data_dir or '~/tensorflow_datasets'}: run `jaxmu prepare-data "
          f"--dataset={name}{flag}` on a machine with internet (needs `pip install "
          f"'jaxmu[tfds]'`). tfds said: {e}") from e
    parts.append(_read_native(source, split))
  (x_train, y_train), (x_test, y_test) = parts
  inputs = _reshape(np.concatenate([x_train, x_test]), image_size, channels)
  return _dataset(name, inputs, np.concatenate([y_train, y_test]), _TFDS[name][0], len(y_train))


def _utkface(data_dir=None, path=None, image_size=224) -> Dataset:
  """UTKFace "Aligned&Cropped" JPEGs `<age>_<gender>_<race>_<datetime>.jpg[.chip.jpg]` in one folder.

  deepunlearn-spec 1.3: label = clip(floor(age / 20), 0, 4); perm = default_rng(123).permutation(N),
  test = perm[:int(0.2 N)], train = the rest; global order = train then test (each in perm order);
  images resized (PIL bilinear) to `image_size` (224). Deviations: files are **sorted by name**
  (the reference used filesystem order, which is not reproducible), and images are converted to
  RGB (the reference opened them as stored).
  """
  root = _path(data_dir, path, "utkface")
  files = sorted(p for p in root.iterdir() if p.name.endswith(".jpg"))
  if not files:
    raise FileNotFoundError(f"utkface: no .jpg files in {root}")
  try:
    ages = np.array([int(p.name.split("_")[0]) for p in files])
  except ValueError as e:
    raise ValueError(f"utkface: file names must start with '<age>_': {e}") from e
  perm = np.random.default_rng(123).permutation(len(files))
  n_test = int(0.2 * len(files))
  order = np.concatenate([perm[n_test:], perm[:n_test]])
  images = np.stack([_read_image(files[i], image_size) for i in order])
  return _dataset("utkface", images, np.clip(ages[order] // 20, 0, 4), 5, len(files) - n_test)


def _cinic10(data_dir=None, path=None) -> Dataset:
  """CINIC-10 from its standard layout `<root>/{train,valid,test}/<class>/*.png` (iam-spec 5).

  Classes are the sorted folder names of `train` (airplane .. truck, CINIC's standard order), files
  sorted within each class, as torchvision `ImageFolder` orders them. Official train = `train`
  (90,000); official test = `valid` followed by `test` (180,000), IAM's held-out set.
  """
  root = _path(data_dir, path, "cinic10")
  classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())

  def part(split):
    folder = root / split
    unknown = {d.name for d in folder.iterdir() if d.is_dir()} - set(classes)
    if unknown:
      raise ValueError(f"cinic10: classes {sorted(unknown)} in {folder} are not in "
                       f"{root / 'train'}")
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((folder / name).glob("*.png"))]
    return [f for f, _ in files], [c for _, c in files]

  (train_files, train_labels), *held_out = [part(s) for s in ("train", "valid", "test")]
  files = train_files + [f for fs, _ in held_out for f in fs]
  labels = train_labels + [c for _, cs in held_out for c in cs]
  images = np.stack([_read_image(f, None) for f in files])
  return _dataset("cinic10", images, labels, len(classes), len(train_files))


def _purchase100(data_dir=None, path=None) -> Dataset:
  """Purchase-100: rows `label (1..100), 600 binary features` (iam-spec 5).

  Reads the standard comma-separated text file (`dataset_purchase`) or IAM's `purchase.npy`
  ([N, 601], column 0 = label); a folder is searched for those two names. num_train = N: there is
  no official split (IAM's 80/20 held-out split is made by `splits.iam`).
  """
  where = _path(data_dir, path, "purchase100")
  if where.is_dir():
    found = [where / n for n in ("purchase.npy", "dataset_purchase") if (where / n).exists()]
    if not found:
      raise FileNotFoundError(f"purchase100: neither purchase.npy nor dataset_purchase in {where}")
    where = found[0]
  if where.suffix == ".npy":
    rows = np.load(where)
  else:
    rows = np.loadtxt(where, delimiter=",", dtype=np.int64)
  if rows.ndim != 2 or rows.shape[1] != 601:
    raise ValueError(f"purchase100: expected rows of 601 values (label, 600 features), "
                     f"got shape {rows.shape}")
  labels, features = rows[:, 0].astype(np.int64) - 1, rows[:, 1:]
  if labels.min() < 0 or labels.max() >= 100 or not np.isin(features, (0, 1)).all():
    raise ValueError("purchase100: labels must lie in 1..100 and features in {0, 1}")
  return _dataset("purchase100", features, labels, 100, len(labels))


def _npz(data_dir=None, path=None, num_classes=None) -> Dataset:
  """User arrays from an .npz file: `x` (uint8, [N, D], [N, H, W] or NHWC), `y` (integer labels
  0..C-1, [N]) and optionally `num_train` (default N: everything is training data)."""
  where = _path(data_dir, path, "npz")
  fix = "write it with numpy.savez(path, x=uint8 inputs, y=integer labels[, num_train=n])"
  try:
    with np.load(where) as z:
      missing = {"x", "y"} - set(z.files)
      if missing:
        raise problem(str(where), f"lacks arrays {sorted(missing)} (needs x, y, optional "
                      "num_train)", fix)
      x, y = z["x"], z["y"]
      num_train = int(z["num_train"]) if "num_train" in z.files else len(y)
  except (OSError, EOFError, zipfile.BadZipFile, KeyError, TypeError) as e:
    raise problem(str(where), f"is not a readable .npz file "
                  f"({'empty' if where.stat().st_size == 0 else type(e).__name__})", fix) from e
  except ValueError as e:
    if isinstance(e, InputError):
      raise
    raise problem(str(where), f"is not a readable .npz file ({e})", fix) from e
  if x.dtype != np.uint8 or x.ndim not in (2, 3, 4):
    raise problem(f"{where}: x", f"must be uint8 of shape [N, D], [N, H, W] or [N, H, W, C], "
                  f"got {x.dtype} {x.shape}", "convert with x.astype(numpy.uint8)")
  if not np.issubdtype(y.dtype, np.integer) or y.shape != x.shape[:1]:
    raise problem(f"{where}: y", f"must be integers of shape {x.shape[:1]}, got {y.dtype} "
                  f"{y.shape}", "give one integer label per row of x")
  if not len(y):
    raise problem(f"{where}: x, y", "are empty (0 samples)", "give at least one sample")
  if y.min() < 0:
    raise problem(f"{where}: y", f"holds negative labels (min {y.min()})", "use labels 0..C-1")
  top = int(y.max())
  if num_classes is not None and top >= num_classes:
    raise problem(f"{where}: y", f"reaches {top}, beyond num_classes={num_classes}",
                  f"use labels 0..{num_classes - 1} or raise num_classes")
  if num_classes is None and top >= MAX_CLASSES:
    raise problem(f"{where}: y", f"reaches {top}: that would make {top + 1} classes",
                  f"use labels 0..C-1 with C <= {MAX_CLASSES} (e.g. numpy.unique(y, "
                  "return_inverse=True)) or pass num_classes=")
  if not 0 <= num_train <= len(y):
    raise problem(f"{where}: num_train", f"{num_train} is not in 0..{len(y)}",
                  "give the size of the training part (the first rows)")
  x = x[..., None] if x.ndim == 3 else x
  return _dataset("npz", x, y, num_classes or top + 1, num_train)


# The most classes labels may imply when num_classes is not given (a stray large label
# would otherwise make a model with a billion outputs).
MAX_CLASSES = 100_000


_SOURCES = {
    "digits": _digits,
    "synthetic": _synthetic,
    **{name: functools.partial(_tfds, name, **options) for name, (_, options) in _TFDS.items()},
    "utkface": _utkface,
    "cinic10": _cinic10,
    "purchase100": _purchase100,
    "npz": _npz,
}


class Metadata(NamedTuple):
  """What is known of a dataset before it is loaded (or prepared)."""
  num_train: int  # official training part
  num_test: int  # official test part (0: none, e.g. Purchase)
  num_classes: int
  shape: tuple[int, ...]  # one input, with the source's default options


# The reference's sizes (deepunlearn-spec 1.1-1.3, iam-spec 5): UTKFace as its 23,708 files,
# CINIC-10's test part = valid + test.
KNOWN = {
    "digits": Metadata(1437, 360, 10, (8, 8, 1)),
    "mnist": Metadata(60000, 10000, 10, (32, 32, 3)),
    "fashion_mnist": Metadata(60000, 10000, 10, (32, 32, 3)),
    "cifar10": Metadata(50000, 10000, 10, (32, 32, 3)),
    "cifar100": Metadata(50000, 10000, 100, (32, 32, 3)),
    "cinic10": Metadata(90000, 180000, 10, (32, 32, 3)),
    "utkface": Metadata(18967, 4741, 5, (224, 224, 3)),
    "purchase100": Metadata(197324, 0, 100, (600,)),
}


# (size, channels) of the stored images where the source's default options change them
_NATIVE = {"digits": (8, 1), "mnist": (28, 1), "fashion_mnist": (28, 1), "utkface": (200, 3)}


def metadata(name: str, **options) -> Metadata | None:
  """`KNOWN` metadata of ``name`` loaded with ``options`` (image_size, channels; synthetic's
  num_train, num_test, shape, num_classes); None when only loading tells (npz, unknown names)."""
  if name == "synthetic":
    defaults = {k: p.default for k, p in inspect.signature(_synthetic).parameters.items()}
    o = {**defaults, **options}
    return Metadata(o["num_train"], o["num_test"], o["num_classes"], tuple(o["shape"]))
  if name not in KNOWN:
    return None
  meta, options = KNOWN[name], {**_TFDS.get(name, (0, {}))[1], **options}
  if len(meta.shape) == 1 or not {"image_size", "channels"} & set(options):
    return meta
  size, channels = _NATIVE.get(name, meta.shape[1:])
  size = options.get("image_size") or size
  return meta._replace(shape=(size, size, options.get("channels") or channels))


def load(name: str, data_dir: str | None = None, **options) -> Dataset:
  """Loads dataset `name` as one `Dataset` (official train part, then official test part).

  Args:
    name: one of digits, synthetic, mnist, fashion_mnist, cifar10, cifar100, utkface, cinic10,
      purchase100, npz.
    data_dir: the tfds data_dir for the tfds sources; the folder (utkface, cinic10, purchase100)
      or file (purchase100, npz) for file-based sources, which also accept `path=`.
    **options: source options (see each source): e.g. digits `image_size=32, channels=3`;
      synthetic `num_train, num_test, shape, num_classes, seed`; mnist `image_size=None,
      channels=None` for the native 28x28x1; utkface `image_size`.
  """
  if name not in _SOURCES:
    raise problem("dataset.name", f"unknown dataset {name!r}",
                  f"use one of the known: {', '.join(sorted(_SOURCES))}")
  accepted = inspect.signature(_SOURCES[name]).parameters
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise problem("dataset.options", f"dataset {name!r} takes no option(s) {unknown}",
                  f"use {', '.join(k for k in accepted if k != 'data_dir') or 'none'}")
  return _SOURCES[name](data_dir=data_dir, **options)


# ---------------------------------------------------------------- recipes

_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_CIFAR10 = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),
                augment="crop_flip", image_size=32, channels=3)
_IAM_ONLY = {
    "cinic10": dict(mean=(0.47889522, 0.47227842, 0.43047404),
                    std=(0.24205776, 0.23828046, 0.25874835),
                    augment="crop_flip", image_size=32, channels=3),
    "purchase100": dict(mean=(0.0,), std=(1.0,), augment="none", image_size=None, channels=None),
}
_RECIPES = {
    "deepunlearn": {  # deepunlearn-spec 1.1 / 1.2
        "mnist": dict(mean=(0.1307,) * 3, std=(0.3081,) * 3, augment="flip", image_size=32, channels=3),
        "fashion_mnist": dict(mean=(0.2860,) * 3, std=(0.3530,) * 3, augment="flip", image_size=32,
                              channels=3),
        "cifar10": _CIFAR10,
        "cifar100": dict(_CIFAR10, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
        "utkface": dict(_IMAGENET, augment="none", image_size=224, channels=3),
        **_IAM_ONLY,
    },
    "iam": {  # iam-spec 5
        "cifar10": _CIFAR10,
        "cifar100": dict(_CIFAR10, mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761)),
        **_IAM_ONLY,
    },
}
_LOCAL = {  # datasets of neither reference
  # digits: mean/std of round(x*255/16)/255 over the official train part; no augmentation.
    "digits": dict(mean=(0.3054,), std=(0.3760,), augment="none", image_size=8, channels=1),
    "synthetic": dict(mean=(0.0,), std=(1.0,), augment="none", image_size=None, channels=None),
    "npz": dict(mean=(0.0,), std=(1.0,), augment="none", image_size=None, channels=None),
}


def recipe(name: str, reference: str = "deepunlearn") -> ml_collections.ConfigDict:
  """Reference normalisation and augmentation for `name`: ConfigDict(mean, std, augment,
  image_size, channels).

  `reference="deepunlearn"` gives deepunlearn-spec 1.1/1.2; `reference="iam"` gives iam-spec 5
  (CIFAR-100 constants differ slightly; Purchase: no augmentation and no normalisation, mean 0,
  std 1). A dataset only one reference used (cinic10, purchase100 / mnist, fashion_mnist, utkface)
  gets that reference's values under either name. `mean`/`std` of length 1 apply to every channel.
  IAM applies flip then crop, DeepUnlearn crop then flip: the same distribution ("crop_flip").
  """
  if reference not in _RECIPES:
    raise ValueError(f"reference must be one of {sorted(_RECIPES)}, got {reference!r}")
  other = _RECIPES["iam" if reference == "deepunlearn" else "deepunlearn"]
  for table in (_RECIPES[reference], other, _LOCAL):
    if name in table:
      return ml_collections.ConfigDict(table[name])
  raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(_SOURCES))}")
