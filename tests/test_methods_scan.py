"""Every method gives the same numbers with its epochs scanned (one compiled program per epoch)
as with one dispatch per step, on a stack of MLPs (where `auto` scans on CPU)."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import CHEAP_HPARAMS, make_context, method_sweep

from jaxmu import methods as methods_lib
from jaxmu import parallel


@pytest.fixture(scope="module")
def mlp_ctx():
  return make_context("purchase_mlp")


# In `make test`: one method per kind of step (training, distillation, two optimisers in turn,
# accumulation only); every method in `make test-e2e`.
@pytest.mark.parametrize("name", method_sweep(CHEAP_HPARAMS,
                                              ("retrain", "finetune", "scrub", "fcs", "ssd")))
def test_scanned_epochs_equal_dispatched_steps(mlp_ctx, name):
  runs = {}
  for scan in (False, True):
    ctx = dataclasses.replace(mlp_ctx, strategy=parallel.Strategy("loop", scan=scan))
    runs[scan] = methods_lib.get(name).run(ctx, CHEAP_HPARAMS[name], jax.random.key(0)).states
  for a, b in zip(jax.tree.leaves(runs[True]), jax.tree.leaves(runs[False]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
