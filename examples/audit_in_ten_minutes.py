# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Audit your unlearning method in ten minutes
#
# On sklearn's digits (bundled, offline), on a CPU: train a stack of models, unlearn a forget
# set with two methods, evaluate them against models retrained without it (DeepUnlearn's
# metrics), and audit every sample with IAM and LiRA from shadow models. Then the common case of
# auditing logits saved from a PyTorch model. `jupytext --to ipynb` turns this file into a
# notebook; `make test-e2e` executes it.

# %%
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import sklearn.datasets

import jaxmu
from jaxmu import train

start = time.perf_counter()
x, y = sklearn.datasets.load_digits(return_X_y=True)
x = (x / 16.0).astype(np.float32)
order = np.random.default_rng(0).permutation(len(x))
# Queries (the target's training set), a disjoint pool for the shadow models, and held-out data.
train_idx, shadow_pool, val_idx, test_idx = np.split(order, [700, 1300, 1500])
forget_idx, retain_idx = train_idx[:70], train_idx[70:]
print(len(train_idx), "training samples,", len(forget_idx), "to forget")

# %% [markdown]
# ## A model and a stack of seeds
#
# Any Flax Linen module called as `model(x, train=..., mask=...)` works (`jaxmu.linen_model` and
# `jaxmu.nnx_model` adapt others). `jaxmu.fit` trains one model per seed, all in one program.

# %%
class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    return nn.Dense(10)(nn.relu(nn.Dense(128)(x)))


model, seeds = MLP(), (0, 1, 2)
original = jaxmu.fit(model, (x, y), train_idx, epochs=20, seeds=seeds)
retrained = jaxmu.fit(model, (x, y), retain_idx, epochs=20, seeds=seeds)

# %% [markdown]
# ## Unlearn with two methods, evaluate against the retrained models

# %%
unlearned, seconds = {}, {}
for method in ("finetune", "neggrad_plus"):
  unlearned[method], seconds[method] = jaxmu.unlearn(
      method, model, original, (x, y), forget=forget_idx, retain=retain_idx, seeds=seeds,
      hparams={"num_epochs": 5}, timed=True)

table = jaxmu.evaluate(model, unlearned, (x, y), original=original, retrained=retrained,
                       forget=forget_idx, retain=retain_idx, val=val_idx, test=test_idx)
summary = table.groupby("method", sort=False)[["forget_acc", "test_acc", "test_mia", "retdev"]]
print(summary.agg(["mean", "std"]).round(4).to_string())  # std over the 3 seeds (ddof 1)

# %% [markdown]
# ## Audit every sample with IAM
#
# Shadow OUT models never saw any query; IAM compares each sample's signal under the audited
# model with an interpolation between the original model (fit) and the shadows (generalisation).
# A high score means "looks unlearned". The forget mask lets us measure how well each attack
# separates forgotten from retained samples (BinUI).

# %%
shadows = jaxmu.fit(model, (x, y), shadow_pool, epochs=20, seeds=(10, 11, 12, 13))
data = train.DeviceData(x, y)


def logits(variables):
  return np.asarray(train.predict(model, variables, data, train_idx, jaxmu.DEFAULT_RECIPE))


forget_mask = np.isin(train_idx, forget_idx)
shadow_logits = logits(shadows)
audits = {}
for name, variables in {"retrain": retrained, **unlearned}.items():
  result = jaxmu.audit(logits(original)[0], logits(variables)[0], shadow_logits, y[train_idx],
                       forget_mask=forget_mask, attacks=["iam_on", "lira_on"])
  audits[name] = jaxmu.audit_frame(result)["auc"]
aucs = pd.DataFrame(audits).T  # rows: audited models; columns: attacks
print("BinUI AUC (forgotten vs retained), seed 0; retrain is what complete unlearning gives:")
print(aucs.round(3).to_string())

# %% [markdown]
# ## Plot

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
stats = table.groupby("method", sort=False)["retdev"].agg(["mean", "std"]).drop("retrain")
axes[0].bar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), capsize=4, color="tab:blue")
axes[0].set_ylabel("RetDev (mean ± std over seeds)")
axes[0].set_title("Closeness to the retrained models")
width = 0.8 / len(aucs.columns)
for i, attack in enumerate(aucs.columns):
  offset = (i - (len(aucs.columns) - 1) / 2) * width
  axes[1].bar(np.arange(len(aucs)) + offset, aucs[attack], width, label=attack)
axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
axes[1].set_xticks(np.arange(len(aucs)), list(aucs.index))
axes[1].set_ylabel("BinUI AUC (seed 0)")
axes[1].set_title("Audit: forgotten vs retained")
axes[1].legend(fontsize=8)
fig.tight_layout()
fig.savefig(Path(tempfile.gettempdir()) / "audit_in_ten_minutes.png", dpi=100)
plt.show()

# %% [markdown]
# ## Auditing logits saved from a PyTorch model
#
# The common case: your models live in PyTorch. Save their logits on the queries (the original
# model's training set) once, with the keys `jaxmu audit` reads, and audit them without any
# JAX model:
#
# ```python
# with torch.no_grad():
#   out = lambda net: torch.cat([net(xb) for xb, _ in query_loader]).numpy()
#   np.savez("logits.npz", original=out(original_net), target=out(unlearned_net),
#            shadows=np.stack([out(s) for s in shadow_nets]), labels=query_labels,
#            forget=forget_mask)
# ```
#
# Then `jaxmu audit --logits=logits.npz --out=runs/audit` writes `scores.csv` and `metrics.csv`.
# Here the arrays come from the models above, written and read back the same way.

# %%
from jaxmu.attacks.audit import audit_file, load_file  # noqa: E402

folder = Path(tempfile.mkdtemp())
np.savez(folder / "logits.npz", original=logits(original)[0],
         target=logits(unlearned["finetune"])[0], shadows=shadow_logits, labels=y[train_idx],
         forget=forget_mask)
saved = audit_file(load_file(folder / "logits.npz"), attacks=["iam_on", "lira_on"])
print(jaxmu.audit_frame(saved)[["name", "auc", "tpr@0.01"]])
print(f"{time.perf_counter() - start:.0f} s in all")
