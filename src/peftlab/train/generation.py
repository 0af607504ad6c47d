"""Generating text from a (PEFT) model and judging it: batched generation, the dev loss over response tokens, and a
generative task's metrics on what the model writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.train.generative import score_texts
from peftlab.train.responses import ResponseEncoder
from peftlab.train.tasks import GenExample

#: generated dev examples a run keeps in its record, next to their references
SAMPLES = 5


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token: greedy (``do_sample`` False, the default, deterministic) or sampled."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def kwargs(self) -> dict[str, Any]:
        if not self.do_sample:  # greedy: the model's generation config must not switch sampling back on
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "temperature": None, "top_p": None,
                    "top_k": None}  # fmt: skip
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k or None,
        }


@torch.no_grad()
def generate_texts(
    pm: nn.Module,
    encoder: ResponseEncoder,
    rows: list[GenExample],
    batch_size: int,
    device: torch.device,
    sampling: Sampling,
) -> list[str]:
    """What the model writes after each row's prompt (batched; prompts of similar length share a batch)."""
    was_training = pm.training
    pm.eval()
    order = sorted(range(len(rows)), key=lambda i: len(encoder.render(rows[i])))
    out: list[str] = [""] * len(rows)
    for start in range(0, len(rows), batch_size):
        ids = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in encoder.prompts([rows[i] for i in ids], sampling.max_new_tokens).items()}
        generated = pm.generate(**batch, **sampling.kwargs(), pad_token_id=encoder.pad_id, eos_token_id=encoder.eos_id)
        if not encoder.seq2seq:  # a decoder returns the prompt, then what it added
            generated = generated[:, batch["input_ids"].shape[1] :]
        for i, seq in zip(ids, generated.tolist(), strict=True):
            out[i] = encoder.decode(seq).strip()
    pm.train(was_training)
    return out


@torch.no_grad()
def response_loss(
    pm: nn.Module, encoder: ResponseEncoder, rows: list[GenExample], batch_size: int, device: torch.device
) -> float:
    """The mean cross-entropy per response token (nats), over all of ``rows``' response tokens."""
    was_training = pm.training
    pm.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in encoder(rows[start : start + batch_size]).items()}
        labels = batch["labels"] if encoder.seq2seq else batch["labels"][:, 1:]  # decoders predict the next token
        n = int((labels != -100).sum())
        if n:
            total += float(pm(**batch).loss) * n
            tokens += n
    pm.train(was_training)
    return total / tokens if tokens else float("nan")


def evaluate_generation(
    pm: nn.Module,
    encoder: ResponseEncoder,
    rows: list[GenExample],
    batch_size: int,
    device: torch.device,
    generate: bool = True,
) -> dict[str, float]:
    """``loss`` (per response token), and with ``generate`` the task's metrics of greedy generations."""
    scores = {"loss": response_loss(pm, encoder, rows, batch_size, device)}
    if generate and encoder.task.generation.scoring != "loss":
        texts = generate_texts(pm, encoder, rows, batch_size, device, Sampling(encoder.max_new_tokens))
        scores |= score_texts(encoder.task.generation.scoring, texts, [r["reference"] for r in rows])
    return scores


def samples(
    pm: nn.Module, encoder: ResponseEncoder, rows: list[GenExample], batch_size: int, device: torch.device
) -> list[dict[str, str]]:
    """A few rows' prompts, greedy generations and references: what a run record shows of its model's writing."""
    rows = rows[:SAMPLES]
    texts = generate_texts(pm, encoder, rows, batch_size, device, Sampling(encoder.max_new_tokens))
    return [
        {"prompt": r["prompt"], "generated": t, "reference": r["reference"]} for r, t in zip(rows, texts, strict=True)
    ]
