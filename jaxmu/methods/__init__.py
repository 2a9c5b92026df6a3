"""Unlearning methods: ``METHODS[name].run(ctx, hparams, key) -> UnlearnResult``.

Each method module registers itself on import; see `jaxmu.methods.base` for the shared parts.
"""

from jaxmu.methods.base import (METHODS, Context, Method, UnlearnResult, get)  # noqa: F401
from jaxmu.methods import ascent, blocks, distill, finetune, iam_lcodec, iam_methods, kaggle, kaggle_reset, reference, relabel, second_order  # noqa: F401  (registration)
