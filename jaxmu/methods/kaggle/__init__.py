"""The NeurIPS'23 Kaggle-derived DeepUnlearn methods (deepunlearn-spec 4.14-4.20), by what they do:
`fcs` (FCS), `perturb` (CFW, CT), `reinit` (MSG, PRMQ, KDE, RNI); `common` holds what they share.

Every method unlearns the whole stack at once: per-model decisions are made inside the stack with
`base.stack_map` or inside the per-model steps, never by looping over models.
"""

from jaxmu.methods.kaggle import common, fcs, perturb, reinit  # noqa: F401  (registration)
