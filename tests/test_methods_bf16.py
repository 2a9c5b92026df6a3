"""``Recipe.dtype="bfloat16"`` reaches every unlearning method: every convolution of the programs a
method lowers (forward and backward passes) runs on bf16 operands.

The lowered StableHLO (``jax_dump_ir_to``) is inspected, not the compiled CPU program, which
upcasts bf16 arithmetic to f32.
"""

import dataclasses
import re

import jax
import pytest
from conftest import CHEAP_HPARAMS, make_context, method_sweep

from jaxmu import methods as methods_lib

# Operand types of a convolution: "stablehlo.convolution(...) ... : (tensor<..xT>, tensor<..xT>)".
_CONV = re.compile(r"stablehlo\.convolution\b.*:\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)")


@pytest.fixture(scope="module")
def bf16_ctx():
  ctx = make_context()
  return dataclasses.replace(ctx, recipe=dataclasses.replace(ctx.recipe, dtype="bfloat16"))


def _convolutions(directory):
  """(lhs type, rhs type) of every convolution in the dumped modules."""
  return [match.groups() for path in directory.glob("*.mlir")
          for match in map(_CONV.search, path.read_text().splitlines()) if match]


def test_every_method_is_covered():
  assert set(CHEAP_HPARAMS) == set(methods_lib.METHODS) - {"original"}


@pytest.mark.parametrize("name", method_sweep(CHEAP_HPARAMS))
def test_method_computes_in_bf16(bf16_ctx, name, tmp_path):
  method = methods_lib.get(name)
  jax.clear_caches()  # cached programs would not be lowered (and dumped) again
  jax.config.update("jax_dump_ir_to", str(tmp_path))
  try:
    method.run(bf16_ctx, CHEAP_HPARAMS[name], jax.random.key(0))
  finally:
    jax.config.update("jax_dump_ir_to", "")
  convs = _convolutions(tmp_path)
  assert convs, f"{name}: no convolution lowered"
  f32 = [op for op in convs if "xf32>" in op[0] or "xf32>" in op[1]]
  assert not f32, f"{name}: {len(f32)} of {len(convs)} convolutions in float32, e.g. {f32[0]}"
