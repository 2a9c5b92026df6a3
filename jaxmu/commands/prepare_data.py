r"""Downloads and prepares a tensorflow-datasets dataset for `jaxmu.data.load`.

  jaxmu prepare-data --dataset=cifar10 [--data_dir=~/tensorflow_datasets]

Run once per dataset on a machine with internet. Preparing needs TensorFlow: install the extra
first, `pip install 'jaxmu[tfds]'` (tensorflow-cpu, pillow). Reading the prepared data afterwards
needs neither TensorFlow nor internet. Datasets: mnist, fashion_mnist, cifar10, cifar100.
UTKFace, CINIC-10 and Purchase-100 are plain files: see README ("Datasets").

Before downloading it connects to the dataset's download host (`NETWORK_TIMEOUT_S` seconds at
most): offline, it says so within seconds instead of retrying for minutes. A dataset already
prepared in the data_dir needs no network.
"""

import socket
from pathlib import Path

from absl import flags

from jaxmu.errors import InputError, Problem

_DATASET = flags.DEFINE_enum("dataset", None, ["mnist", "fashion_mnist", "cifar10", "cifar100"],
                             "tfds dataset to prepare.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir (default ~/tensorflow_datasets).")
flags.mark_flag_as_required("dataset")

# Where tfds downloads each dataset from (its checksums files' URLs).
DOWNLOAD_HOSTS = {"mnist": "storage.googleapis.com",
                  "fashion_mnist": "fashion-mnist.s3-website.eu-central-1.amazonaws.com",
                  "cifar10": "www.cs.toronto.edu", "cifar100": "www.cs.toronto.edu"}
NETWORK_TIMEOUT_S = 3.0


def offline_problem(dataset: str, data_dir: str | None, reason: str) -> Problem:
  where = data_dir or "~/tensorflow_datasets"
  return Problem(
      "network", f"cannot reach {DOWNLOAD_HOSTS[dataset]} to download {dataset} ({reason})",
      f"run `jaxmu prepare-data --dataset={dataset}` on a machine with internet and copy its "
      f"{where}/{dataset} folder to this machine's data_dir (--data_dir, "
      "--config.dataset.data_dir), or set HTTPS_PROXY if you reach the internet through a proxy")


def check_network(dataset: str, data_dir: str | None = None,
                  timeout: float = NETWORK_TIMEOUT_S) -> None:
  """Connects to the dataset's download host (port 443) within ``timeout`` seconds; an
  `InputError` saying what to do when it cannot."""
  host = DOWNLOAD_HOSTS[dataset]
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
  except OSError as e:
    reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e) or
                                                                type(e).__name__)
    raise InputError([offline_problem(dataset, data_dir, reason)]) from e


def prepared(dataset: str, data_dir: str | None) -> bool:
  """Whether ``data_dir`` already holds a prepared version of ``dataset``."""
  root = Path(data_dir or "~/tensorflow_datasets").expanduser() / dataset
  return any(root.glob("*/dataset_info.json"))


def main(argv):
  from absl import app
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  dataset, data_dir = _DATASET.value, _DATA_DIR.value
  if data_dir and Path(data_dir).expanduser().exists() and not Path(data_dir).expanduser().is_dir():
    raise InputError([Problem("--data_dir", f"{data_dir} is a file, not a directory",
                              "give a directory (created when missing)")])
  if prepared(dataset, data_dir):
    print(f"{dataset} is already prepared in {data_dir or '~/tensorflow_datasets'}")
    return
  check_network(dataset, data_dir)
  try:
    import tensorflow_datasets as tfds
    import tensorflow  # noqa: F401  (preparing needs it; reading does not)
  except ImportError as e:
    raise InputError([Problem("prepare-data", f"needs TensorFlow and tensorflow-datasets ({e})",
                              "pip install 'jaxmu[tfds]'")]) from e
  builder = tfds.builder(dataset, data_dir=data_dir)
  try:
    builder.download_and_prepare(file_format="array_record")
  except Exception as e:  # noqa: BLE001: a connection lost during the download
    if "connection" in f"{type(e).__name__} {e}".lower():
      raise InputError([offline_problem(dataset, data_dir, type(e).__name__)]) from e
    raise
  print(f"prepared {dataset} in {builder.data_dir}")
