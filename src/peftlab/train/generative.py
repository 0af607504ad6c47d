"""Generation tasks: how a row becomes prompt → response, and how generated text is scored.

A generative task trains the model to continue ``prompt`` with ``response`` (the loss is on the response's tokens
only) and judges it by what it generates from the prompt, compared with ``reference``:

* ``exact``: exact match after normalisation (lower case, punctuation and surrounding space dropped, first line);
* ``number``: exact match of the final number (GSM8K: the number after ``####``, else the last number written);
* ``rouge``: ROUGE-1/2/L F-measure from the maintained ``rouge-score`` package (Lin, 2004), stemmed;
* ``loss``: nothing generated; the dev loss per response token is the score.

The SuperGLUE tasks as text-to-text use the instructions of the survey's Appendix A (Lialin et al., 2023) followed
by the example's fields; the target is the label word (COPA: the plausible alternative's text).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

from peftlab import optional

__all__ = ["GEN_METRICS", "GenExample", "Generation", "final_number", "normalise", "score_texts"]

#: the metric names each scoring kind reports (the first is the task's main metric)
GEN_METRICS: dict[str, tuple[str, ...]] = {
    "exact": ("exact_match",),
    "number": ("exact_match",),
    "rouge": ("rougeL", "rouge1", "rouge2"),
    "loss": ("loss",),  # nothing generated: the dev loss per response token is the score (lower is better)
}


class GenExample(TypedDict):
    """One prompt → response example; ``reference`` is what generations are scored against (the response, or the
    part of it that counts: GSM8K's final number). ``messages``: the conversation before the response, rendered with
    the model's chat template (``prompt`` is then its last turn, for display)."""

    prompt: str
    response: str
    reference: str
    messages: NotRequired[list[dict[str, str]]]


@dataclass(frozen=True)
class Generation:
    """What makes a task generative: its row → example formatters, its scoring and its generation length."""

    prompt: Callable[[dict[str, Any]], str]
    response: Callable[[dict[str, Any]], str]
    scoring: str = "exact"  # a key of GEN_METRICS
    max_new_tokens: int = 16
    reference: Callable[[dict[str, Any]], str] | None = None

    def example(self, row: dict[str, Any]) -> GenExample:
        response = self.response(row)
        reference = self.reference(row) if self.reference is not None else response
        return {"prompt": self.prompt(row), "response": response, "reference": reference}

    @property
    def metrics(self) -> tuple[str, ...]:
        return GEN_METRICS[self.scoring]


_PUNCT = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalise(text: str) -> str:
    """The first non-empty line, lower case, without punctuation or extra spaces: ``" Yes."`` is ``"yes"``."""
    line = next((s for s in text.strip().splitlines() if s.strip()), "")
    return " ".join(line.lower().translate(_PUNCT).split())


def _canonical_number(raw: str) -> str:
    value = raw.replace(",", "").replace("$", "").rstrip(".")
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if math.isfinite(number) and number == int(number) else repr(number)


def final_number(text: str) -> str:
    """The answer of a worked solution: what follows the last ``####``, else the last number in the text; ``""``
    when there is none. Commas, ``$`` and a trailing ``.0`` do not count (``"1,000.00"`` is ``"1000"``)."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
        found = _NUMBER.findall(text)
        return _canonical_number(found[0]) if found else normalise(text)
    found = _NUMBER.findall(text)
    return _canonical_number(found[-1]) if found else ""


def score_texts(scoring: str, generated: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The task's generated-text metrics of ``generated`` against ``references`` (means over examples)."""
    if len(generated) != len(references) or not references:
        raise ValueError(f"need as many generations as references (>0), got {len(generated)} and {len(references)}")
    if scoring == "rouge":
        rouge = optional.require("rouge_score.rouge_scorer", "ROUGE scoring")
        scorer = rouge.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        totals = dict.fromkeys(("rougeL", "rouge1", "rouge2"), 0.0)
        for g, r in zip(generated, references, strict=True):
            for name, s in scorer.score(r, g).items():
                totals[name] += s.fmeasure
        return {k: v / len(references) for k, v in totals.items()}
    norm = final_number if scoring == "number" else normalise
    reference_of = (lambda r: _canonical_number(r)) if scoring == "number" else normalise
    hits = sum(norm(g) == reference_of(r) and norm(g) != "" for g, r in zip(generated, references, strict=True))
    return {"exact_match": hits / len(references)}


# -- the built-in generative tasks' formatters -------------------------------------------------------------------


_CALCULATOR = re.compile(r"<<[^>]*>>")


def gsm8k() -> Generation:
    """GSM8K: the question → the worked solution ending ``#### <answer>``, without the calculator annotations
    (``<<3*4=12>>``, which the dataset's own models used to call a calculator); scored on the final number."""
    return Generation(
        prompt=lambda row: f"Question: {row['question']}\nAnswer:",
        response=lambda row: _CALCULATOR.sub("", row["answer"]),
        reference=lambda row: final_number(row["answer"]),
        scoring="number",
        max_new_tokens=256,
    )


#: Appendix A of the survey: one instruction per task
SURVEY_INSTRUCTIONS = {
    "boolq": 'Given a passage and a yes/no question, identify if the answer is "yes" or "no".',
    "cb": "Given a premise, identify if the hypothesis entails, contradicts or is neutral to the premise.",
    "copa": (
        "Given a premise, a question (cause/effect) and two alternative choices, identify plausible answer from "
        "the alternative choices."
    ),
    "rte": "Given a premise, identify if the hypothesis entails premise or not.",
}


def _boolean(value: Any) -> bool:
    return value in (True, 1, "True", "true", "1")


def _superglue_prompt(task: str) -> Callable[[dict[str, Any]], str]:
    head = SURVEY_INSTRUCTIONS[task]
    if task == "boolq":
        return lambda r: f"{head}\nPassage: {r['passage']}\nQuestion: {r['question']}?\nAnswer:"
    if task == "copa":
        return lambda r: (
            f"{head}\nPremise: {r['premise']}\nQuestion: {r['question']}\n"
            f"Choice 1: {r['choice1']}\nChoice 2: {r['choice2']}\nAnswer:"
        )
    return lambda r: f"{head}\nPremise: {r['premise']}\nHypothesis: {r['hypothesis']}\nAnswer:"


def superglue(task: str, label_words: tuple[str, ...]) -> Generation:
    """A SuperGLUE task as text-to-text: the survey's instruction and the fields → the label word (COPA: the
    plausible alternative's text). Labels come as names, ids or booleans (local files and the hub differ)."""

    def response(row: dict[str, Any]) -> str:
        label = row["label"]
        if task == "copa":
            return row["choice2" if int(label) == 1 else "choice1"]
        if task == "boolq":
            return "yes" if _boolean(label) else "no"
        if isinstance(label, str) and label in label_words:
            return label
        return label_words[int(label)]

    return Generation(prompt=_superglue_prompt(task), response=response, scoring="exact", max_new_tokens=8)


def summarization(document: str, summary: str) -> Generation:
    """A document → its summary, scored by ROUGE (the survey: CNN/DailyMail, ROUGE-L, 128 output tokens)."""
    return Generation(
        prompt=lambda row: f"Summarize the following article.\n{row[document]}\nSummary:",
        response=lambda row: row[summary],
        scoring="rouge",
        max_new_tokens=128,
    )
