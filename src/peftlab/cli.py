"""The ``peftlab`` command line: ``methods`` and ``show`` (more commands join as they land).

User mistakes end with one ``error:`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from collections.abc import Sequence

from peftlab import methods
from peftlab.errors import PeftlabError
from peftlab.spec import Spec


def _kwargs(pairs: Sequence[str]) -> dict:
    """``--set r=16 --set targets=qkv`` -> {"r": 16, "targets": "qkv"} (Python literals, else strings)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PeftlabError(f"--set expects KEY=VALUE, got '{pair}'")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def spec_from_args(args: argparse.Namespace) -> Spec:
    """The spec named by ``--method`` (with ``--set`` arguments) or read from ``--spec``."""
    if args.spec and args.method:
        raise PeftlabError("give either --method or --spec, not both")
    if args.spec:
        return Spec.load(args.spec)
    if not args.method:
        raise PeftlabError(f"give --method NAME (one of: {', '.join(methods.METHODS)}) or --spec FILE")
    return methods.get(args.method, **_kwargs(args.set))


def cmd_methods(args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps({m.name: {"summary": m.summary, "paper": m.paper} for m in methods.METHODS.values()},
                         indent=2))
        return
    width = max(len(n) for n in methods.METHODS)
    for m in methods.METHODS.values():
        paper = f" ({m.paper})" if m.paper else ""
        print(f"{m.name:<{width}}  {m.summary}{paper}")


def cmd_show(args: argparse.Namespace) -> None:
    from peftlab.peft_model import apply
    from peftlab.zoo import load_model

    spec = spec_from_args(args)
    model = load_model(args.model, head=args.head, meta=True)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning lab.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the method presets, one line each")
    p.add_argument("--json", action="store_true", help="print a JSON object instead")
    p.set_defaults(fn=cmd_methods)

    p = sub.add_parser("show", help="count trainable / stored / changed parameters of a method on a model")
    p.add_argument("--model", required=True, help="shape:<name>, minilm, smollm2-135m, a local folder or hub id")
    p.add_argument("--method", help="a method preset (see `peftlab methods`)")
    p.add_argument("--spec", help="a spec JSON file instead of --method")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method argument, e.g. --set r=16 --set targets=all-linear (repeatable)")
    p.add_argument("--head", choices=["seq-cls", "causal-lm", "seq2seq", "base"],
                   help="model class (default: seq-cls for encoders, causal-lm for decoders, seq2seq for T5)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    p.add_argument("--show-spec", action="store_true", help="also print the spec")
    p.set_defaults(fn=cmd_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.environ.get("TRANSFORMERS_VERBOSITY"):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # library chatter would bury the answer
    try:
        args.fn(args)
    except PeftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
