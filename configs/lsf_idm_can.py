"""LSF-IDM (papers.md F): a BERT-style teacher over windows of 32 CAN IDs, distilled into a small BiLSTM student
with `alpha CE + (1 - alpha) T^2 KL(teacher_T || student_T)`, on the embedded 'can_bus' windows (`zoo/data/can_bus.py`:
a simulated car on a python-can virtual bus with DoS, fuzzy, spoofing and replay attacks; 5 classes).

  python train.py --config configs/lsf_idm_can.py:teacher --workdir workdirs/lsf_idm_teacher
  python train.py --config configs/lsf_idm_can.py --workdir workdirs/lsf_idm_student
  python train.py --config configs/lsf_idm_can.py:student_alone --workdir workdirs/lsf_idm_student_alone
  python bench/lsf_idm.py      # inference time of teacher and student

The teacher is `text_encoder` (bidirectional attention, 4 layers, width 128, dropout 0.1 as BERT; mean pooling: a
window has no [CLS] token, and first-position pooling scored F1 0.616 against 0.673); the student a one-layer BiLSTM
of width 64 [guess: the paper's sizes are not stated in papers.md]. alpha 0.5, T 2 [guess].
"""

from configs.base import run_config
from zoo.data.can_bus import LABELS, VOCAB_SIZE

TEACHER = {
  "name": "text_encoder",
  "vocab_size": VOCAB_SIZE,
  "num_layers": 4,
  "embed_dim": 128,
  "num_heads": 4,
  "mlp_dim": 384,
  "pooling": "mean",
  "dropout_rate": 0.1,
  "num_classes": len(LABELS),
}
STUDENT = {"name": "bilstm", "vocab_size": VOCAB_SIZE, "embed_dim": 32, "hidden_dim": 64, "num_classes": len(LABELS)}
TEACHER_WORKDIR = "workdirs/lsf_idm_teacher"


def get_config(role="student"):
  """role: 'teacher' (trained on the labels), 'student' (distilled from the teacher run) or 'student_alone' (the
  student trained on the labels only)."""
  roles = {"teacher": TEACHER, "student": {"name": "distillation", "teacher": TEACHER, "student": STUDENT}}
  roles["student_alone"] = STUDENT
  if role not in roles:
    raise ValueError(f"configs/lsf_idm_can.py:{role}: allowed roles are {sorted(roles)}")
  config = run_config(
    dict(roles[role]),
    dataset="can_bus",
    task="distillation" if role == "student" else "feature_classification",
    lr=1e-3 if role == "teacher" else 3e-3,
    warmup_steps=30,
    weight_decay=0.01,
    steps=400,
    batch_size=64,
    eval_every_steps=200,
    log_every_steps=50,
    eval_batches=0,
  )
  config.task_options.as_tokens = "ids"
  if role == "student":
    config.init_from = {"teacher": TEACHER_WORKDIR}
    config.frozen_params = ("^teacher/",)
  return config
