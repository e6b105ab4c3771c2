"""The data pipeline at scale: tokenization throughput and memory, and the loader against a step.

Writes a synthetic corpus (the standard library's source, shuffled and repeated) as parquet
shards of two sizes, then measures, each in a fresh process and from a cold store: tokenization
with the byte tokenizer (both sizes) and with a 32k BPE tokenizer.json (the small one) in MB of
text per second with 1 and 2 workers (worker start-up included), the peak RSS of the
tokenizer's process tree (the main process and its workers, summed) with the BPE and 2 workers
at both sizes, and the loader's batches/s for the `small` train preset against that preset's
step time.
Ends with one JSON line. Usage: python benchmarks/data_pipeline.py [--small_gb 0.2]
[--large_gb 1.0] [--workdir /tmp/famjax-data-bench]
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENIZE = """
import json, sys, time
from famjax import data
from famjax.data.config import DataConfig
cfg = DataConfig(corpus=sys.argv[1], tokenizer=sys.argv[2], num_workers=int(sys.argv[3]),
                 cache_dir=sys.argv[4])
began = time.perf_counter()
tokens = data.load_tokens(cfg, progress=False)
print(json.dumps({"seconds": time.perf_counter() - began,
                  "tokens": len(tokens.train) + len(tokens.val)}))
"""


def write_corpus(out: Path, gigabytes: float, shard_mb: int = 25, seed: int = 0) -> int:
  """Parquet shards of stdlib files (a document each), shuffled and repeated: bytes of text."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  from famjax.data import sources
  docs = [p.read_text("utf-8", errors="replace") for p in sources.stdlib_files()]
  rng, target, written, shard = random.Random(seed), int(gigabytes * 1e9), 0, 0
  out.mkdir(parents=True, exist_ok=True)
  while written < target:
    rng.shuffle(docs)
    rows, size = [], 0
    for doc in docs:
      rows.append(doc)
      size += len(doc.encode())
      if size >= shard_mb << 20 or written + size >= target:
        pq.write_table(pa.table({"text": rows}), out / f"part-{shard:05d}.parquet",
                       row_group_size=256)
        written, shard, rows, size = written + size, shard + 1, [], 0
        if written >= target:
          break
  return written


def tree_rss(pid: int) -> int:
  """Resident bytes of a process and all its descendants."""
  total, stack = 0, [pid]
  while stack:
    p = stack.pop()
    try:
      with open(f"/proc/{p}/status") as f:
        total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
      for task in os.listdir(f"/proc/{p}/task"):
        with open(f"/proc/{p}/task/{task}/children") as f:
          stack += [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError, StopIteration):
      continue
  return total


def tokenize(corpus: str, tokenizer: str, workers: int, cache: Path) -> dict:
  """One tokenization in a fresh process (and a fresh cache): seconds, tokens, peak tree RSS."""
  shutil.rmtree(cache, ignore_errors=True)
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.Popen([sys.executable, "-c", TOKENIZE, corpus, tokenizer, str(workers),
                           str(cache)], env=env, stdout=subprocess.PIPE, text=True)
  peak = 0
  while proc.poll() is None:
    peak = max(peak, tree_rss(proc.pid))
    time.sleep(0.05)
  out = proc.stdout.read()
  if proc.returncode:
    raise SystemExit(f"tokenization failed ({tokenizer}, {workers} workers)")
  return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_gb": peak / 1e9}


def bpe_tokenizer(out: Path, sample_mb: int = 24) -> Path:
  """A 32k byte-level BPE tokenizer.json, trained on a sample of the standard library."""
  from famjax.data import sources, tokenizers
  path = out / "bpe32k" / "tokenizer.json"
  if not path.exists():
    texts, size = [], 0
    for p in sources.stdlib_files():
      texts.append(p.read_text("utf-8", errors="replace"))
      size += len(texts[-1])
      if size >= sample_mb << 20:
        break
    tok = tokenizers.HFTokenizer.train_bpe(texts, 32768)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tok.serialized())
  return path


