"""The live comparison with transformers (`make test-hf`; needs the `hf` extra: torch and
transformers). A trained family's exits, exported, load with transformers'
AutoModelForCausalLM and give famjax's logits (float32, within 1e-4 relative) and greedy text;
the committed fixtures still match what this transformers computes."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from famjax.decode.decoder import Decoder
from famjax.hf import checkpoint_export, checkpoint_import
from famjax.train import hf_export, loop

from conftest import tiny_model
from test_hf import FIXTURES, NAMES, build

torch = pytest.importorskip("torch", reason="make test-hf installs the hf extra")
transformers = pytest.importorskip("transformers", reason="make test-hf installs the hf extra")
transformers.utils.logging.disable_progress_bar()


def hf_logits(directory: Path, tokens_BT: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  with torch.no_grad():
    return model.eval()(torch.as_tensor(tokens_BT)).logits.float().numpy()


def hf_greedy(directory: Path, prompt: list[int], n: int) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  with torch.no_grad():
    out = model.eval().generate(torch.as_tensor([prompt]), max_new_tokens=n, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
  return out[0, len(prompt):].numpy()


@pytest.mark.parametrize("name", NAMES)
def test_the_fixtures_match_this_transformers(name):
  expected = np.load(FIXTURES / name / "expected.npz")
  logits = hf_logits(FIXTURES / name, expected["tokens"])
  np.testing.assert_allclose(logits, expected["logits"], rtol=1e-5, atol=1e-5)


def relative_error(a, b) -> float:
  return float(np.abs(a - b).max() / np.abs(b).max())


def test_every_exported_exit_of_a_trained_family_runs_in_transformers(tmp_path, tiny_experiment):
  """A family with GQA, q/k/v biases and block heads, trained a few steps (so no weight is at
  its initial value), exported whole: every exit's logits and greedy text in transformers."""
  model_cfg = tiny_model(n_heads=4, n_kv_heads=2, attention_bias=True, exit_head="block",
                         unembed="per_exit", vocab_size=264)
  loop.train(tiny_experiment(model=model_cfg, steps=20), tmp_path / "run")
  records = hf_export.export_run(tmp_path / "run", "all", tmp_path / "out", progress=False)
  index = json.loads((tmp_path / "out" / "index.json").read_text())
  assert [e["exit"] for e in index["exits"]] == [1, 2, 3]
  _, family = loop.load_model(tmp_path / "run")
  tokens_BT = np.random.default_rng(0).integers(0, 259, (2, 12))
  logits_GBTV = np.asarray(family(tokens_BT))
  decoder = Decoder(family, max_len=24)
  for record in records:
    directory = tmp_path / "out" / record["directory"]
    assert record["architecture"] == "Qwen2ForCausalLM"
    error = relative_error(hf_logits(directory, tokens_BT), logits_GBTV[record["exit"] - 1])
    print(f"exit {record['exit']}: {record['num_hidden_layers']} layers, max relative logit "
          f"error {error:.2e}")
    assert error <= 1e-4
    _, ours = decoder.generate([list(tokens_BT[0, :5])], record["exit"], 8)
    np.testing.assert_array_equal(hf_greedy(directory, list(tokens_BT[0, :5]), 8),
                                  np.asarray(ours)[0])


@pytest.mark.parametrize("name", ("llama_gqa", "mistral_sharded"))
def test_a_family_on_an_imported_checkpoint_exports_back_to_transformers(name, tmp_path):
  dense_cfg, dense = checkpoint_import.load(FIXTURES / name)
  cfg = checkpoint_import.family_config(FIXTURES / name, exit_layers=(2, dense_cfg.n_layers),
                         unembed="per_exit", exit_head="block")
  fresh = nnx.to_pure_dict(nnx.state(build(cfg)))
  params = checkpoint_import.family_params(cfg, fresh, dense_cfg, dense, "fresh")
  family = build(cfg, params)
  tokens_BT = np.load(FIXTURES / name / "expected.npz")["tokens"]
  logits_GBTV = np.asarray(family(tokens_BT))
  for exit_ in (1, 2):
    checkpoint_export.export_exit(cfg, params, exit_, tmp_path / f"exit{exit_}")
    error = relative_error(hf_logits(tmp_path / f"exit{exit_}", tokens_BT),
                           logits_GBTV[exit_ - 1])
    assert error <= 1e-4, (exit_, error)
