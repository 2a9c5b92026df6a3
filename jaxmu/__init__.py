"""jaxmu: machine-unlearning benchmarks (DeepUnlearn, IAM) in JAX, many models as one program."""

__version__ = "0.2.0"
