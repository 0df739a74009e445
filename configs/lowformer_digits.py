"""LowFormer (Nottebaum et al., papers.md E; `zoo/models/lowformer.py`) scaled down from LowFormer-B0 for
scikit-learn's 8x8 digits.

  python train.py --config configs/lowformer_digits.py --workdir workdirs/lowformer_digits
  python evaluate.py --config configs/lowformer_digits.py --workdir workdirs/lowformer_digits

Scaling [guess: the paper has no reduced configs]: B0's widths quartered (16/32/64/128/256 -> 4/8/16/32/64), its
depths 0/1/1/3/4 -> 0/1/1/2/2, the head 1536/1600 -> 96/100; the expansions, the branches (Lowtention, MLP,
FusedMBConv / MBConv) and fused_conv as B0. Strides for 8x8: stem 1, stages 1, 2, 1, 2 (maps 8, 8, 4, 4, 2; the
paper's 224 px gives 112, 56, 28, 14, 7), Lowtention strides 2 and 1 as the paper (stage 3 attends over 2x2 tokens of
its 4x4 map, stage 4 over its whole 2x2 map). Optimizer AdamW with warmup then cosine (the authors' schedule, which
they take from EfficientViT) at a digits-sized lr, weight decay and batch [guess].
"""

from configs.base import run_config

MODEL = {
  "name": "lowformer",
  "variant": "custom",
  "num_classes": 10,
  "in_channels": 1,
  "widths": (4, 8, 16, 32, 64),
  "depths": (0, 1, 1, 2, 2),
  "head_widths": (96, 100),
  "stem_stride": 1,
  "stage_strides": (1, 2, 1, 2),
  "attention_strides": (2, 1),
}


def get_config():
  return run_config(
    dict(MODEL),
    dataset="digits",
    task="classification",
    lr=3e-3,
    warmup_steps=50,
    weight_decay=0.05,
    b2=0.999,
    steps=600,
    batch_size=64,
    eval_every_steps=200,
    log_every_steps=50,
    eval_batches=0,  # the whole test split
  )
