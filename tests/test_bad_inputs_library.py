"""Bad inputs of the library, table-driven: `data.load` and `jaxmu.attacks.audit.audit_file` raise
typed one-line errors naming the file or array and write nothing (tests/test_bad_inputs.py holds
the subcommands' table and the audit files used here)."""

import numpy as np
import pytest
from test_bad_inputs import AUDIT_FILES, _audit_arrays, _snapshot

from jaxmu import data as data_lib
from jaxmu import errors
from jaxmu.attacks.audit import audit_file


# ---------------------------------------------------------------- data.load


def _npz(path, **arrays):
  np.savez(path, **arrays)
  return path


X = np.zeros((6, 4), np.uint8)
LOAD_CASES = {  # id -> (make the file in tmp_path -> load's kwargs, error type, texts)
    "npz/empty_arrays": (lambda t: dict(path=_npz(t / "e.npz", x=np.zeros((0, 4), np.uint8),
                                                  y=np.zeros(0, np.int64))),
                         errors.InputError, ["are empty (0 samples)", "fix:"]),
    "npz/empty_file": (lambda t: dict(path=(t / "z.npz", (t / "z.npz").write_bytes(b""))[0]),
                       errors.InputError, ["z.npz: is not a readable .npz file (empty)"]),
    "npz/corrupt_file": (lambda t: dict(path=(t / "c.npz", (t / "c.npz").write_bytes(b"xx"))[0]),
                         errors.InputError, ["c.npz: is not a readable .npz file", "savez"]),
    "npz/missing_y": (lambda t: dict(path=_npz(t / "m.npz", x=X)), errors.InputError,
                      ["lacks arrays ['y']"]),
    "npz/labels_2**40": (lambda t: dict(path=_npz(t / "l.npz", x=X,
                                                  y=np.array([0, 1, 2, 3, 4, 2 ** 40]))),
                         errors.InputError, ["reaches 1099511627776", "num_classes"]),
    "npz/labels_1e9": (lambda t: dict(path=_npz(t / "b.npz", x=X,
                                                y=np.array([0, 1, 2, 3, 4, 10 ** 9]))),
                       errors.InputError, ["1000000001 classes"]),
    "npz/labels_float": (lambda t: dict(path=_npz(t / "f.npz", x=X, y=np.ones(6) * 1e9)),
                         errors.InputError, ["y: must be integers"]),
    "npz/labels_negative": (lambda t: dict(path=_npz(t / "n.npz", x=X, y=-np.ones(6, int))),
                            errors.InputError, ["negative labels"]),
    "npz/labels_beyond_classes": (lambda t: dict(path=_npz(t / "k.npz", x=X, y=np.arange(6)),
                                                 num_classes=3),
                                  errors.InputError, ["beyond num_classes=3"]),
    "npz/num_train": (lambda t: dict(path=_npz(t / "t.npz", x=X, y=np.arange(6), num_train=9)),
                      errors.InputError, ["num_train: 9 is not in 0..6"]),
    "npz/x_dtype": (lambda t: dict(path=_npz(t / "d.npz", x=X.astype(np.float32),
                                             y=np.arange(6))),
                    errors.InputError, ["x: must be uint8"]),
    "npz/missing_file": (lambda t: dict(path=t / "none.npz"), FileNotFoundError,
                         ["does not exist", "--config.dataset.data_dir"]),
    "cinic10/no_path": (lambda t: {}, errors.InputError,
                        ["dataset.data_dir:", "--config.dataset.data_dir=<CINIC-10 folder"]),
    "purchase100/no_path": (lambda t: {}, errors.InputError, ["--config.dataset.data_dir="]),
    "utkface/no_path": (lambda t: {}, errors.InputError, ["--config.dataset.data_dir="]),
    "nosuch/unknown": (lambda t: {}, errors.InputError, ["unknown dataset 'nosuch'", "digits"]),
    "digits/unknown_option": (lambda t: dict(size=3), errors.InputError,
                              ["takes no option(s) ['size']"]),
}


@pytest.mark.parametrize("case", LOAD_CASES)
def test_data_load_names_the_problem(case, tmp_path):
  make, error, texts = LOAD_CASES[case]
  kwargs = make(tmp_path)
  before = _snapshot(tmp_path)
  with pytest.raises(error) as raised:
    data_lib.load(case.split("/")[0], **kwargs)
  message = str(raised.value)
  assert "\n" not in message
  for text in texts:
    assert text in message, (text, message)
  assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------- audit (the library)


AUDIT_CASES = {  # file name of AUDIT_FILES -> texts of the InputError
    name: texts for name, texts in {
        "nan_original": ["original holds"], "nan_population": ["population_target holds"],
        "labels_big": ["labels must lie"], "population_labels": ["population_labels must lie"],
        "shadow_train_labels": ["shadow_train_labels[0]"],
        "mask_all_one": ["every sample"], "mask_all_zero": ["no sample"],
        "no_queries": ["no query samples"], "shadows_shape": ["shadows has shape"]}.items()}


@pytest.mark.parametrize("name", AUDIT_CASES)
def test_audit_raises_input_errors_naming_the_array(name):
  with pytest.raises(errors.InputError) as raised:
    audit_file(AUDIT_FILES[name])
  for text in AUDIT_CASES[name]:
    assert text in str(raised.value)
  assert "fit " not in str(raised.value) and "target_z" not in str(raised.value)


def test_audit_widens_float16_and_bfloat16():
  import ml_dtypes
  base = audit_file(_audit_arrays(), attacks=["iam_on", "lira_on"])
  for dtype in (np.float16, ml_dtypes.bfloat16):
    low = {k: v.astype(dtype).astype(np.float32).astype(dtype) if v.dtype == np.float32 else v
           for k, v in _audit_arrays().items()}
    result = audit_file(low, attacks=["iam_on", "lira_on"])
    assert set(result.scores) == set(base.scores)
    assert all(np.isfinite(s).all() for s in result.scores.values())
