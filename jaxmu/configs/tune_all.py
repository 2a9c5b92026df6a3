"""The quickstart benchmark with every method that has a search space tuned on CPU.

    jaxmu deepunlearn --config=tune_all --workdir=runs/tune_all

jaxmu/configs/quickstart.py (digits, small CNN, 4 seeds, the same trained originals and retrained
models) with the quickstart's search budget for *every* method with a reference search space
(deepunlearn-spec 4.2; 19 of the registry: the 18 DeepUnlearn methods and negative_gradient):
20 complete TPE trials each (Optuna's first 10 random, then 10 TPE proposals) on all 4 seeds,
each tuned method also run with its reference defaults (``<method>@defaults``) and its study's
most accurate trial (``<method>@accurate``) so the report compares them, paired by seed. The
methods without a search space (the IAM methods, which IAM ran with fixed hyper-parameters) keep
their defaults. U-LiRA is off (the demo runs it). Measured time: see docs/methods.md ("Tuning
every method on CPU").
"""

from jaxmu import methods as methods_lib
from jaxmu.configs import quickstart


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"tune_all takes no argument; got {arg!r}")
  config = quickstart.get_config()
  config.search.methods = tuple(m for m in config.methods if methods_lib.get(m).space)
  config.ulira.enabled = False
  return config