def loader_over_step(corpus: str, tokenizer: Path, cache: Path) -> dict:
  """Batches/s of the loader (the small preset's batch shape, over the store just built) and of
  the small preset's training step, in this process."""
  import jax
  import numpy as np

  from famjax import data
  from famjax.data.config import DataConfig
  from famjax.model import sharding
  from famjax.presets import train as presets
  from famjax.train.config import experiment_from_dict
  from famjax.train.loop import Trainer
  cfg = experiment_from_dict(presets.get_config("small").to_dict())
  tc = cfg.train
  tokens = data.load_tokens(DataConfig(corpus=corpus, tokenizer=str(tokenizer),
                                              cache_dir=str(cache)), progress=False)
  batches = data.train_batches(tokens.train, tc.seq_len, tc.batch_size, seed=0)
  next(batches)
  began, n = time.perf_counter(), 200
  for _ in range(n):
    batch = next(batches)
  loader = n / (time.perf_counter() - began)
  trainer = Trainer.create(cfg, sharding.make_mesh())
  batch = np.minimum(batch, cfg.model.vocab_size - 1)  # the byte preset's model, BPE ids
  jax.block_until_ready(trainer.step(batch))  # compile
  began, steps = time.perf_counter(), 2
  for _ in range(steps):
    metrics = trainer.step(batch)
  jax.block_until_ready(metrics)
  step = steps / (time.perf_counter() - began)
  return {"loader_batches_per_s": loader, "step_batches_per_s": step}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small_gb", type=float, default=0.2)
  parser.add_argument("--large_gb", type=float, default=1.0)
  parser.add_argument("--workdir", default="/tmp/famjax-data-bench")
  args = parser.parse_args()
  work = Path(args.workdir)
  sizes = {"small": args.small_gb, "large": args.large_gb}
  text_bytes = {}
  for name, gb in sizes.items():
    if not (work / name / "done").exists():
      shutil.rmtree(work / name, ignore_errors=True)
      text_bytes[name] = write_corpus(work / name / "corpus", gb)
      (work / name / "done").write_text(str(text_bytes[name]))
    text_bytes[name] = int((work / name / "done").read_text())
    print(f"{name} corpus: {text_bytes[name] / 1e9:.2f} GB of text in "
          f"{len(list((work / name / 'corpus').glob('*.parquet')))} parquet shards")
  bpe = bpe_tokenizer(work)
  glob = lambda name: str(work / name / "corpus" / "*.parquet")
  rate, rss = {}, {}
  runs = [("byte", "byte", "small"), ("byte", "byte", "large"), ("bpe32k", str(bpe), "small")]
  for tok_name, tok, size in runs:
    for workers in (1, 2):
      r = tokenize(glob(size), tok, workers, work / "cache")
      key = f"{tok_name}_{size}"
      rate.setdefault(key, {})[workers] = text_bytes[size] / 1e6 / r["seconds"]
      print(f"tokenize {tok_name:>6}, {size} corpus, {workers} worker(s): "
            f"{rate[key][workers]:6.1f} MB/s ({r['tokens']:,} tokens in {r['seconds']:.1f} s), "
            f"peak RSS {r['peak_rss_gb']:.2f} GB")
      if tok_name == "bpe32k" and workers == 2:
        rss["small"] = r["peak_rss_gb"]
  r = tokenize(glob("large"), str(bpe), 2, work / "cache")
  rss["large"] = r["peak_rss_gb"]
  rate["bpe32k_large"] = {2: text_bytes["large"] / 1e6 / r["seconds"]}
  print(f"tokenize bpe32k, large corpus, 2 workers: {rate['bpe32k_large'][2]:.1f} MB/s, peak "
        f"RSS {rss['large']:.2f} GB (small corpus: {rss['small']:.2f} GB)")
  ratio = loader_over_step(glob("large"), bpe, work / "cache")
  loader = ratio["loader_batches_per_s"] / ratio["step_batches_per_s"]
  print(f"loader {ratio['loader_batches_per_s']:.1f} batches/s, small preset's step "
        f"{ratio['step_batches_per_s']:.3f} batches/s on this machine: loader/step {loader:,.0f}x")
  print(json.dumps({
      "tokenize_mb_per_s": rate,
      "tokenize_speedup_2_workers": {k: v[2] / v[1] for k, v in rate.items() if 1 in v},
      "peak_rss_gb_small_corpus": rss["small"], "peak_rss_gb_large_corpus": rss["large"],
      "loader_over_step": loader,
      "targets": {"peak_rss_gb_below": 2.0, "rss_growth_below": 1.2,
                  "speedup_2_workers_at_least": 1.6, "loader_over_step_at_least": 10.0}}))


if __name__ == "__main__":
  main()
