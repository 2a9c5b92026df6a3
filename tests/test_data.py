"""Tests of jaxmu.data: every offline source, recipes, and on-device augmentation."""

import hashlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tensorflow_datasets.core.data_sources import base as tfds_base

from jaxmu import data
from jaxmu.data import augment


# ------------------------------------------------------------------ sources


def test_digits_default_matches_sklearn_split():
  ds = data.load("digits")
  x, y = load_digits(return_X_y=True)
  train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
  order = np.concatenate([train, test])
  assert (ds.num_train, ds.num_test, ds.num_classes) == (1437, 360, 10)
  assert ds.inputs.shape == (1797, 8, 8, 1) and ds.inputs.dtype == np.uint8
  assert ds.labels.dtype == np.int32 and ds.is_image
  np.testing.assert_array_equal(ds.labels, y[order])
  np.testing.assert_array_equal(ds.inputs[:, :, :, 0].reshape(-1, 64), np.round(x[order] * 255 / 16))
  # stratified: class proportions of the test part match the whole set within one sample
  np.testing.assert_allclose(np.bincount(ds.labels[1437:]), np.bincount(y) * 0.2, atol=1)


def test_digits_resized_rgb_is_pil_bilinear():
  small, big = data.load("digits"), data.load("digits", image_size=32, channels=3)
  assert big.inputs.shape == (1797, 32, 32, 3) and big.inputs.dtype == np.uint8
  np.testing.assert_array_equal(big.labels, small.labels)
  for i in (0, 1000):
    expected = Image.fromarray(small.inputs[i, :, :, 0]).resize((32, 32), Image.BILINEAR)
    for c in range(3):
      np.testing.assert_array_equal(big.inputs[i, :, :, c], np.asarray(expected))


def test_synthetic_deterministic_and_shaped():
  a = data.load("synthetic", num_train=10, num_test=5, shape=(4, 4, 3), num_classes=3, seed=1)
  b = data.load("synthetic", num_train=10, num_test=5, shape=(4, 4, 3), num_classes=3, seed=1)
  c = data.load("synthetic", num_train=10, num_test=5, shape=(4, 4, 3), num_classes=3, seed=2)
  assert a.inputs.shape == (15, 4, 4, 3) and (a.num_train, a.num_test, a.num_classes) == (10, 5, 3)
  assert a.labels.max() < 3 and a.labels.dtype == np.int32
  assert a.fingerprint == b.fingerprint != c.fingerprint
  tab = data.load("synthetic", shape=(7,))
  assert tab.inputs.shape == (80, 7) and not tab.is_image


def test_fingerprint_sees_every_byte():
  a = data.load("synthetic")
  inputs = a.inputs.copy()
  inputs[3, 2, 1, 0] ^= 1
  changed = data.Dataset("synthetic", inputs, a.labels, a.num_classes, a.num_train)
  same = data.Dataset("other name", a.inputs.copy(), a.labels.copy(), a.num_classes, a.num_train)
  assert len(a.fingerprint) == 16 and int(a.fingerprint, 16) >= 0
  assert changed.fingerprint != a.fingerprint and same.fingerprint == a.fingerprint


def test_npz_source_and_validation(tmp_path):
  rng = np.random.default_rng(0)
  x, y = rng.integers(0, 256, (20, 6, 6), np.uint8), rng.integers(0, 4, 20)
  np.savez(tmp_path / "d.npz", x=x, y=y, num_train=15)
  ds = data.load("npz", path=tmp_path / "d.npz")
  assert ds.inputs.shape == (20, 6, 6, 1) and (ds.num_train, ds.num_classes) == (15, int(y.max()) + 1)
  np.testing.assert_array_equal(ds.inputs[..., 0], x)
  np.savez(tmp_path / "tab.npz", x=x.reshape(20, 36), y=y)
  tab = data.load("npz", str(tmp_path / "tab.npz"))  # data_dir may name the file too
  assert tab.inputs.shape == (20, 36) and tab.num_train == 20
  bad = {"float_x": dict(x=x.astype(np.float32), y=y), "short_y": dict(x=x, y=y[:5]),
         "no_y": dict(x=x), "float_y": dict(x=x, y=y.astype(float))}
  for name, arrays in bad.items():
    np.savez(tmp_path / f"{name}.npz", **arrays)
    with pytest.raises(ValueError, match="npz"):
      data.load("npz", path=tmp_path / f"{name}.npz")
  np.savez(tmp_path / "big.npz", x=x, y=y, num_train=21)
  with pytest.raises(ValueError, match="num_train"):
    data.load("npz", path=tmp_path / "big.npz")


def test_unknown_dataset_and_missing_files(tmp_path):
  with pytest.raises(ValueError, match="known: .*cifar10.*digits"):
    data.load("imagenet")
  with pytest.raises(ValueError, match="data_dir"):
    data.load("utkface")
  with pytest.raises(FileNotFoundError):
    data.load("cinic10", data_dir=tmp_path / "nowhere")


