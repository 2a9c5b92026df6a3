"""Unlearning methods: ``METHODS[name].run(ctx, hparams, key) -> UnlearnResult``.

Each method module registers itself on import; see `jaxmu.methods.base` for the shared parts and
`docs/methods.md` for which file holds which method.
"""

from jaxmu.methods.base import (METHODS, Context, Method, UnlearnResult, get)  # noqa: F401
from jaxmu.methods import reference  # noqa: F401  (registration, as every import below)
from jaxmu.methods import finetune  # noqa: F401
from jaxmu.methods import ascent  # noqa: F401
from jaxmu.methods import relabel  # noqa: F401
from jaxmu.methods import distill  # noqa: F401
from jaxmu.methods import second_order  # noqa: F401
from jaxmu.methods import dampening  # noqa: F401
from jaxmu.methods import lcodec  # noqa: F401
from jaxmu.methods import forsaken  # noqa: F401
from jaxmu.methods import kaggle  # noqa: F401

# The registry keeps the order it had when methods were filed by origin: jaxmu/configs/quickstart.py
# runs its methods in this order, which fixes the rows of results.csv, the report's stage hash
# and the order of ties in the ranked table.
_ORDER = ("random_labels", "salun", "gradient_ascent", "neggrad_plus", "negative_gradient",
          "cf_k", "eu_k", "bad_teacher", "scrub", "finetune", "l_codec", "iam_ascent",
          "boundary_expanding", "ssd", "iam_fisher", "forsaken", "fcs", "msg", "cfw", "ct",
          "prmq", "kde", "rni", "original", "retrain", "fisher", "influence")
METHODS.update({name: METHODS.pop(name) for name in _ORDER})
