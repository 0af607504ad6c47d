"""Fine-tuning a spec on a task: the loop behind ``peftlab train`` and the search's trials.

AdamW with per-method learning-rate defaults, a linear schedule with warm-up, gradient accumulation and
clipping, dynamic padding, optional bf16/fp16 autocast on a GPU and gradient checkpointing; a budget in
steps, epochs or a fraction of the full run; evaluation every N steps with early stopping and best-state
selection; checkpoints to resume from; data parallelism under ``torchrun`` / ``accelerate launch``. Every
run writes a JSON record. A non-finite loss ends the run with status "diverged" instead of a crash.
"""

from peftlab.train.checkpoint import trainable
from peftlab.train.config import CHECKPOINT, RUN_FIELDS, RunRecord, TrainConfig
from peftlab.train.data import (
    Encoder,
    batches,
    input_limit,
    load_for_task,
    task_encoder,
    task_splits,
    text_length,
    user_task,
)
from peftlab.train.environment import default_device, device_name, library_versions
from peftlab.train.evaluation import evaluate, predict
from peftlab.train.loop import Run, batch_loss, enable_checkpointing, train

__all__ = [
    "CHECKPOINT",
    "RUN_FIELDS",
    "Encoder",
    "Run",
    "RunRecord",
    "TrainConfig",
    "batch_loss",
    "batches",
    "default_device",
    "device_name",
    "enable_checkpointing",
    "evaluate",
    "input_limit",
    "library_versions",
    "load_for_task",
    "predict",
    "task_encoder",
    "task_splits",
    "text_length",
    "train",
    "trainable",
    "user_task",
]
