"""The ``peftlab`` command line: ``methods``, ``show``, ``train``, ``eval`` and ``bench``.

User mistakes end with one ``error:`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

from transformers.utils import logging as hf_logging

from peftlab import __version__, methods
from peftlab.atomic import write_text
from peftlab.backbone.quant import QUANTIZE_CHOICES, check_quantize
from peftlab.backbone.zoo import HEADS, MODEL_NAMES, load_model
from peftlab.bench import BenchConfig, markdown, run
from peftlab.bench.entries import split_top
from peftlab.core.peft_model import apply
from peftlab.core.spec import Spec
from peftlab.errors import AdapterLoadError, PeftlabError
from peftlab.formats.loading import load
from peftlab.inference import generate, language_model
from peftlab.search import results
from peftlab.search.dashboard import serve
from peftlab.search.pareto import COST_SCALES
from peftlab.search.refine import refine
from peftlab.search.results import export, front_table, summary
from peftlab.search.storage import hide_password
from peftlab.search.study import (
    NUTS_DEFAULTS,
    SEARCH_TRAINING,
    SearchConfig,
    load_study,
    none_completed,
    print_trial,
    run_search,
)
from peftlab.space import load_space
from peftlab.train import RUN_FIELDS, TrainConfig, evaluate, train
from peftlab.train.environment import library_versions
from peftlab.train.evaluation import scoring_backbone
from peftlab.train.generation import Sampling
from peftlab.train.tasks import get_task, make_splits, read_prompts


def _kwargs(pairs: Sequence[str]) -> dict:
    """``--set r=16 --set targets=qkv`` -> {"r": 16, "targets": "qkv"} (Python literals, else strings)."""
    return methods.parse_settings(pairs, "--set")


def spec_from_args(args: argparse.Namespace) -> Spec:
    """The spec named by ``--method`` (with ``--set`` arguments) or read from ``--spec``."""
    if args.spec and args.method:
        raise PeftlabError("give either --method or --spec, not both")
    if args.spec:
        return Spec.load(args.spec)
    if not args.method:
        raise PeftlabError(f"give --method NAME (one of: {', '.join(methods.METHODS)}) or --spec FILE")
    return methods.for_model(args.method, args.model, **_kwargs(args.set))


def cmd_methods(args: argparse.Namespace) -> None:
    every = [*methods.METHODS.values(), *methods.MODEL_METHODS.values()]
    if args.json:
        print(json.dumps({m.name: {"summary": m.summary, "paper": m.paper} for m in every}, indent=2))
        return
    width = max(len(m.name) for m in every)
    for m in every:
        paper = f" ({m.paper})" if m.paper else ""
        print(f"{m.name:<{width}}  {m.summary}{paper}")


def cmd_show(args: argparse.Namespace) -> None:
    spec = spec_from_args(args)
    model = load_model(args.model, head=args.head, meta=True, quantize=check_quantize(args.quantize))
    pm = apply(model, spec)
    counts = pm.counts()
    if args.json:
        out = counts.to_dict() | {"model": args.model, "model_class": type(model).__name__}
        if args.show_spec:
            out["spec"] = spec.to_dict()
        print(json.dumps(out, indent=2))
        return
    print(f"model: {args.model} ({type(model).__name__})")
    print(counts.table())
    if args.show_spec:
        print(spec.to_json())


def _train_config(args: argparse.Namespace, output: str | None):
    return TrainConfig(
        model=args.model,
        task=args.task,
        data_dir=args.data_dir,
        k=args.k,
        data_seed=args.data_seed,
        dev_size=args.dev_size,
        seed=args.seed,
        max_steps=args.max_steps,
        epochs=args.epochs,
        fraction=args.fraction,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        max_length=args.max_length,
        group_by_length=args.group_by_length,
        eval_every=args.eval_every,
        patience=args.patience,
        precision=args.precision,
        quantize=check_quantize(getattr(args, "quantize", None)),
        gradient_checkpointing=args.gradient_checkpointing,
        packing=args.packing,
        dropout=args.dropout,
        consistency=args.consistency,
        output=output,
        progress=not args.no_progress,
        train_file=args.train_file,
        test_file=args.test_file,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        label_names=args.labels.split(",") if args.labels else None,
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        messages_column=args.messages_column,
        eval_metric=args.eval_metric,
        select_by=args.select_by,
        generate_every=args.generate_every,
        final_dev_metrics=not args.no_final_dev_metrics,
        max_new_tokens=args.max_new_tokens,
        chat_template=args.chat_template,
        score_test=args.score_test,
        stop_hopeless=args.stop_hopeless,
        cache_frozen=args.cache_frozen,
        cache_frozen_mb=args.cache_frozen_mb,
        init_batches=args.init_batches,
        loraplus_ratio=args.loraplus_ratio,
        optimizer=args.optimizer,
        galore_rank=args.galore_rank,
        galore_update_gap=args.galore_update_gap,
        galore_scale=args.galore_scale,
        init_from=getattr(args, "init_from", None),
    )


def _train_settings(args: argparse.Namespace) -> dict:
    """The TrainConfig fields of the training flags (what a search stores as its trials' fidelity)."""

    config = asdict(_train_config(args, None))
    return {k: v for k, v in config.items() if k not in RUN_FIELDS}


def search_config(args: argparse.Namespace) -> SearchConfig:
    """The search that ``peftlab search`` arguments describe."""
    return SearchConfig(
        model=args.model,
        task=args.task,
        space=args.space,
        sampler=args.sampler,
        trials=args.trials,
        study=args.study,
        storage=args.storage,
        output=_output(args),
        objectives=tuple(args.objectives.split(",")),
        budget=args.budget,
        ref_point=_pair(args.ref_point, "--ref-point") if args.ref_point else None,
        cost_scale=args.cost_scale,
        startup_trials=args.startup_trials,
        batch_size=args.bo_batch,
        seed=args.sampler_seed,
        heartbeat=args.heartbeat,
        train=_train_settings(args),
        nuts_warmup=args.nuts_warmup,
        nuts_samples=args.nuts_samples,
        nuts_thinning=args.nuts_thinning,
    )


def _scale_note(summary: dict) -> str:
    return ", stored % on a log10 axis" if summary["cost_scale"] == "log" else ""


def cmd_search(args: argparse.Namespace) -> None:
    config = search_config(args)
    study = run_search(config, workers=args.workers, on_trial=print_trial)
    paths = export(study, Path(config.output) / "results", plots=not args.no_plots)
    s = summary(study)
    print(f"study '{study.study_name}' in {hide_password(config.storage_url)}: {s['trials']} trials {s['statuses']}")
    print(f"hypervolume {s['hypervolume']:.5f} (reference point {s['ref_point']}{_scale_note(s)})")
    print(front_table(study))
    print(f"results: {', '.join(str(p) for p in paths)}")
    failed = none_completed(study)
    if failed:
        raise PeftlabError(f"no trial of study '{study.study_name}' completed; the first: {failed}")


def _output(args: argparse.Namespace) -> str:
    """``--output``, else ./BASE for the default study and ./BASE-STUDY for another: a folder's trial runs belong to
    one study (trial numbers restart in each)."""
    if args.output:
        return args.output
    if args.study == args.default_study:
        return args.output_base
    return f"{args.output_base}-{re.sub(r'[^A-Za-z0-9._-]+', '_', args.study)}"


def _pair(text: str, flag: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise PeftlabError(f"{flag} takes SCORE,STORED_PERCENT, e.g. 0.5,2.0; got {text!r}") from None
    return a, b


def _studies(args: argparse.Namespace) -> list:
    return [load_study(args.storage, name)[0] for name in args.study]


def cmd_pareto(args: argparse.Namespace) -> None:
    needs_output = args.action in ("export", "plot", "retrain")
    if needs_output and not args.output:
        raise PeftlabError(f"pareto {args.action} needs --output FOLDER")
    if args.action in ("spec", "retrain") and len(args.study) > 1:
        raise PeftlabError(f"pareto {args.action} works on one study; got {len(args.study)}")
    if args.action == "spec" and len(args.trial or []) != 1:
        raise PeftlabError("pareto spec needs one --trial N (see `peftlab pareto show` for the front's trials)")
    studies = _studies(args)
    if args.action == "show":
        for study in studies:
            s = results.summary(study)
            if args.json:
                print(json.dumps(s, indent=2, default=str))
                continue
            print(
                f"study '{study.study_name}' ({s['definition']['sampler']}): {s['trials']} trials "
                f"{s['statuses']}, hypervolume {s['hypervolume']:.5f} "
                f"(reference point {s['ref_point']}{_scale_note(s)})"
            )
            print(results.front_table(study))
    elif args.action == "export":
        for study in studies:
            folder = Path(args.output) / study.study_name if len(studies) > 1 else Path(args.output)
            for path in results.export(study, folder, plots=not args.no_plots):
                print(path)
    elif args.action == "plot":
        Path(args.output).mkdir(parents=True, exist_ok=True)
        print(results.plot_front(studies, Path(args.output) / "front.png"))
        print(results.plot_hypervolume(studies, Path(args.output) / "hypervolume.png"))
    elif args.action == "spec":
        spec = results.trial_spec(studies[0], args.trial[0])
        if args.output:
            spec.save(args.output)
            print(args.output)
        else:
            print(spec.to_json())
    elif args.action == "retrain":
        overrides = {k: getattr(args, k) for k in ("max_steps", "epochs", "fraction") if getattr(args, k) is not None}
        table = results.retrain(studies[0], args.seeds, args.output, overrides, args.trial)
        print(table)


def cmd_refine(args: argparse.Namespace) -> None:
    config = SearchConfig(
        model=args.model,
        task=args.task,
        space=args.space,
        study=args.study,
        storage=args.storage,
        output=_output(args),
        seed=args.sampler_seed,
        heartbeat=args.heartbeat,
        train=_train_settings(args),
    )
    stages = args.stages.split(",") if args.stages else None
    result = refine(config, samples=args.samples, stages=stages, on_trial=print_trial)
    for stage in result.stages:
        shown = "  ".join(
            f"{c['value']}: {c['mean']:.4f}" if c["mean"] is not None else f"{c['value']}: -"
            for c in stage.to_dict()["candidates"]
        )
        margin = stage.margin()
        by = ""
        if margin is not None:
            sigma = f"{margin[1]:.1f} sigma" if margin[1] is not None else "sigma unknown with 1 sample"
            by = f" by {margin[0]:+.4f} ({sigma}{', within noise' if margin[1] is not None and margin[1] < 2 else ''})"
        print(
            f"{stage.name}: "
            + (f"skipped ({stage.skipped})" if stage.skipped else f"chose {stage.chosen}{by}   ({shown})")
        )
    print("design: " + ", ".join(f"{k}={v}" for k, v in result.design.items()))
    if result.spec is not None:
        print(
            f"stored {result.stored_percent:.3f}%; spec: {Path(config.output) / 'spec.json'} "
            f"(train it with `peftlab train --spec`)"
        )


def cmd_dashboard(args: argparse.Namespace) -> None:
    serve(args.storage, host=args.host, port=args.port)


@contextlib.contextmanager
def _log_to_stderr(name: str) -> Iterator[None]:
    """INFO lines of logger ``name`` on stderr while a command runs."""
    logger = logging.getLogger(name)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def cmd_train(args: argparse.Namespace) -> None:
    spec = spec_from_args(args)
    with _log_to_stderr("peftlab.train"):  # one line per evaluation, with or without the progress bar
        record = train(spec, _train_config(args, args.output))
    summary = {
        "status": record.status,
        "message": record.message,
        "steps": record.steps,
        "best": record.best,
        "test": record.test,
        "output": args.output,
        "wall_time_s": round(record.wall_time_s, 1),
        "tokens_per_s": round(record.tokens_per_s, 1),
    }
    print(json.dumps(summary, indent=2))


def cmd_eval(args: argparse.Namespace) -> None:
    for flag in ("batch_size", "max_length"):
        if getattr(args, flag) < 1:
            raise PeftlabError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    check_quantize(args.quantize)
    task = get_task(args.task)
    model, encoder, device = scoring_backbone(
        args.model, task, args.max_length, args.chat_template, args.max_new_tokens, args.quantize
    )
    try:
        pm = load(model, args.adapter)
    except AdapterLoadError as err:
        trained = _trained_task(Path(args.adapter))
        if trained is None or trained == task.name:
            raise
        raise AdapterLoadError(f"{err}; it was trained on {trained}, not {task.name}") from None
    rows = make_splits(task.name, args.data_dir, dev_size=0).test
    scores = evaluate(pm, encoder, rows, args.batch_size, device)
    print(json.dumps({"task": task.name, "examples": len(rows), **scores}, indent=2))


def cmd_generate(args: argparse.Namespace) -> None:
    check_quantize(args.quantize)
    if (args.prompt is None) == (args.input_file is None):
        raise PeftlabError("give one of --prompt TEXT or --input-file FILE")
    for flag in ("batch_size", "max_new_tokens", "max_length"):
        if getattr(args, flag) < 1:
            raise PeftlabError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not (args.temperature > 0 and 0 < args.top_p <= 1 and args.top_k >= 0):
        raise PeftlabError("sampling needs --temperature > 0, --top-p in (0, 1] and --top-k >= 0")
    if args.output and Path(args.output).exists():
        raise PeftlabError(f"--output '{args.output}' exists; choose a new file (nothing was changed)")
    rows = (
        [{"prompt": args.prompt, "response": "", "reference": ""}]
        if args.prompt is not None
        else read_prompts(args.input_file, args.prompt_column, args.messages_column)
    )
    model, merged = language_model(args.model, args.adapter, args.merge, args.quantize)
    if args.merge:
        logging.getLogger("peftlab").info("merged %d module(s) into the weights; the rest run unmerged", merged)
    sampling = Sampling(args.max_new_tokens, args.sample, args.temperature, args.top_p, args.top_k)
    texts = generate(model, args.model, rows, sampling, args.batch_size, args.chat_template, args.max_length, args.seed)
    if args.prompt is not None and not args.output:
        print(texts[0])
        return
    lines = "".join(
        json.dumps({"prompt": r["prompt"], "generated": t}) + "\n" for r, t in zip(rows, texts, strict=True)
    )
    if args.output:
        write_text(Path(args.output), lines)
    else:
        sys.stdout.write(lines)


def _trained_task(adapter: Path) -> str | None:
    """The task in the run record beside an adapter folder written by ``peftlab train`` (None if there is none)."""
    try:
        name = json.loads((adapter.parent / "record.json").read_text())["config"]["task"]
        return get_task(name).name
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cmd_bench(args: argparse.Namespace) -> None:
    config = BenchConfig(
        model=args.model,
        methods=[m.strip() for m in split_top(args.methods or "", ",") if m.strip()],
        methods_file=args.methods_file,
        full=not args.no_full,
        output=args.output,
        batch=args.batch,
        seq=args.seq,
        response=args.response,
        repeats=args.repeats,
        warmup=args.warmup,
        rounds=args.rounds,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        compare_peft=args.compare_peft,
        profile=args.profile,
        resume=args.resume,
        cache_frozen=args.cache_frozen,
        score_steps=args.score_steps,
        task=args.task,
        data_dir=args.data_dir,
        seed=args.seed,
        accumulate=args.accumulate,
        protocol=args.protocol,
        quantize=args.quantize,
    )
    print(markdown(run(config)))
    print(f"written to {args.output}/bench.md, bench.csv, bench.json, bench.png", file=sys.stderr)


def cmd_space(args: argparse.Namespace) -> None:
    space = load_space(args.space, args.model)
    dims = space.dimensions()
    if args.json:
        out = {
            "space": args.space,
            "model": args.model,
            "type": space.type,
            "size": space.size,
            "dimensions": [d.to_dict() for d in dims],
            "definition": space.to_dict(),
        }
        print(json.dumps(out, indent=2))
        return
    print(f"space: {args.space} ({space.type})" + (f"   model: {args.model}" if args.model else ""))
    width = max(len("dimension"), *(len(d.name) for d in dims))
    print(f"{'dimension':<{width}}  {'type':<11}  {'n':>4}  choices")
    for d in dims:
        labels = d.labels()
        shown = labels if len(labels) <= 12 else [*labels[:6], "...", *labels[-3:]]
        print(f"{d.name:<{width}}  {d.type:<11}  {len(labels):>4}  {' '.join(shown)}")
    print(f"size: {space.size:,} configurations (the product of the dimensions' choice counts)")


def _add_model_task(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_NAMES)
    p.add_argument("--task", required=True, help="a GLUE / SuperGLUE task, e.g. rte, sst2, superglue/cb")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with glue/ and superglue/ task files (default: $PEFTLAB_DATA_DIR, else the hub)",
    )
    p.add_argument("--max-length", type=int, default=128, help="truncate inputs to this many tokens")


def _add_quantize(p: argparse.ArgumentParser) -> None:
    """--quantize: checked by the command (one line for a bad value, as every peftlab error), not by argparse."""
    p.add_argument(
        "--quantize",
        metavar="{" + ",".join(QUANTIZE_CHOICES) + "}",
        help="quantize the base's block linears (QLoRA): nf4 (4-bit NormalFloat) or int8, through bitsandbytes; "
        "embeddings, norms and heads stay in full precision, and adapters cannot merge into it",
    )


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", help="a method preset (see `peftlab methods`)")
    p.add_argument("--spec", help="a spec JSON file instead of --method")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method argument, e.g. --set r=16 --set targets=all-linear (repeatable)",
    )


