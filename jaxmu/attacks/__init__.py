"""Attacks never train: per-sample signals of models (arrays) in, scores and ROC metrics out.

Submodules: `signals` (per-sample signals from logits), `iam` (IAM score, BinUI, ScoreUI),
`metrics` (ROC metrics and DeepUnlearn's benchmark metrics). Other attack modules add their own
import line below.
"""

from jaxmu.attacks import signals
from jaxmu.attacks import iam, metrics
from jaxmu.attacks import baselines, lira, mia, rmia  # noqa: F401
from jaxmu.attacks.audit import audit  # noqa: F401,E402  (the entry point; shadows its module's name)
