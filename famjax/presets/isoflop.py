"""Presets for experiments/isoflop.py: `--config=tiny` (or `small`,
`medium`, `laws`, `paper`). Sections: `study` (famjax.study.config.StudyConfig: budgets,
granularities, the size ladder, the gamma grid, exit placements, fitting), and `model`, `data`,
`train`, `mesh` as for experiments/train.py, which every run starts from (the planner sets each
run's shape, exits, steps, warmup and seed). Override any field, e.g.
`--config.study.budgets="(1e11,3e11)" --config.study.seeds="(0,1)"`.
"""

import dataclasses

import ml_collections

from famjax.data.config import DataConfig
from famjax.model.config import MeshConfig, ModelConfig
from famjax.study.config import StudyConfig
from famjax.train.config import TrainConfig

PADDED_BYTE_VOCAB = 264  # 259 byte-tokenizer ids, padded to split over up to 8 model shards

# Runs of the CPU presets: byte-level families of 4 layers, batch 16 x 64 tokens, one final
# evaluation on 32 fixed validation batches (32,768 tokens); checkpoints for resumption.
_CPU_MODEL = ModelConfig(vocab_size=PADDED_BYTE_VOCAB, max_seq_len=64)
_CPU_TRAIN = TrainConfig(batch_size=16, seq_len=64, steps=1, warmup_steps=0, learning_rate=6e-3,
                         eval_every=10**9, eval_batches=32, checkpoint_every=500,
                         keep_checkpoints=2, log_every=10, progress=False)

