"""Throughput of stacks of models per strategy and compute dtype (see docs/benchmarks.md).

    jaxmu benchmark --config=bench --out=runs/bench.json
    jaxmu benchmark --config=bench:gpu --out=runs/bench_gpu.json \
        --out_md=runs/bench_gpu.md

The default (CPU) measures stacks of 1, 4 and 16 small CNNs on 32x32x3 synthetic images under
vmap and loop, float32 and bfloat16: a few minutes on a 2-core CPU. `:gpu` measures ResNet-18
(imagenet and cifar stems), airbench94, TinyViT-11M and the small CNN at 32x32, batch 256 per
model, stacks of 1-64, vmap and loop, bf16 and fp32, most important rows first, and stops
starting rows after `time_budget_s` (launch/gpu_bench.sh runs it in one call on a lent GPU).

    jaxmu benchmark --config=bench:attacks --out=runs/bench_attacks.json

`:attacks` times attack scoring on random signals after compilation: IAM (gumbel, kde) at
N = 30,000, K = 16, A = 100, Carlini online LiRA with 64 shadows, and one `audit` call with every
attack on CIFAR-100-shaped logits (N = 30,000, K = 1, a population of 5,000): the unit of the IAM
pipeline's BinUI and ScoreUI loops (about a minute on 2 CPU cores).

    jaxmu benchmark --config=bench:dispatch --compilation_cache='' \
        --out=runs/bench_dispatch.json --out_md=runs/bench_dispatch.md

`:dispatch` measures model-steps/s of `train.fit` for the small CNN (8x8x1, batch 64: digits)
and the Purchase MLP (600 features, batch 128, 100 classes) at N = 1 and 16, vmap and loop, each
epoch dispatched per step vs one compiled program (`Strategy.scan`), the two modes alternating
(about 5 minutes on the 2-core CPU). `:gpu_dispatch`: the same for the CIFAR-stem ResNet-18 and
the small CNN at 32x32, batch 256, bf16 (launch/gpu_bench.sh).

    jaxmu benchmark --config=bench:search --out=runs/bench_search.json

`:search` times the hyper-parameter search (trials x seeds per second) with the 3 tuning seeds
as one stack vs one seed at a time, the same 4 trials each, for finetune and msg on digits.
"""

import ml_collections


def get_config(arg: str | None = None):
  c = ml_collections.ConfigDict()
  c.section = "training"  # or "attacks", "search", "dispatch"
  # Model specs: a registry name, optionally with factory arguments ("resnet18:stem=cifar").
  c.models = ("small_cnn",)
  c.num_models = (1, 4, 16)
  c.strategies = ("vmap", "loop")  # add "sharded" on a machine with several devices
  c.dtypes = ("float32", "bfloat16")
  c.input_shape = (32, 32, 3)
  c.batch_size = 64
  c.batches_per_epoch = 8  # synthetic dataset size = batch_size * batches_per_epoch
  c.epoch_images = 50_000  # model-epochs/s = images/s / epoch_images (CIFAR-10's train set)
  c.augment = "crop_flip"
  c.steps = 10
  c.warmup_steps = 2
  c.repeats = 3
  c.num_classes = 10
  c.time_budget_s = 0  # stop starting new rows after this many seconds; 0 = no limit
  if arg == "gpu":
    c.models = ("resnet18", "resnet18:stem=cifar", "airbench94", "tinyvit_11m:img_size=32",
                "small_cnn")
    c.dtypes = ("bfloat16", "float32")
    c.num_models = (1, 16, 4, 64)
    c.batch_size = 256
    c.steps = 20
    c.warmup_steps = 3
    c.time_budget_s = 420
  elif arg == "attacks":
    c.section = "attacks"
    c.attacks = ml_collections.ConfigDict(dict(
        num_samples=30_000, iam_shadows=16, num_interp=100, iam_dists=("gumbel", "kde"),
        lira_shadows=64, repeats=5, audit_classes=100, audit_population=5000))
  elif arg == "dispatch":
    c.section = "dispatch"
    c.dispatch = ml_collections.ConfigDict(dict(
        models=("small_cnn", "purchase_mlp"), input_shapes=((8, 8, 1), (600,)),
        batch_sizes=(64, 128), num_models=(1, 16), strategies=("vmap", "loop"),
        batches_per_epoch=8, epochs=2, repeats=3, dtype="float32"))
    c.num_classes = 100
  elif arg == "gpu_dispatch":  # launch/gpu_bench.sh's second part: the same at GPU scale
    c.section = "dispatch"
    c.dispatch = ml_collections.ConfigDict(dict(
        models=("resnet18:stem=cifar", "small_cnn"), input_shapes=((32, 32, 3), (32, 32, 3)),
        batch_sizes=(256, 256), num_models=(1, 16), strategies=("vmap", "loop"),
        batches_per_epoch=8, epochs=2, repeats=2, dtype="bfloat16"))
  elif arg == "search":
    c.section = "search"
    c.search = ml_collections.ConfigDict(dict(
        methods=("finetune", "msg"), seeds=3, trials=4, train_epochs=10))
  elif arg:
    raise ValueError(f"unknown bench config argument {arg!r}; use nothing, 'gpu', 'attacks', "
                     "'search', 'dispatch' or 'gpu_dispatch'")
  return c
