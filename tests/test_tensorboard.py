"""The TensorBoard option: metrics.jsonl rows become scalars per (stage, model), read back here
from the event files' TFRecord framing; a missing tensorboardX is a one-line error."""

import struct
import sys

import pytest

from jaxmu import stages, tensorboard
from jaxmu.errors import InputError


def _scalars(run_dir):
  from tensorboardX.proto import event_pb2
  found = {}
  for path in sorted(run_dir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    while data:
      (length,) = struct.unpack("<Q", data[:8])
      event = event_pb2.Event.FromString(data[12:12 + length])
      data = data[12 + length + 4:]
      for value in event.summary.value:
        found.setdefault(value.tag, []).append((event.step, round(value.simple_value, 6)))
  return found


def test_metrics_rows_become_scalars_per_stage_and_model(tmp_path, monkeypatch):
  pytest.importorskip("tensorboardX")
  monkeypatch.setenv(tensorboard.ENV, "1")
  wd = stages.Workdir(tmp_path)
  for epoch in (1, 2):
    wd.append_metrics({"stage": "train", "epoch": epoch, "models": ["original/0", "retrain/0"],
                       "loss": [1.0 / epoch, 2.0 / epoch], "lr": 0.1})
  original = _scalars(tmp_path / "tensorboard" / "train" / "original" / "0")
  retrain = _scalars(tmp_path / "tensorboard" / "train" / "retrain" / "0")
  assert original == {"loss": [(1, 1.0), (2, 0.5)], "lr": [(1, 0.1), (2, 0.1)]}
  assert retrain["loss"] == [(1, 2.0), (2, 1.0)]
  assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 4  # unchanged by the option


def test_off_by_default_and_a_missing_package_is_one_line(tmp_path, monkeypatch):
  monkeypatch.delenv(tensorboard.ENV, raising=False)
  stages.Workdir(tmp_path).append_metrics({"stage": "s", "epoch": 1, "loss": 1.0})
  assert not (tmp_path / "tensorboard").exists()
  monkeypatch.setenv(tensorboard.ENV, "1")
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
  with pytest.raises(InputError, match="tensorboardX is not installed; fix: pip install"):
    stages.Workdir(tmp_path / "other")
