r"""Downloads and prepares a tensorflow-datasets dataset for `jaxmu.data.load`.

  jaxmu prepare-data --dataset=cifar10 [--data_dir=~/tensorflow_datasets]

Run once per dataset on a machine with internet. Preparing needs TensorFlow: install the extra
first, `pip install 'jaxmu[tfds]'` (tensorflow-cpu, pillow). Reading the prepared data afterwards
needs neither TensorFlow nor internet. Datasets: mnist, fashion_mnist, cifar10, cifar100.
UTKFace, CINIC-10 and Purchase-100 are plain files: see README ("Datasets").
"""

from absl import app
from absl import flags

_DATASET = flags.DEFINE_enum("dataset", None, ["mnist", "fashion_mnist", "cifar10", "cifar100"],
                             "tfds dataset to prepare.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir (default ~/tensorflow_datasets).")
flags.mark_flag_as_required("dataset")


def main(argv):
  del argv
  import tensorflow_datasets as tfds
  builder = tfds.builder(_DATASET.value, data_dir=_DATA_DIR.value)
  builder.download_and_prepare(file_format="array_record")
  print(f"prepared {_DATASET.value} in {builder.data_dir}")

