"""FT: fine-tuning on the retain set (deepunlearn-spec 4.3; IAM's `finetune`, iam-spec 8).

Each epoch is one shuffled pass over the retain set with cross-entropy, BatchNorm in train mode,
SGD with coupled weight decay and a per-epoch cosine schedule (T_max = epochs). DeepUnlearn feeds
plain (not augmented) inputs; IAM's variant (`IAM_HPARAMS`) augments and uses lr 0.01, batch 128.
"""

from __future__ import annotations

from jaxmu.methods import base

IAM_HPARAMS = {"num_epochs": 5, "batch_size": 128, "learning_rate": 0.01, "momentum": 0.9,
               "weight_decay": 5e-4, "augment": True}


def _finetune(ctx: base.Context, hp, key) -> dict:
  spec = base.FinetuneSpec(batch_size=hp.batch_size, augment=hp.augment)
  return base.finetune(ctx, ctx.originals, hp, key, spec, hp.num_epochs,
                       lr_factor=base.cosine(hp.num_epochs))


FINETUNE = base.register(base.Method(
    name="finetune", paper_name="FT", reference="deepunlearn-spec 4.3; iam-spec 8 (IAM_HPARAMS)",
    defaults={"num_epochs": 5, "batch_size": 256, "learning_rate": 0.1, "momentum": 0.9,
              "weight_decay": 5e-4, "augment": False},
    space=base.COMMON5, uses=("retain",), unlearn=_finetune))