@pytest.fixture
def mock_tfds(monkeypatch):
  """tfds mock data (random records, no TensorFlow). The mock's bulk `__getitems__` is broken in
  tfds 4.9.10 (its partial lacks `self`), so bulk reads are routed through `__getitem__`."""
  monkeypatch.setattr(tfds_base.BaseDataSource, "__getitems__", lambda self, keys: [self[k] for k in keys])
  with tfds.testing.mock_data(num_examples=6):
    yield


@pytest.mark.parametrize("name,shape,classes", [("mnist", (32, 32, 3), 10), ("fashion_mnist", (32, 32, 3), 10),
                                                ("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100)])
def test_tfds_sources_through_mock_data(mock_tfds, name, shape, classes):
  ds = data.load(name, data_dir="/nonexistent/tfds")
  assert ds.inputs.shape == (12, *shape) and ds.inputs.dtype == np.uint8
  assert (ds.num_train, ds.num_test, ds.num_classes) == (6, 6, classes)
  assert ds.labels.dtype == np.int32 and ds.labels.max() < classes


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_tfds_restores_original_file_order(mock_tfds, name):
  """tfds stores records sorted by md5(split + str(index)); load() undoes that permutation."""
  ds = data.load(name, image_size=None, channels=None)
  for split, offset in (("train", 0), ("test", 6)):
    raw = tfds.data_source(name, split=split, download=False)
    original = np.argsort([hashlib.md5(f"{split}{i}".encode()).hexdigest() for i in range(6)])
    for record, example in enumerate(original):  # record j holds original example original[j]
      np.testing.assert_array_equal(ds.inputs[offset + example], raw[record]["image"])
      assert ds.labels[offset + example] == raw[record]["label"]


def test_mnist_resize_matches_native(mock_tfds):
  native = data.load("mnist", image_size=None, channels=None)
  big = data.load("mnist")
  assert native.inputs.shape == (12, 28, 28, 1)
  np.testing.assert_array_equal(native.labels, big.labels)
  expected = Image.fromarray(native.inputs[7, :, :, 0]).convert("RGB").resize((32, 32), Image.BILINEAR)
  np.testing.assert_array_equal(big.inputs[7], np.asarray(expected))


def test_tfds_missing_dataset_names_prepare_command(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"jaxmu prepare-data --dataset=cifar10 --data_dir="):
    data.load("cifar10", data_dir=str(tmp_path))


def _write_utkface(folder, ages):
  rng = np.random.default_rng(0)
  folder.mkdir()
  names = []
  for i, age in enumerate(ages):
    name = f"{age}_{i % 2}_{i % 4}_2017011{i:04d}.jpg" + (".chip.jpg" if i % 3 == 0 else "")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), np.uint8)).save(folder / name)
    names.append(name)
  (folder / "notes.txt").write_text("not an image")
  return names