def _add_train_args(p: argparse.ArgumentParser, search: bool = False) -> None:
    """The budget and optimisation flags of `peftlab train` (also the trials' fidelity in `peftlab search`, where
    giving no budget flag means AutoPEFT's low fidelity, so --epochs has no default of its own)."""
    p.add_argument("--max-steps", type=int, help="budget in optimiser steps")
    if search:
        p.add_argument(
            "--epochs",
            type=float,
            help="the full run in epochs (default 3; with none of --max-steps, --fraction, --epochs, trials train "
            "--fraction 0.05 of --epochs 20, i.e. 1 epoch: AutoPEFT's low fidelity)",
        )
    else:
        p.add_argument("--epochs", type=float, default=3.0, help="the full run in epochs (default 3)")
    p.add_argument("--fraction", type=float, help="budget as a fraction of the full run (low-fidelity trials)")
    p.add_argument("--k", type=int, help="train on K examples drawn with --data-seed (low-resource setup)")
    p.add_argument("--dev-size", type=int, help="examples held out from train for model selection (default 1000)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument(
        "--group-by-length",
        action="store_true",
        help="batch examples of similar length together (less padding, faster on long-tailed tasks)",
    )
    p.add_argument("--lr", type=float, help="learning rate (default: the method's, from its paper)")
    p.add_argument("--eval-every", type=int, help="evaluate on the dev split every N steps (default: each epoch)")
    p.add_argument("--patience", type=int, help="stop after N evaluations without improvement")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="bf16/fp16 need a GPU")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--packing",
        action="store_true",
        help="generative decoders: pack each batch's examples end to end into rows of --max-length, each example "
        "attending only to itself (less padding; the same loss)",
    )
    p.add_argument("--dropout", type=float, help="override the backbone's dropout probability (e.g. 0)")
    p.add_argument(
        "--consistency",
        type=float,
        metavar="W",
        help="weight of AdaMix's consistency loss between two randomly routed passes (default: 1 for "
        "specs with AdaMix modules, else 0; 0 turns it off)",
    )
    p.add_argument(
        "--cache-frozen",
        action="store_true",
        help="compute the hidden states entering the lowest layer the spec touches once per example and reuse them "
        "(across steps, epochs and a search worker's trials), so steps run only the layers from there up; the "
        "layers below run in eval mode, i.e. WITHOUT their dropout (same results as uncached at --dropout 0). "
        "Encoder models (BERT, RoBERTa, MiniLM); specs that act below the first layer (prompt, embeddings, "
        "full, BitFit/LN of the embeddings) run uncached",
    )
    p.add_argument(
        "--cache-frozen-mb",
        type=float,
        default=512.0,
        metavar="MB",
        help="memory for those states (default 512); examples beyond it are computed each time they come",
    )
    p.add_argument(
        "--init-batches",
        type=int,
        default=8,
        metavar="N",
        help="EVA (--method eva): the training batches whose inputs' principal components start LoRA's A (default 8)",
    )
    p.add_argument(
        "--loraplus-ratio",
        type=float,
        nargs="?",
        const=16.0,
        metavar="RATIO",
        help="LoRA+: train LoRA's B matrices at RATIO times the learning rate (alone: the paper's 16)",
    )
    p.add_argument(
        "--optimizer",
        choices=["adamw", "galore"],
        default="adamw",
        help="galore: GaLore's AdamW (galore-torch), projecting the gradients of linear weights wider than "
        "--galore-rank to that rank; for full fine-tuning (adapter matrices are thinner and train as under AdamW)",
    )
    p.add_argument("--galore-rank", type=int, default=128, help="GaLore's projection rank (default 128)")
    p.add_argument("--galore-update-gap", type=int, default=200, help="GaLore: steps between projections (200)")
    p.add_argument("--galore-scale", type=float, default=0.25, help="GaLore's update scale (default 0.25)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("your own data (CSV, TSV or JSONL; --task then just names it)")
    g.add_argument("--train-file", help="training examples; dev is held out from them")
    g.add_argument("--test-file", help="test examples (default: the held-out dev split)")
    g.add_argument("--text-column", default="text")
    g.add_argument("--text-pair-column", help="second text of sentence-pair tasks")
    g.add_argument("--label-column", default="label")
    g.add_argument("--labels", help="label names in class order, e.g. neg,pos (default: integer labels)")
    g.add_argument("--prompt-column", help="a prompt → response file: the prompt column (default prompt)")
    g.add_argument("--response-column", help="... its response column, what the loss is on (default response)")
    g.add_argument(
        "--messages-column",
        help="a JSONL column of chat turns [{role, content}, ...] ending with the assistant's response, rendered "
        "with the model's chat template",
    )
    g.add_argument(
        "--eval-metric",
        choices=["exact", "rouge", "loss"],
        default="exact",
        help="how a prompt → response file's generations are scored (default exact match after normalisation)",
    )
    g = p.add_argument_group("generation tasks (gsm8k, gen/boolq, gen/cnn_dailymail, ... and prompt → response files)")
    g.add_argument(
        "--select-by",
        choices=["loss", "metric"],
        default="loss",
        help="choose the best evaluation by dev loss over response tokens (default; cheap) or by the generated "
        "metric (generates at every evaluation)",
    )
    g.add_argument(
        "--generate-every",
        type=int,
        default=0,
        metavar="N",
        help="with --select-by loss, also generate and score dev every N evaluations (default 0: the final model only)",
    )
    g.add_argument(
        "--no-final-dev-metrics",
        action="store_true",
        help="with --select-by loss, do not generate on dev with the final model either (its dev record is the loss)",
    )
    g.add_argument("--max-new-tokens", type=int, help="most tokens generated when scoring (default: the task's)")
    g.add_argument("--chat-template", action="store_true", help="render prompts with the model's chat template")


def _add_study_args(p: argparse.ArgumentParser, study: str, output: str) -> None:
    """Where a search or refinement keeps its study and runs, and how its trials are drawn and watched."""
    p.add_argument("--study", default=study, help=f"study name in the storage (default {study})")
    p.add_argument(
        "--storage",
        help="database URL shared by workers, e.g. postgresql://user@host/db (default: sqlite file OUTPUT/study.db)",
    )
    p.add_argument(
        "--output",
        help=f"folder for one study's trial runs and results (default ./{output}; ./{output}-STUDY for other studies)",
    )
    p.set_defaults(default_study=study, output_base=output)
    p.add_argument("--sampler-seed", type=int, default=0, help="seed of the points drawn")
    p.add_argument(
        "--heartbeat",
        type=int,
        default=10,
        help="seconds between a running trial's heartbeats; a trial silent 3x as long is retried",
    )


def _add_trial_training_args(p: argparse.ArgumentParser) -> None:
    """How a search's trials train beyond the training flags (the defaults: peftlab.search.study.SEARCH_TRAINING)."""
    p.add_argument(
        "--score-test",
        action="store_true",
        help="score every trial on the test split (default: only the Pareto set, after the trials)",
    )
    p.add_argument(
        "--no-stop-hopeless",
        dest="stop_hopeless",
        action="store_false",
        help="train every trial to its budget (default: stop one whose first dev evaluation shows it has not "
        "started to learn; see README, Search)",
    )
    p.set_defaults(**SEARCH_TRAINING)


def _add_methods_parser(sub: argparse._SubParsersAction) -> None:
    """`peftlab methods`: the presets."""
    p = sub.add_parser("methods", help="list the method presets, one line each")
    p.add_argument("--json", action="store_true", help="print a JSON object instead")
    p.set_defaults(fn=cmd_methods)


def _add_show_parser(sub: argparse._SubParsersAction) -> None:
    """`peftlab show`: a method's parameter counts on a model."""
    p = sub.add_parser("show", help="count trainable / stored / changed parameters of a method on a model")
    p.add_argument("--model", required=True, help=MODEL_NAMES)
    _add_spec_args(p)
    p.add_argument(
        "--head",
        choices=list(HEADS),
        help="model class (default: seq-cls for encoders, causal-lm for decoders, seq2seq for T5)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    p.add_argument("--show-spec", action="store_true", help="also print the spec")
    _add_quantize(p)
    p.set_defaults(fn=cmd_show)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    """`peftlab train`: one fine-tuning run."""
    p = sub.add_parser("train", help="fine-tune a method or spec on a task; saves the adapter and a JSON record")
    _add_model_task(p)
    _add_spec_args(p)
    p.add_argument("--output", required=True, help="folder for the adapter, record.json and checkpoints")
    p.add_argument(
        "--init-from",
        metavar="ADAPTER",
        help="start from a saved adapter's tensors (SPoT: --method prompt --init-from a prompt trained on another "
        "task); shapes must match, the task head is not copied",
    )
    _add_train_args(p)
    _add_quantize(p)
    p.add_argument(
        "--stop-hopeless",
        action="store_true",
        help="stop after the first dev evaluation if the run has not started to learn: dev score at the constant "
        "prediction's and training loss at the label prior's (status hopeless)",
    )
    p.set_defaults(fn=cmd_train, score_test=True)


def _add_search_parser(sub: argparse._SubParsersAction) -> None:
    """`peftlab search`: the multi-objective search."""
    p = sub.add_parser(
        "search",
        help="multi-objective search (dev score vs stored parameters) over a space; "
        "resumable, shareable by workers on several machines",
    )
    _add_model_task(p)
    p.add_argument("--space", default="autopeft", help="autopeft, s4 or a space file (default autopeft)")
    p.add_argument(
        "--sampler",
        help="random, tpe, nsga2, gp or autopeft (BoTorch SAAS-GP + qLogNEHVI; needs peftlab[bo]); default "
        "autopeft when BoTorch is installed, else tpe",
    )
    p.add_argument("--trials", type=int, default=20, help="finished trials the study should hold (default 20)")
    _add_study_args(p, "peftlab", "search")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument(
        "--budget", type=float, help="max stored parameters, %% of the backbone: costlier points are pruned untrained"
    )
    p.add_argument(
        "--objectives",
        default="score,stored",
        help="score,stored plus optionally latency (ms/example) or memory (CUDA peak)",
    )
    p.add_argument(
        "--ref-point",
        help="hypervolume reference point SCORE,STORED_PERCENT, for the report and the autopeft sampler (default: "
        "the constant prediction's dev score and the budget, else 1.1 x the space's costliest point)",
    )
    p.add_argument(
        "--cost-scale",
        choices=COST_SCALES,
        default="linear",
        help="cost axis of the hypervolume, the report's and the autopeft sampler's: log weighs every decade of "
        "stored %% the same, so the front's cheap end counts (default linear)",
    )
    p.add_argument("--startup-trials", type=int, default=8, help="random trials before model-based sampling")
    p.add_argument("--bo-batch", type=int, default=1, help="autopeft sampler: candidates chosen jointly")
    p.add_argument(
        "--nuts-warmup", type=int, default=NUTS_DEFAULTS["warmup_steps"], help="autopeft sampler: NUTS warm-up steps"
    )
    p.add_argument(
        "--nuts-samples",
        type=int,
        default=NUTS_DEFAULTS["num_samples"],
        help="autopeft sampler: NUTS samples per GP fit",
    )
    p.add_argument(
        "--nuts-thinning",
        type=int,
        default=NUTS_DEFAULTS["thinning"],
        help="autopeft sampler: keep every N-th NUTS sample (samples / thinning GP samples; the paper: 512, 256, 16)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    _add_train_args(p, search=True)
    _add_trial_training_args(p)
    _add_quantize(p)
    p.set_defaults(fn=cmd_search)


def _add_refine_parser(sub: argparse._SubParsersAction) -> None:
    """`peftlab refine`: S4's progressive refinement."""
    p = sub.add_parser(
        "refine",
        help="S4 progressive greedy refinement of a design space (one stage per "
        "dimension, candidates compared on low-fidelity runs)",
    )
    _add_model_task(p)
    p.add_argument("--space", default="s4", help="s4 or an S4 space file (type s4); default s4")
    p.add_argument("--samples", type=int, default=2, help="points trained per candidate (default 2)")
    p.add_argument("--stages", help="comma-separated stages to run, in order (default: all; see `peftlab space`)")
    _add_study_args(p, "refine", "refine")
    _add_train_args(p)
    _add_trial_training_args(p)
    _add_quantize(p)
    p.set_defaults(fn=cmd_refine)


def _add_pareto_parser(sub: argparse._SubParsersAction) -> None:
    """`peftlab pareto`: a search's results."""
    p = sub.add_parser("pareto", help="a search's results: show, export, plot, spec of a trial, retrain")
    p.add_argument("action", choices=["show", "export", "plot", "spec", "retrain"])
    p.add_argument("--storage", required=True, help="database URL or SQLite file of the study")
    p.add_argument(
        "--study",
        action="append",
        required=True,
        help="study name (repeat to compare studies, e.g. one per sampler, in show/export/plot)",
    )
    p.add_argument("--output", help="folder (export, plot, retrain) or spec file (spec)")
    p.add_argument("--trial", type=int, nargs="*", help="trial number(s) (spec: one; retrain: default the front)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="retrain: training seeds")
    p.add_argument("--max-steps", type=int, help="retrain budget in steps (default: the search's)")
    p.add_argument("--epochs", type=float, help="retrain: the full run in epochs")
    p.add_argument("--fraction", type=float, help="retrain: budget as a fraction of the full run")
    p.add_argument("--json", action="store_true", help="show: print JSON")
    p.add_argument("--no-plots", action="store_true", help="export: skip the PNG plots")
    p.set_defaults(fn=cmd_pareto)


def _add_dashboard_parser(sub: argparse._SubParsersAction) -> None:
    """`peftlab dashboard`: optuna-dashboard on a storage."""
    p = sub.add_parser("dashboard", help="serve a study storage in optuna-dashboard (needs peftlab[dashboard])")
    p.add_argument("--storage", required=True, help="database URL or SQLite file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(fn=cmd_dashboard)


def _add_space_parser(sub: argparse._SubParsersAction) -> None:
    """`peftlab space`: a search space's dimensions."""
    p = sub.add_parser("space", help="show a search space: its dimensions and its size")
    p.add_argument(
        "--space",
        default="autopeft",
        help="a built-in space (autopeft, s4) or a space file (JSON; YAML with PyYAML); default autopeft",
    )
    p.add_argument(
        "--model",
        help=f"{MODEL_NAMES} (the built-in spaces need it; a file may give num_layers instead)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON object (size, dimensions, definition)")
    p.set_defaults(fn=cmd_space)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """`peftlab eval`: a saved adapter on a test split."""
    p = sub.add_parser("eval", help="evaluate a saved adapter on a task's test split (the official dev set)")
    _add_model_task(p)
    p.add_argument("--adapter", required=True, help="a folder written by `peftlab train` (its adapter/ folder)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, help="generation tasks: most tokens generated (default: the task's)")
    p.add_argument("--chat-template", action="store_true", help="generation tasks: prompts through the chat template")
    _add_quantize(p)
    p.set_defaults(fn=cmd_eval)


def _add_generate_parser(sub: argparse._SubParsersAction) -> None:
    """`peftlab generate`: text from a model and a saved adapter."""
    p = sub.add_parser("generate", help="generate text from a model, optionally with a saved adapter")
    p.add_argument("--model", required=True, help=MODEL_NAMES)
    p.add_argument("--adapter", help="an adapter folder (peftlab's or peft's format)")
    p.add_argument("--merge", action="store_true", help="merge the adapter's mergeable modules into the weights first")
    p.add_argument("--prompt", help="one prompt; the generated text is printed")
    p.add_argument("--input-file", help="prompts, one per row (CSV, TSV or JSONL); JSON lines are written")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--messages-column", help="(JSONL) a column of chat turns to continue, via the chat template")
    p.add_argument("--chat-template", action="store_true", help="render each prompt with the model's chat template")
    p.add_argument("--output", help="write the JSON lines to this new file (default: standard output)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-length", type=int, default=2048, help="prompts are cut from the left to fit this")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    _add_quantize(p)
    p.set_defaults(fn=cmd_generate)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """`peftlab bench`: efficiency measurements."""
    p = sub.add_parser(
        "bench",
        help="parameters, peak memory and train / inference throughput of methods, each measured in a fresh process",
    )
    p.add_argument("--model", required=True, help=MODEL_NAMES)
    p.add_argument(
        "--methods",
        help="comma-separated presets, each NAME[:KEY=VALUE[:KEY=VALUE...]] with the settings of "
        "`peftlab train --set`, e.g. lora,lora:r=16:targets=all-linear,houlsby:size=64; each row is labelled as given",
    )
    p.add_argument(
        "--methods-file",
        help='a JSON list of {"label": ..., "spec": {...}} or {"method": NAME, "settings": {...}} '
        "(rows after --methods)",
    )
    p.add_argument(
        "--no-full",
        action="store_true",
        help="leave out the full fine-tuning row (added otherwise; the frozen floor is always measured)",
    )
    p.add_argument("--output", required=True, help="folder for bench.md, bench.csv, bench.json and bench.png")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch")
    p.add_argument("--seq", type=int, default=128, help="padded length; rows get random lengths up to it")
    p.add_argument(
        "--response",
        type=int,
        metavar="N",
        help="generative batches: N response tokens after each prompt of up to --seq, the loss on them only (decoders "
        "as language models, T5 with N-token targets); default: a task head's batch",
    )
    p.add_argument("--accumulate", type=int, default=1, metavar="N", help="microbatches of --batch per optimiser step")
    p.add_argument(
        "--protocol",
        choices=["survey"],
        help="survey: the survey's Table 5 setting on T5 (real SuperGLUE batches of 32 from --task, default gen/rte, "
        "in Table 3's microbatches with accumulation, inputs up to 512 tokens, targets up to 8; its 14 methods unless "
        "--methods), and the table beside the survey's numbers",
    )
    p.add_argument("--repeats", type=int, default=10, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations before them")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every measurement this many times, each in a fresh process, reversing the order "
        "every other round (peftlab and peft alternate going first)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (1: robust on a shared machine, see benchmarks/README.md)",
    )
    p.add_argument(
        "--compare-peft",
        action="store_true",
        help="also measure the peft library's equivalents (LoRA, DoRA, (IA)3, prefix, prompt, LN)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile each training measurement's forward + backward: operator time by category (matmul, "
        "attention, norm, dropout, elementwise, copy, framework), a table beside the cost model's",
    )
    p.add_argument(
        "--cache-frozen",
        action="store_true",
        help="beside each row whose modules leave the lowest layers alone, a row trained from the frozen-prefix "
        "cache (encoder models): the only way under the floor besides side networks",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="take the measurements an earlier run of the same command left in OUTPUT/jobs/ (a killed run, or one "
        "split across sittings) and measure only the rest",
    )
    p.add_argument(
        "--score-steps",
        type=int,
        help="also train each method this many steps on --task (batch --batch, length --seq) and report its test score",
    )
    p.add_argument("--task", help="the task of --score-steps (e.g. sst2) or of --protocol survey")
    p.add_argument("--data-dir", default=None, help="task data folder (default: $PEFTLAB_DATA_DIR, else the hub)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast (weights stay fp32)")
    p.add_argument("--seed", type=int, default=0)
    _add_quantize(p)
    p.set_defaults(fn=cmd_bench)


def cmd_version(args: argparse.Namespace) -> None:
    versions = library_versions()
    if args.json:
        print(json.dumps(versions, indent=2))
    else:
        print("\n".join(f"{name} {version}" for name, version in versions.items()))


def _add_version_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("version", help="the versions of peftlab and the libraries it runs on (for bug reports)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_version)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning lab.")
    parser.add_argument("--version", action="version", version=f"peftlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_version_parser(sub)
    _add_methods_parser(sub)
    _add_show_parser(sub)
    _add_train_parser(sub)
    _add_search_parser(sub)
    _add_refine_parser(sub)
    _add_pareto_parser(sub)
    _add_dashboard_parser(sub)
    _add_space_parser(sub)
    _add_eval_parser(sub)
    _add_generate_parser(sub)
    _add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.environ.get("TRANSFORMERS_VERBOSITY"):
        hf_logging.set_verbosity_error()  # library chatter would bury the answer
    try:
        args.fn(args)
    except PeftlabError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; {_kept(args)}", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
    return 0


def _one_line(message: str) -> str:
    """The message on one line: characters that would break it or not show (newlines, control characters from a
    user's file) are written as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in message)


def _kept(args: argparse.Namespace) -> str:
    """What an interrupted command leaves, and how to go on."""
    if args.fn is cmd_train:
        return f"the checkpoint of its last evaluation in '{args.output}' is kept: the same command resumes from it"
    if args.fn in (cmd_search, cmd_refine):
        return "finished trials are kept in the study: the same command resumes it (the interrupted trial is run again)"
    return "nothing was changed"


if __name__ == "__main__":
    sys.exit(main())
