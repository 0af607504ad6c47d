"""When can a search tell a hopeless trial from a slow one? Trials that the early hopeless check stopped are
trained to their whole budget, evaluated every quarter, and the rule is replayed at each quarter: a stop there
is right when the run never leaves the constant prediction afterwards, wrong when it does.

    python benchmarks/hopeless_check.py run --studies sst2-random-s0 sst2-random-s1 sst2-random-s2
    python benchmarks/hopeless_check.py report

The studies are search_evidence.py's (``--runs``); each stopped trial is re-trained with its study's seed and
settings (MiniLM, SST-2, 100 steps, batch 16, lr 1e-3, max length 64, dev 1000) with the stop turned off.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from peftlab.core.spec import Spec
from peftlab.search.study import load_study
from peftlab.train import TrainConfig, train
from peftlab.train.baseline import LOSS_TOLERANCE
from peftlab.train.warm import WarmStart

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "search_evidence" / "hopeless_check.json"
RUNS = HERE / "results" / "search_evidence" / "runs"
PRIOR = 0.6865  # the label prior's loss on SST-2's training split (the runs' messages give it)
BASELINE = 0.56  # the constant prediction's accuracy on the 1000-example dev split
#: a run "learned later" when a later dev accuracy clears the baseline by 2 sigma of a 1000-example accuracy at 0.56
#: (one or two examples more than the constant prediction are noise, not learning)
LEARNED = BASELINE + 2 * (BASELINE * (1 - BASELINE) / 1000) ** 0.5


def cmd_run(args: argparse.Namespace) -> None:
    done = json.loads(RESULT.read_text()) if RESULT.is_file() else []
    seen = {(r["study"], r["trial"]) for r in done}
    warm = WarmStart()
    for name in args.studies:
        seed = int(name.rsplit("-s", 1)[1])
        study = load_study(str(Path(args.runs) / name / "study.db"), name)[0]
        for t in study.trials:
            if t.user_attrs.get("status") != "hopeless" or (name, t.number) in seen:
                continue
            config = TrainConfig(
                model="minilm",
                task="sst2",
                data_dir=args.data_dir,
                seed=seed,
                max_steps=100,
                batch_size=16,
                max_length=64,
                group_by_length=True,
                dev_size=1000,
                lr=1e-3,
                eval_every=25,
                score_test=False,
                stop_hopeless=False,
                progress=False,
            )
            record = train(Spec.from_dict(t.user_attrs["spec"]), config, warm=warm)
            done.append(
                {
                    "study": name,
                    "trial": t.number,
                    "stored_percent": t.user_attrs["stored_percent"],
                    "evals": [[e["step"], e["loss"], e["accuracy"]] for e in record.evaluations],
                }
            )
            RESULT.write_text(json.dumps(done, indent=1) + "\n")
            print(json.dumps(done[-1]), flush=True)


def _stops(rows: list[dict], k: int, recent: bool) -> tuple[int, int]:
    """The rule replayed at evaluation ``k`` (0: step 25, 1: step 50, 2: step 75): (stopped, stopped but learned
    later). The loss is the mean since the start, or (``recent``) over the later half of the steps so far, which at
    step 50 is exactly the second quarter's mean."""
    stopped = wrong = 0
    for r in rows:
        evals = r["evals"]
        losses = [e[1] for e in evals[: k + 1]]
        loss = statistics.mean(losses[(k + 1) // 2 :] if recent else losses)
        if evals[k][2] <= BASELINE and loss >= (1 - LOSS_TOLERANCE) * PRIOR:
            stopped += 1
            wrong += any(e[2] > LEARNED for e in evals[k + 1 :])
    return stopped, wrong


def cmd_report(args: argparse.Namespace) -> None:
    rows = json.loads(RESULT.read_text())
    lines = [
        f"{len(rows)} trials that the check at step 25 stopped, re-trained to step 100 with evaluations every 25 "
        "steps; the rule replayed at each (constant prediction on dev 1000 = 0.56, label prior's loss 0.6865; a stop "
        f"is wrong when a later dev accuracy exceeds {LEARNED:.3f}, the baseline + 2σ):",
        "",
        "| check at step | loss judged | stopped | learned later (wrong stops) | right stops | steps saved each |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for k, recent in ((0, False), (1, False), (1, True), (2, False), (2, True)):
        stopped, wrong = _stops(rows, k, recent)
        what = "later half of the steps" if recent else "mean since the start"
        lines.append(f"| {25 * (k + 1)} | {what} | {stopped} | {wrong} | {stopped - wrong} | {75 - 25 * k} |")
    text = "\n".join(lines) + "\n"
    (RESULT.parent / "hopeless_check.md").write_text(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["run", "report"])
    p.add_argument("--studies", nargs="+", default=["sst2-random-s0", "sst2-random-s1", "sst2-random-s2"])
    p.add_argument("--runs", default=str(RUNS))
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    args = p.parse_args()
    {"run": cmd_run, "report": cmd_report}[args.phase](args)


if __name__ == "__main__":
    main()
