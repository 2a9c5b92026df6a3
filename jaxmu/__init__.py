"""jaxmu: machine-unlearning benchmarks (DeepUnlearn, IAM) in JAX, many models as one program.

The three calls for your own model and data (`jaxmu.api`, docs/api.md): ``jaxmu.unlearn``,
``jaxmu.evaluate`` and ``jaxmu.audit`` (with ``jaxmu.audit_frame``); ``jaxmu.fit`` trains the
stacks they start from. They are imported on first use, so ``import jaxmu`` stays light.
"""

__version__ = "0.2.0"

_API = {"unlearn", "evaluate", "fit", "stack", "audit_frame", "linen_model", "nnx_model",
        "DEFAULT_RECIPE"}


def __getattr__(name):
  if name in _API:
    from jaxmu import api
    return getattr(api, name)
  if name == "audit":
    from jaxmu.attacks.audit import audit
    return audit
  raise AttributeError(f"module 'jaxmu' has no attribute {name!r}")
