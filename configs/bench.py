"""Throughput of stacks of models under each execution strategy (see docs/benchmarks.md).

    python launch/benchmark.py --config=configs/bench.py --out=runs/bench.json
    python launch/benchmark.py --config=configs/bench.py:gpu --out=runs/bench_gpu.json

The default (CPU) measures stacks of 1, 4 and 16 small CNNs on 8x8 inputs under vmap and loop:
about a minute on a 2-core CPU. `:gpu` measures ResNet-18 stacks of 1-64 on 32x32 inputs.

    python launch/benchmark.py --config=configs/bench.py:attacks --out=runs/bench_attacks.json

`:attacks` times attack scoring on random signals after compilation: IAM (gumbel, kde) at
N = 30,000, K = 16, A = 100, and Carlini online LiRA with 64 shadows (about 30 s on 2 CPU cores).
"""

import ml_collections


def get_config(arg: str | None = None):
  c = ml_collections.ConfigDict()
  c.section = "training"  # or "attacks"
  c.models = ("small_cnn",)
  c.num_models = (1, 4, 16)
  c.strategies = ("vmap", "loop")
  c.input_shape = (8, 8, 1)
  c.batch_size = 64
  c.steps = 20
  c.warmup_steps = 2
  c.num_classes = 10
  c.dtype = "float32"
  if arg == "gpu":
    c.models = ("resnet18", "small_cnn")
    c.num_models = (1, 4, 16, 64)
    c.input_shape = (32, 32, 3)
    c.batch_size = 256
    c.steps = 50
  elif arg == "attacks":
    c.section = "attacks"
    c.attacks = ml_collections.ConfigDict(dict(
        num_samples=30_000, iam_shadows=16, num_interp=100, iam_dists=("gumbel", "kde"),
        lira_shadows=64, repeats=5))
  elif arg:
    raise ValueError(f"unknown bench config argument {arg!r}; use nothing, 'gpu' or 'attacks'")
  return c