def test_utkface_folder(tmp_path):
  ages = [1, 19, 20, 39, 40, 59, 60, 79, 80, 116, 25, 33]
  names = _write_utkface(tmp_path / "utk", ages)
  ds = data.load("utkface", data_dir=tmp_path / "utk", image_size=16)
  order_by_name = np.argsort(names)  # files sorted by name
  perm = np.random.default_rng(123).permutation(12)
  n_test = int(0.2 * 12)
  order = order_by_name[np.concatenate([perm[n_test:], perm[:n_test]])]
  expected_labels = np.clip(np.array(ages) // 20, 0, 4)[order]
  assert (ds.num_train, ds.num_test, ds.num_classes) == (10, 2, 5)
  assert ds.inputs.shape == (12, 16, 16, 3)
  np.testing.assert_array_equal(ds.labels, expected_labels)
  with Image.open(tmp_path / "utk" / names[order[0]]) as im:
    np.testing.assert_array_equal(ds.inputs[0], np.asarray(im.convert("RGB").resize((16, 16), Image.BILINEAR)))
  assert data.load("utkface", path=tmp_path / "utk").inputs.shape == (12, 224, 224, 3)


def test_cinic10_folder(tmp_path):
  classes = ["airplane", "automobile", "bird"]
  rng = np.random.default_rng(0)
  expected = {}
  for split, count in (("train", 3), ("valid", 2), ("test", 1)):
    for c in reversed(classes):  # creation order must not matter
      (tmp_path / split / c).mkdir(parents=True)
      for j in reversed(range(count)):
        image = rng.integers(0, 256, (32, 32, 3), np.uint8)
        Image.fromarray(image).save(tmp_path / split / c / f"img{j}.png")
        expected[split, c, j] = image
  ds = data.load("cinic10", data_dir=tmp_path)
  order = [(s, c, j) for s, n in (("train", 3), ("valid", 2), ("test", 1)) for c in classes for j in range(n)]
  assert (ds.num_train, ds.num_test, ds.num_classes) == (9, 9, 3)
  np.testing.assert_array_equal(ds.labels, [classes.index(c) for _, c, _ in order])
  np.testing.assert_array_equal(ds.inputs, np.stack([expected[k] for k in order]))


def test_purchase100_text_and_npy(tmp_path):
  rng = np.random.default_rng(0)
  rows = np.concatenate([rng.integers(1, 101, (9, 1)), rng.integers(0, 2, (9, 600))], axis=1)
  rows[0, 0], rows[1, 0] = 1, 100
  np.savetxt(tmp_path / "dataset_purchase", rows, fmt="%d", delimiter=",")
  ds = data.load("purchase100", data_dir=tmp_path)
  assert ds.inputs.shape == (9, 600) and ds.inputs.dtype == np.uint8 and not ds.is_image
  assert (ds.num_train, ds.num_test, ds.num_classes) == (9, 0, 100)
  np.testing.assert_array_equal(ds.labels, rows[:, 0] - 1)
  np.testing.assert_array_equal(ds.inputs, rows[:, 1:])
  np.save(tmp_path / "p.npy", rows.astype(np.float32))
  assert data.load("purchase100", path=tmp_path / "p.npy").fingerprint == ds.fingerprint
  np.save(tmp_path / "bad.npy", rows[:, :300])
  with pytest.raises(ValueError, match="601"):
    data.load("purchase100", path=tmp_path / "bad.npy")


def test_recipes():
  r = data.recipe("cifar10")
  assert r.mean == (0.4914, 0.4822, 0.4465) and r.std == (0.2023, 0.1994, 0.2010)
  assert r.augment == "crop_flip" and r.image_size == 32 and r.channels == 3
  assert data.recipe("cifar100").mean == (0.5071, 0.4865, 0.4409)
  assert data.recipe("cifar100", reference="iam").std == (0.2675, 0.2565, 0.2761)
  assert data.recipe("mnist").augment == "flip" and data.recipe("mnist").mean == (0.1307,) * 3
  assert data.recipe("utkface").augment == "none" and data.recipe("utkface").image_size == 224
  p = data.recipe("purchase100", reference="iam")
  assert (p.mean, p.std, p.augment) == ((0.0,), (1.0,), "none")
  assert data.recipe("cinic10").mean == data.recipe("cinic10", reference="iam").mean
  with pytest.raises(ValueError, match="known"):
    data.recipe("imagenet")


# ------------------------------------------------------------------ augmentation


def _numpy_crop_flip(image, dy, dx, flip, pad=4):
  h, w, _ = image.shape
  out = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))[dy:dy + h, dx:dx + w]
  return out[:, ::-1] if flip else out


def test_random_crop_flip_matches_numpy_reference():
  images = np.random.default_rng(0).integers(1, 256, (64, 8, 8, 3), np.uint8)  # no zeros: padding visible
  key = jax.random.key(3)
  out = np.asarray(augment.random_crop_flip(key, images))
  np.testing.assert_array_equal(out, np.asarray(augment.random_crop_flip(key, images)))
  assert not np.array_equal(out, np.asarray(augment.random_crop_flip(jax.random.key(4), images)))
  offsets, flips = [], 0
  for i in range(64):  # recover each sample's offsets and flip by search, then compare
    matches = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
               if np.array_equal(out[i], _numpy_crop_flip(images[i], dy, dx, f))]
    assert matches, f"sample {i} is no zero-padded crop/flip of its input"
    offsets.append(matches[0][:2])
    flips += matches[0][2]
  offsets = np.array(offsets)  # offsets cover [0, 2 * pad] on both axes; p(flip) = 0.5
  assert set(offsets[:, 0]) == set(offsets[:, 1]) == set(range(9)) and 16 < flips < 48


def test_flip_only_and_augment_kinds():
  images = np.random.default_rng(1).integers(0, 256, (32, 5, 5, 1), np.uint8)
  key = jax.random.key(0)
  out = np.asarray(augment.flip_only(key, images))
  flipped = np.array([np.array_equal(o, x[:, ::-1]) and not np.array_equal(o, x) for o, x in zip(out, images)])
  kept = np.array([np.array_equal(o, x) for o, x in zip(out, images)])
  assert (flipped | kept).all() and 4 < flipped.sum() < 28
  np.testing.assert_array_equal(augment.augment(key, images, "flip"), out)
  np.testing.assert_array_equal(augment.augment(key, images, "none"), images)
  np.testing.assert_array_equal(augment.augment(key, images, "crop_flip"), augment.random_crop_flip(key, images))
  with pytest.raises(ValueError, match="crop_flip"):
    augment.augment(key, images, "mixup")


def test_normalize():
  images = np.arange(24, dtype=np.uint8).reshape(1, 2, 4, 3)
  mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
  out = jax.jit(augment.normalize)(images, mean, std)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, (images / 255.0 - np.array(mean)) / np.array(std), rtol=1e-6)
  rows = np.array([[0, 1, 1]], np.uint8)  # tabular: no /255
  np.testing.assert_allclose(augment.normalize(rows, (0.0,), (1.0,)), rows)
  with pytest.raises(ValueError, match="mean"):
    augment.normalize(images, (0.1, 0.2), (1.0,))
