"""Predictions and dev / test metrics of a model on a task's examples."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from peftlab.formats.loading import load
from peftlab.train import metrics as metric_fns
from peftlab.train.config import TrainConfig
from peftlab.train.data import Encoder, load_for_task, task_encoder, task_splits, text_length, uses_chat_template
from peftlab.train.environment import default_device
from peftlab.train.frozen import FrozenPrefix
from peftlab.train.generation import evaluate_generation
from peftlab.train.responses import ResponseEncoder
from peftlab.train.tasks import Example, Row, TaskInfo


@torch.no_grad()
def predict(
    pm: nn.Module,
    encoder: Encoder,
    rows: list[Example],
    batch_size: int,
    device: torch.device,
    frozen: FrozenPrefix | None = None,
) -> list:
    """Predictions for ``rows``: class ids or scores; T5 ranks the label words by likelihood. ``frozen``: start the
    forward passes from a run's cached states (the dev split, which every evaluation of a run, and of a worker's
    runs, scores again)."""
    was_training = pm.training
    pm.eval()
    order = sorted(range(len(rows)), key=lambda i: text_length(rows[i]))  # similar lengths pad less
    out: list = [None] * len(rows)
    for i in range(0, len(rows), batch_size):
        ids = order[i : i + batch_size]
        batch = {k: v.to(device) for k, v in encoder([rows[j] for j in ids]).items() if k != "labels"}
        if encoder.seq2seq:
            preds = rank_labels(pm, encoder, batch)
        else:
            with frozen.feeding(batch) if frozen is not None else nullcontext():
                logits = pm(**batch).logits.float()
            preds = logits[:, 0].tolist() if encoder.task.is_regression else logits.argmax(-1).tolist()
        for j, p in zip(ids, preds, strict=True):
            out[j] = p
    pm.train(was_training)
    return out


def rank_labels(pm: nn.Module, encoder: Encoder, batch: dict[str, torch.Tensor]) -> list:
    """Text-to-text classification: the label word with the highest likelihood (rank classification);
    regression generates a number."""
    n = batch["input_ids"].shape[0]
    if encoder.task.is_regression:
        gen = pm.generate(**batch, max_new_tokens=6, do_sample=False)
        values = []
        for seq in gen:
            text = encoder.tok.decode(seq.tolist(), skip_special_tokens=True)
            try:
                values.append(float(text.strip().split()[0]))
            except (ValueError, IndexError):
                values.append(2.5)
        return values
    scores = []
    for target in encoder.targets:
        labels = torch.tensor([target] * n, device=batch["input_ids"].device)
        logits = pm(**batch, labels=labels).logits.float()
        logp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        scores.append(logp.sum(-1))
    return torch.stack(scores, -1).argmax(-1).tolist()


def evaluate(
    pm: nn.Module,
    encoder: Encoder | ResponseEncoder,
    rows: list[Row],
    batch_size: int,
    device: torch.device,
    frozen: FrozenPrefix | None = None,
    generate: bool = True,
) -> dict[str, float]:
    """The task's metrics on ``rows``; a generative task's are its dev loss and (with ``generate``) the metrics of
    what the model generates."""
    if isinstance(encoder, ResponseEncoder):
        return evaluate_generation(pm, encoder, rows, batch_size, device, generate)
    preds = predict(pm, encoder, rows, batch_size, device, frozen)
    labels = [r["label"] for r in rows]
    return metric_fns.compute(encoder.task.metrics, preds, labels)


def score_saved(config: TrainConfig, adapter: str | Path) -> dict[str, float]:
    """The test scores of an adapter a run of ``config`` saved, on that run's test split (a search scores its
    Pareto set so, once, after trials that did not look at test)."""
    task, splits = task_splits(config)
    model, encoder, device = scoring_backbone(
        config.model, task, config.max_length, uses_chat_template(config), config.max_new_tokens
    )
    return evaluate(load(model, adapter), encoder, splits.test, config.eval_batch_size, device)


def scoring_backbone(
    model_name: str,
    task: TaskInfo,
    max_length: int,
    chat_template: bool = False,
    max_new_tokens: int | None = None,
    quantize: str | None = None,
) -> tuple[nn.Module, Encoder | ResponseEncoder, torch.device]:
    """The backbone in the task's class on this process's device, with its encoder: what scoring a saved adapter
    starts from (``quantize``: the base quantized as it was trained, see :mod:`peftlab.backbone.quant`)."""
    model, seq2seq = load_for_task(model_name, task, quantize=quantize)
    device = default_device()
    model.to(device)
    encoder = task_encoder(
        model_name, model, task, max_length, seq2seq, chat_template=chat_template, max_new_tokens=max_new_tokens
    )
    return model, encoder, device
