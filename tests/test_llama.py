"""jaxmu.models.llama against the committed tiny transformers checkpoint (tests/fixtures/tiny_llama)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")

from jaxmu import models
from jaxmu.models import llama

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_llama")


@pytest.fixture(scope="module")
def checkpoint():
  return llama.load_hf_checkpoint(FIXTURE)


@pytest.fixture(scope="module")
def expected():
  return dict(np.load(os.path.join(FIXTURE, "expected_logits.npz")))


def _logits(config, params, ids, mask, dtype=jnp.float32):
  return np.asarray(llama.build(config, dtype).apply({"params": params}, jnp.asarray(ids), mask=jnp.asarray(mask, bool)))


def test_matches_committed_pytorch_logits(checkpoint, expected):
  config, params = checkpoint
  out = _logits(config, params, expected["input_ids"], expected["attention_mask"])
  assert out.dtype == np.float32 and out.shape == expected["logits"].shape
  assert np.abs(out - expected["logits"]).max() <= 1e-4
  # the comparison has teeth: a different rope base moves the logits far beyond the tolerance
  import dataclasses
  wrong = _logits(dataclasses.replace(config, rope_theta=100.0), params, expected["input_ids"], expected["attention_mask"])
  assert np.abs(wrong - expected["logits"]).max() > 1e-2


def test_bf16_compute_close(checkpoint, expected):
  config, params = checkpoint
  out = _logits(config, params, expected["input_ids"], expected["attention_mask"], jnp.bfloat16)
  assert out.dtype == np.float32
  assert np.abs(out - expected["logits"]).max() < 0.1 * np.abs(expected["logits"]).max()


def test_live_transformers_comparison(checkpoint, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config, params = checkpoint
  model = transformers.LlamaForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
  rng = np.random.default_rng(1)
  ids = rng.integers(0, config.vocab_size, size=(2, 16))
  mask = np.ones_like(ids)
  mask[1, 10:] = 0
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
  assert np.abs(_logits(config, params, ids, mask) - ref).max() <= 1e-4
  # a tied-embedding GQA model written by transformers loads and matches too
  tied = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                                  initializer_range=0.3, rope_theta=500.0)
  torch.manual_seed(1)
  ref_model = transformers.LlamaForCausalLM(tied).eval()
  ref_model.save_pretrained(tmp_path, safe_serialization=True)
  config2, params2 = llama.load_hf_checkpoint(str(tmp_path))
  assert config2.tie_word_embeddings and "head" not in params2 and config2.rope_theta == 500.0
  ids2 = ids % 48
  with torch.no_grad():
    ref2 = ref_model(input_ids=torch.from_numpy(ids2), attention_mask=torch.from_numpy(mask)).logits.numpy()
  assert np.abs(_logits(config2, params2, ids2, mask) - ref2).max() <= 1e-4


def _copy_with_config(tmp_path, edit):
  for name in os.listdir(FIXTURE):
    shutil.copy(os.path.join(FIXTURE, name), tmp_path / name)
  with open(tmp_path / "config.json") as f:
    hf = json.load(f)
  edit(hf)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(hf, f)
  return str(tmp_path)


def test_legacy_rope_theta_config_loads_identically(checkpoint, tmp_path):
  config, params = checkpoint
  def legacy(hf):
    hf["rope_theta"] = hf.pop("rope_parameters")["rope_theta"]
    hf["rope_scaling"] = None
  config2, params2 = llama.load_hf_checkpoint(_copy_with_config(tmp_path, legacy))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_rope_scaling_types(tmp_path):
  base = dict(vocab_size=8, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
  linear = llama.config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 100.0})
  np.testing.assert_allclose(llama.rope_inv_freq(linear),
                             llama.rope_inv_freq(llama.config_from_hf({**base, "rope_theta": 100.0})) / 2)
  l3 = llama.config_from_hf({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 8192}})
  assert l3.rope_type == "llama3" and l3.rope_theta == 500000.0
  with pytest.raises(ValueError, match="rope type 'yarn' is not implemented"):
    llama.config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_gqa_shapes_and_param_groups():
  config = llama.LlamaConfig(vocab_size=40, hidden_size=24, intermediate_size=16, num_hidden_layers=2,
                             num_attention_heads=6, num_key_value_heads=2)
  params = llama.init_params(config, jax.random.key(0))
  attn = params["layer0_0"]["self_attn"]
  assert attn["q_proj"]["kernel"].shape == attn["o_proj"]["kernel"].shape == (24, 24)
  assert attn["k_proj"]["kernel"].shape == attn["v_proj"]["kernel"].shape == (24, 8)
  logits = llama.build(config).apply({"params": params}, jnp.zeros((2, 5), jnp.int32), train=False,
                                     mask=jnp.ones((2, 5), bool))
  assert logits.shape == (2, 5, 40)
  groups = models.param_groups(params)
  assert [name for name, _ in groups] == ["stem", "layer0.0", "layer1.0", "head"]
  assert {p[0] for p in models.last_blocks(params, 1)} == {"layer1_0", "head"}
  with pytest.raises(ValueError, match="not a multiple"):
    llama.LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=3)


def test_causal_and_padding_mask(checkpoint, expected):
  config, params = checkpoint
  ids, mask = expected["input_ids"][:1], expected["attention_mask"][:1]
  base = _logits(config, params, ids, mask)
  later = ids.copy()
  later[0, 8:] = (later[0, 8:] + 5) % config.vocab_size
  np.testing.assert_allclose(_logits(config, params, later, mask)[0, :8], base[0, :8], atol=1e-6)
  padded = mask.copy()
  padded[0, 8:] = 0  # padding keys are invisible to later queries
  other = ids.copy()
  other[0, 10] = (other[0, 10] + 5) % config.vocab_size
  assert np.abs(_logits(config, params, other, mask)[0, 11] - base[0, 11]).max() > 1e-3
  np.testing.assert_allclose(_logits(config, params, other, padded)[0, 11],
                             _logits(config, params, ids, padded)[0, 11], atol=1e-6)


@pytest.mark.parametrize("case", ["no_dir", "no_config", "bad_json", "no_weights", "bad_weights", "missing_tensor"])
def test_bad_checkpoint_one_line_error(tmp_path, case):
  directory = _copy_with_config(tmp_path, lambda hf: None)
  if case == "no_dir":
    directory, culprit = str(tmp_path / "nowhere"), "config.json"
  elif case == "no_config":
    os.remove(tmp_path / "config.json"); culprit = "config.json"
  elif case == "bad_json":
    (tmp_path / "config.json").write_text("{not json"); culprit = "config.json"
  elif case == "no_weights":
    os.remove(tmp_path / "model.safetensors"); culprit = "model.safetensors"
  elif case == "bad_weights":
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"); culprit = "model.safetensors"
  else:
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors")); culprit = "model.safetensors"
  with pytest.raises(ValueError) as info:
    llama.load_hf_checkpoint(directory)
  message = str(info.value)
  assert "\n" not in message and culprit in message, message
  if case == "missing_tensor":
    assert "model.layers.1.mlp.up_proj.weight" in message


def test_sharded_checkpoint(checkpoint, tmp_path):
  from safetensors.numpy import load_file, save_file
  config, params = checkpoint
  tensors = load_file(os.path.join(FIXTURE, "model.safetensors"))
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
  shutil.copy(os.path.join(FIXTURE, "config.json"), tmp_path / "config.json")
  weight_map = {k: file for file, keys in shards.items() for k in keys}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  _, params2 = llama.load_hf_checkpoint(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params2, params)