PRESETS = {
    # The whole study on a 2-core CPU in 4-16 minutes (docs/benchmarks.md): 3 budgets x G in
    # {1, 2, 4} x 4 sizes (N ~ 1k-13k non-embedding parameters, where these budgets' optima
    # lie), 2 dense models matched to the middle G = 2 family at 4e10 FLOPs. tokens_per_param 130
    # (non-embedding N) centres the sizes on the optima a pilot sweep found.
    "tiny": dict(
        study=StudyConfig(budgets=(2e10, 4e10, 8e10), granularities=(1, 2, 4),
                          widths=(4, 8, 12, 16, 20, 24, 32), head_dim=4, sizes_per_budget=4,
                          tokens_per_param=130.0, min_steps=50, leverage="4e10:2",
                          leverage_widths="middle", bootstrap=1000),
        model=_CPU_MODEL, train=_CPU_TRAIN),
    # 16 minutes on a 2-core CPU (docs/benchmarks.md, 2026-11-30): 3 budgets a decade apart, 5
    # sizes each, 2 seeds per point, measured EL for G = 2 and 4 at the middle budget (middle
    # size, seed 0).
    "small": dict(
        study=StudyConfig(budgets=(3e10, 1e11, 3e11), granularities=(1, 2, 4),
                          widths=(4, 8, 12, 16, 20, 24, 32, 40, 48), head_dim=4,
                          sizes_per_budget=5, tokens_per_param=100.0, min_steps=50, seeds=(0, 1),
                          leverage="1e11:2,1e11:4", leverage_widths="middle", bootstrap=2000),
        model=_CPU_MODEL, train=_CPU_TRAIN),
    # Out of the embedding regime, on a 2-core CPU (docs/medium.md): heads of 16, widths from 32,
    # tied unembeddings (an exit head is a norm), so that embedding and exit heads are 6-18% of
    # every family; budgets 5e11-2e12 (a pilot found the 1e11 valley below the smallest such
    # model); 3 sizes, 2 seeds, measured EL for G = 2 and 4 at 1e12 (dense models for every size
    # and seed, so that the report takes the family nearest the fitted N* over both seeds); and a
    # gamma grid at widths 32 and 48 on 0.26M and 0.51M tokens with dense exit controls.
    "medium": dict(
        study=StudyConfig(budgets=(5e11, 1e12, 2e12), granularities=(1, 2, 4),
                          widths=(32, 48, 64, 80, 96, 128), head_dim=16, aspect_ratio=16.0,
                          min_layers=4, layer_multiple=2, sizes_per_budget=3,
                          tokens_per_param=50.0, min_steps=50, seeds=(0, 1),
                          leverage="1e12:2,1e12:4", leverage_granularities=(2, 3, 4),
                          grid_widths=(32, 48), grid_tokens=(256_000, 512_000),
                          bootstrap=1000),
        model=dataclasses.replace(_CPU_MODEL, unembed="tied"), train=_CPU_TRAIN),
    # Which familial law (docs/laws.md), beside the medium study's IsoFLOP curves: no budgets;
    # the medium shapes' gamma grid at widths 32 and 48 on four token counts spanning 16x
    # (256k-4.1M), two seeds, with exit-shaped controls; exit placements decoupled from G at
    # width 32 on 1M tokens, three seeds, own-shape controls; 1M validation tokens per run
    # (data.val_fraction 0.04 of the stdlib corpus, 1024 batches), halves recorded.
    "laws": dict(
        study=StudyConfig(budgets=(), granularities=(1, 2, 4), widths=(32, 48), head_dim=16,
                          aspect_ratio=16.0, min_layers=4, layer_multiple=2, sizes_per_budget=2,
                          min_steps=50, seeds=(0, 1), grid_widths=(32, 48),
                          grid_tokens=(256_000, 645_120, 1_628_160, 4_096_000),
                          placements="1,4;2,4;3,4;1,2,4;2,3,4;1,2,3,4", placement_width=32,
                          placement_tokens=1_024_000, placement_seeds=(0, 1, 2),
                          bootstrap=1000),
        model=dataclasses.replace(_CPU_MODEL, unembed="tied"),
        data=DataConfig(val_fraction=0.04),
        train=dataclasses.replace(_CPU_TRAIN, eval_batches=1024)),
    # The paper's (arXiv 2512.23407): budgets 1e19..1e21 FLOPs, G up to 4 for the law, EL for
    # G = 3..6, the training loss fitted. famjax's choices, for an accelerator cluster (here:
    # --dry_run only): a ladder centred on ~20 tokens/parameter (0.2B-7B families; the paper's
    # families are 2B-12B, whose exact shapes famjax does not reproduce), a BPE vocabulary of
    # 32768, 2048-token sequences, 1M-token batches, SwiGLU d_ff = 8/3 d_model, d_model /
    # n_layers ~ 128, heads of 128, a 2T-token corpus assumed by --dry_run, and a learning rate
    # of 3e-4 at width 1024 falling as width^-1/2 (1.1e-4 at 8192); dense models for EL matched
    # to the middle size only (every size would add 35 runs and 8e20 FLOPs).
    "paper": dict(
        study=StudyConfig(budgets=(1e19, 3e19, 1e20, 3e20, 1e21), granularities=(1, 2, 3, 4),
                          widths=tuple(range(1024, 8193, 512)), head_dim=128, ff_ratio=8 / 3,
                          aspect_ratio=128.0, min_layers=8, layer_multiple=4, sizes_per_budget=5,
                          tokens_per_param=20.0, param_count="non_embedding", min_steps=500,
                          leverage="1e20:3,1e20:4", leverage_widths="middle",
                          leverage_granularities=(3, 4, 5, 6),
                          lr_width_power=0.5, fit_loss="train", bootstrap=4000,
                          planned_corpus_tokens=2_000_000_000_000),
        model=ModelConfig(vocab_size=32768, max_seq_len=2048, dtype="bfloat16"),
        data=DataConfig(tokenizer="bpe", bpe_vocab_size=32768),
        train=TrainConfig(batch_size=512, seq_len=2048, steps=1, warmup_steps=0,
                          learning_rate=3e-4, eval_every=10**9, eval_batches=64,
                          checkpoint_every=1000, progress=True)),
}


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
  sections = {"study": StudyConfig(), "model": ModelConfig(), "data": DataConfig(),
              "train": TrainConfig(), "mesh": MeshConfig(), **PRESETS[preset]}
  return ml_collections.ConfigDict(
      {name: dataclasses.asdict(value) for name, value in sections.items()})
