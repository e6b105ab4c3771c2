"""Writes the tiny Hugging Face checkpoints the tests load (run once; the outputs are committed):

  .venv/bin/python tests/data/hf/make_fixtures.py   # needs the `hf` extra (torch, transformers)

Each directory holds what transformers' save_pretrained writes for a randomly initialised model
(weights redrawn at a scale that gives peaked logits), a tokenizer.json over the test corpus's
words, and expected.npz: tokens [2, 12], the float32 logits transformers computes for them
[2, 12, V], and its greedy continuation of 8 tokens after the first row's first 4 tokens.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for the corpus's words
from conftest import WORDS  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>"]
VOCAB = 64  # the tokenizer's 3 + 38 words, padded as checkpoints pad theirs

FIXTURES = {
    # grouped-query attention (2 query heads per key/value head), untied lm_head, rope base 5e5
    "llama_gqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False), None),
    # q/k/v biases, one key/value head (MQA), heads wider than hidden / heads, tied embeddings
    "qwen2_bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6, tie_word_embeddings=True), None),
    # weights sharded over several files with an index
    "mistral_sharded": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False), "40KB"),
}


def tokenizer() -> Tokenizer:
  words = sorted(set(WORDS))
  vocab = {token: i for i, token in enumerate(SPECIALS + words)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return tok


def make(name, config_cls, model_cls, values, shard_size, seed):
  torch.manual_seed(seed)
  config = config_cls(vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1,
                      eos_token_id=2, **values)
  model = model_cls(config).eval()
  with torch.no_grad():
    for param_name, param in model.named_parameters():
      if param_name.endswith("norm.weight"):
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
      else:
        param.copy_(0.3 * torch.randn_like(param))
  out = HERE / name
  kwargs = {"max_shard_size": shard_size} if shard_size else {}
  model.save_pretrained(out, **kwargs)
  tokenizer().save(str(out / "tokenizer.json"))
  (out / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
       "eos_token": "</s>"}, indent=1))
  generator = torch.Generator().manual_seed(7)
  tokens = torch.randint(3, 3 + len(set(WORDS)), (2, 12), generator=generator)
  with torch.no_grad():
    logits = model(tokens).logits.float().numpy()
    greedy = model.generate(tokens[:1, :4], max_new_tokens=8, do_sample=False,
                            pad_token_id=0, eos_token_id=None)[0, 4:].numpy()
  np.savez(out / "expected.npz", tokens=tokens.numpy(), logits=logits, greedy=greedy)
  print(name, sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
  print(f"transformers {transformers.__version__}, torch {torch.__version__}")
  for seed, (name, (config_cls, model_cls, values, shard)) in enumerate(FIXTURES.items()):
    make(name, config_cls, model_cls, values, shard, seed)
