"""What a suggestion of the AutoPEFT sampler costs, against what a trial costs, and what lighter NUTS settings cost in
the quality of its GP, on the real trials of the MiniLM searches (``benchmarks/results/search_minilm``).

Observations (the committed exports of the SST-2 studies; their SQLite files are not committed): n = 10 (the first 10
trials of ``sst2-autopeft``), 20 (all of it) and 40 (``sst2-autopeft`` and ``sst2-random`` pooled as observations of
one space; their first 6 trials are the same points with the same results, so 34 distinct points). Each suggestion
is one ``study.ask()`` on a fresh in-memory study holding those trials, with the searches' reference point (dev
accuracy 0.5, stored 17.18%) and the exact stored-% cost, as ``peftlab search`` runs it; the sampler's seed is the
repetition's number, the same for every setting.

1. **Timing.** Fit (NUTS) and acquisition (qLogNEHVI maximised by local search; the exact cost of its candidates
   timed apart) separately, per NUTS setting and n, repetitions interleaved (rep -> n -> setting -> fit path).
   ``compiled`` fits: peftlab's NUTS program (one per padded size and setting) is compiled by the first fit at that
   size in a process, reported apart; BoTorch's ``fit_fully_bayesian_model_nuts`` (the fit before this change,
   "botorch", timed at the old default setting) compiles on every fit. JAX's compile time
   inside each fit is summed from ``jax.monitoring`` (tracing, lowering, XLA compilation). The first suggestion of a
   fresh process (import, JAX start-up, compile) is measured in subprocesses, with and without a persistent JAX
   compilation cache that a previous process filled.
2. **Quality.** For the score objective alone: k-fold cross-validation (``--folds``) over the distinct points of
   sst2-autopeft (20), sst2-random (20) and both (34): Spearman correlation of the GP's posterior mean with the
   held-out dev scores (pooled over folds) and mean log predictive density (the mixture over GP samples, with the
   observation noise), per NUTS seed. Then agreement of the suggestions: each suggestion's point scored by the
   reference setting's (the paper's, 512/256/16) acquisition of every repetition, as a ratio of EHVI to the EHVI of
   that reference's own suggestion (1 = as good a point as the reference found; the reference against its own other
   seeds gives its seed-to-seed spread).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
        python benchmarks/bo_cost.py --botorch-seeds 2   # about 12 minutes on one busy core
    python benchmarks/bo_cost.py --report   # the tables again from benchmarks/results/bo_cost.json

Writes ``benchmarks/results/bo_cost.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jax
import jax.monitoring
import numpy as np
import optuna
import torch
from botorch.fit import fit_fully_bayesian_model_nuts
from botorch.models.fully_bayesian import SaasFullyBayesianSingleTaskGP
from botorch.models.transforms.outcome import Standardize
from scipy.stats import spearmanr

from peftlab.search import bo, params
from peftlab.search.study import CostModel
from peftlab.space import load_space

HERE = Path(__file__).resolve().parent
EXPORTS = HERE / "results" / "search_minilm" / "sst2" / "exports"
OUT = HERE / "results" / "bo_cost"
#: the environment variables that set threads, recorded with the command
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS")
#: NUTS settings (warm-up, samples, thinning); the first is the reference
SETTINGS = {
    "paper 512/256/16": (512, 256, 16),
    "old default 256/128/16": (256, 128, 16),
    "128/64/8": (128, 64, 8),
    "64/32/4": (64, 32, 4),
}
REFERENCE = "paper 512/256/16"
#: the setting also timed and cross-validated with BoTorch's own fit (the sampler before this change)
BOTORCH = "old default 256/128/16"
REF_POINT = (0.5, 17.18)
TRIAL_S = 35.0  # a trial at the new benchmark protocol

optuna.logging.set_verbosity(optuna.logging.ERROR)
_compile: dict[str, float] = collections.defaultdict(float)


def _on_event(name: str, secs: float, **_: Any) -> None:
    if "/jax/core/compile/" in name:  # tracing, lowering and XLA compilation
        _compile["s"] += secs


jax.monitoring.register_event_duration_secs_listener(_on_event)


# -- data -------------------------------------------------------------------------------------------------------
def trials(study: str) -> list[dict[str, Any]]:
    return json.loads((EXPORTS / study / "trials.json").read_text())


def observations(space, n: int) -> list[tuple[list[int], tuple[float, float], float]]:
    """(point, (dev score, stored %), wall seconds) of the first n trials of the pooled studies."""
    rows = trials("sst2-autopeft") + trials("sst2-random")
    out = []
    for r in rows[:n]:
        v = params.to_vector(space, {k[len("param_") :]: x for k, x in r.items() if k.startswith("param_")})
        out.append((v, (r["score"], r["stored_percent"]), r["wall_time_s"]))
    return out


class Cost:
    """The exact stored-% cost the search gives the sampler, timed; ``memo``: remembered across suggestions (a fresh
    sampler per suggestion would otherwise pay again for points a running search's sampler already knows)."""

    def __init__(self, space, memo: bool) -> None:
        self.space, self.model = space, CostModel("minilm")
        self.memo: dict[tuple[int, ...], float] | None = {} if memo else None
        self.seconds = 0.0

    def __call__(self, v: list[int]) -> float:
        t0 = time.perf_counter()
        key = tuple(v)
        if self.memo is not None and key in self.memo:
            c = self.memo[key]
        else:
            c = self.model.stored(self.space.decode(v))
            if self.memo is not None:
                self.memo[key] = c
        self.seconds += time.perf_counter() - t0
        return c


def distinct(obs):
    seen, out = set(), []
    for o in obs:
        if tuple(o[0]) not in seen:
            seen.add(tuple(o[0]))
            out.append(o)
    return out


# -- samplers ---------------------------------------------------------------------------------------------------
class Recording(bo.AutoPEFTSampler):
    """The sampler, keeping its last model (for the agreement check); ``botorch=True`` fits with BoTorch's own NUTS
    (the code before this change: compiled anew every fit)."""

    def __init__(self, *, botorch: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.botorch = botorch
        self.model = None

    def _model(self, X, Y, signs, n):
        self.model = super()._model(X, Y, signs, n)
        return self.model

    def _fit_gp(self, gp, seed):
        if not self.botorch:
            return super()._fit_gp(gp, seed)
        fit_fully_bayesian_model_nuts(
            gp,
            max_tree_depth=self.max_tree_depth,
            warmup_steps=self.warmup_steps,
            num_samples=self.num_samples,
            thinning=self.thinning,
            disable_progbar=True,
            seed=seed,
        )
        return {"compiled": True}


def suggest(space, cost, obs, setting: tuple[int, int, int], seed: int, botorch: bool = False) -> dict[str, Any]:
    """One suggestion on a fresh study holding ``obs``: its times, point and sampler."""
    w, s, t = setting
    sampler = Recording(
        space=space,
        cost=cost,
        n_startup_trials=1,
        seed=seed,
        ref_point=REF_POINT,
        warmup_steps=w,
        num_samples=s,
        thinning=t,
        botorch=botorch,
    )
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    dists = params.distributions(space)
    for v, values, _ in obs:
        point = params.to_params(space, v)
        study.add_trial(optuna.trial.create_trial(params=point, distributions=dists, values=values))
    _compile.clear()
    cost.seconds = 0.0
    t0 = time.perf_counter()
    trial = study.ask(dists)  # suggests every dimension, as a trial of the search does
    total = time.perf_counter() - t0
    step = sampler.last_step
    assert step.get("observations") == len(obs), "the sampler did not run a BO step"
    return {
        "fit_s": step["fit_s"],
        "acquisition_s": step["acquisition_s"],
        "cost_s": cost.seconds,
        "suggest_s": total,
        "compile_s": _compile["s"],
        "compiled": any(f.get("compiled") for f in step["nuts"]),
        "evaluated": step["evaluated"],
        "point": list(step["chosen"][0]),
        "bo_step": trial.user_attrs.get("bo_step"),
        "sampler": sampler,
    }


# -- phase 1: timing ----------------------------------------------------------------------------------------------
def first_in_process(which: str) -> dict[str, float]:
    """In this (fresh) process: import time, then one suggestion at n = 20 with the old default settings."""
    t0 = time.perf_counter()
    space = load_space("autopeft", "minilm")
    cost = Cost(space, memo=False)
    setup = time.perf_counter() - t0
    obs = observations(space, 20)
    r = suggest(space, cost, obs, (256, 128, 16), 0, botorch=which == "botorch")
    return {k: r[k] for k in ("fit_s", "acquisition_s", "cost_s", "suggest_s", "compile_s")} | {"setup_s": setup}


def run_first(which: str, cache: str | None = None) -> dict[str, float]:
    env = dict(os.environ)
    if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = cache
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--first", which], env=env, capture_output=True, text=True, check=True
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    r["process_s"] = time.perf_counter() - t0
    return r


def timing(space, cost, ns, reps, log) -> tuple[list[dict], dict]:
    rows, samplers = [], {}
    # one compiling fit per (setting, n) before the timed repetitions (rep -1), then reps interleaved
    for rep in range(-1, reps):
        for n in ns:
            obs = observations(space, n)
            for name, setting in SETTINGS.items():
                paths = ["peftlab"] + (["botorch"] if name == BOTORCH and rep >= 0 else [])
                for path in paths:
                    r = suggest(space, cost, obs, setting, max(rep, 0), botorch=path == "botorch")
                    sampler = r.pop("sampler")
                    if path == "peftlab" and rep >= 0:
                        samplers[(n, name, rep)] = sampler
                    rows.append({"rep": rep, "n": n, "setting": name, "path": path} | r)
                    log(
                        f"rep {rep} n={n} {name} {path}: fit {r['fit_s']:.2f} s (compile {r['compile_s']:.2f} s) "
                        f"acquisition {r['acquisition_s']:.2f} s ({r['evaluated']} values, cost model "
                        f"{r['cost_s']:.2f} s) compiled={r['compiled']}"
                    )
    return rows, samplers


# -- phase 2: quality ---------------------------------------------------------------------------------------------
def cv_quality(space, obs, setting, seed: int, folds: int, botorch: bool = False) -> dict[str, float]:
    """k-fold Spearman and mean log predictive density of the score GP."""
    mean, lpd, ys = cv_predictions(space, obs, setting, seed, folds, botorch)
    return {"spearman": float(spearmanr(mean, ys).statistic), "mlpd": float(lpd.mean())}


def cv_predictions(
    space, obs, setting, seed: int, folds: int, botorch: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-fold held-out predictions of the score GP (NUTS ``setting`` = warmup, samples, thinning): each point's
    posterior mean and log predictive density from the fit without its fold, and the observed scores."""
    enc = bo.Encoder(space)
    X = enc.encode([v for v, _, _ in obs])
    y = torch.tensor([[vals[0]] for _, vals, _ in obs], dtype=torch.double)
    order = np.random.default_rng(0).permutation(len(obs))
    mean, lpd = np.zeros(len(obs)), np.zeros(len(obs))
    w, s, t = setting
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        gp = SaasFullyBayesianSingleTaskGP(X[train], y[train], outcome_transform=Standardize(m=1))
        if botorch:
            fit_fully_bayesian_model_nuts(
                gp, warmup_steps=w, num_samples=s, thinning=t, disable_progbar=True, seed=seed + 1000 * k
            )
        else:
            bo.fit_saas_nuts(gp, warmup_steps=w, num_samples=s, thinning=t, seed=seed + 1000 * k)
        with torch.no_grad():
            post = gp.posterior(X[test], observation_noise=True)
            mu = post.mean.squeeze(-1)  # GP samples x test
            var = post.variance.squeeze(-1)
        yt = y[test, 0]
        mean[test] = mu.mean(0).numpy()
        dens = -0.5 * (torch.log(2 * math.pi * var) + (yt - mu) ** 2 / var)  # samples x test
        lpd[test] = (torch.logsumexp(dens, 0) - math.log(mu.shape[0])).numpy()
    return mean, lpd, y[:, 0].numpy()


def agreement(space, samplers, ns, reps) -> list[dict]:
    """Each suggestion's point under every reference acquisition, as EHVI relative to that reference's own point."""
    rows = []
    for n in ns:
        obs = observations(space, n)
        X = bo.Encoder(space).encode([v for v, _, _ in obs])
        ref = torch.tensor([REF_POINT[0], -REF_POINT[1]], dtype=torch.double)
        for r in range(reps):
            rs = samplers[(n, REFERENCE, r)]
            acqf = rs.acquisition(rs.model, X, ref, None, seed=12345)

            def value(point, acqf=acqf, rs=rs):
                with torch.no_grad():
                    return float(acqf(rs.encoder.encode([point]).unsqueeze(-2)).reshape(-1)[0])

            own = value(rs.last_step["chosen"][0])
            for name in SETTINGS:
                for k in range(reps):
                    if name == REFERENCE and k == r:
                        continue
                    point = samplers[(n, name, k)].last_step["chosen"][0]
                    gap = value(point) - own
                    rows.append({"n": n, "setting": name, "ref_rep": r, "rep": k, "log_ratio": gap})
    return rows


# -- report -------------------------------------------------------------------------------------------------------
def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    if not xs:
        return "-"
    return f"{fmt.format(_med(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def report(data: dict[str, Any]) -> str:
    ns = data["ns"]
    rows = data["timing"]
    lines = [
        "# AutoPEFT sampler: suggestion cost and NUTS settings",
        "",
        f"- command: `{data['command']}`",
        f"- date: {data['date']}; {data['machine']}",
        f"- versions: {data['versions']}",
        "- data: the real MiniLM SST-2 search trials (`benchmarks/results/search_minilm/sst2/exports`): n = 10, 20 "
        "(sst2-autopeft) and 40 (with sst2-random; 34 distinct points); the AutoPEFT space of MiniLM (6 layer bits, "
        "3 sizes: 9 GP inputs); the exact stored-% cost, so one SAAS-GP (the dev score) per suggestion",
        f"- load: {data['load']}",
        "",
        "## 1. Suggestion time (seconds)",
        "",
        "Median (min–max) over the repetitions (seeds 0..r-1). *peftlab*: the NUTS program compiled once per padded "
        "size (16, 24, 32, 48, ...) and setting; the `compiled` rows are the first fit at that size in the process. "
        "*botorch fit*: `fit_fully_bayesian_model_nuts` as before this change, which compiles on every fit. "
        "JAX compile: the part of the fit that JAX spent tracing, lowering and compiling. Cost model: the exact "
        "stored-% counts of the candidate points (milliseconds per new point, built on the meta device), remembered "
        "across this benchmark's suggestions as a running search's sampler remembers them (the fresh-process rows "
        "below pay for every point).",
        "",
        "| n | NUTS setting | fit | of which JAX compile | acquisition | of which cost model | suggestion "
        "| ÷ 35 s trial |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in ns:
        for name in SETTINGS:
            for path, label, keep in (
                ("peftlab", "", lambda r: r["rep"] >= 0),
                ("peftlab", " (compiled)", lambda r: r["rep"] < 0),
                ("botorch", " (botorch fit)", lambda r: r["rep"] >= 0),
            ):
                sel = [r for r in rows if r["n"] == n and r["setting"] == name and r["path"] == path and keep(r)]
                if not sel:
                    continue
                sug = [r["suggest_s"] for r in sel]
                lines.append(
                    f"| {n} | {name}{label} | {_spread([r['fit_s'] for r in sel])} | "
                    f"{_spread([r['compile_s'] for r in sel])} | {_spread([r['acquisition_s'] for r in sel])} | "
                    f"{_spread([r['cost_s'] for r in sel])} | {_spread(sug)} | {_med(sug) / TRIAL_S:.3f} |"
                )
    first = data["first"]
    lines += [
        "",
        "First suggestion in a fresh process (n = 20, 256/128/16; `setup`: loading the space and the cost model, "
        "after Python's imports; `process`: the whole subprocess, imports included):",
        "",
        "| fit path | setup | fit | of which JAX compile | acquisition | of which cost model | suggestion | process |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in first.items():
        lines.append(
            f"| {label} | {r['setup_s']:.1f} | {r['fit_s']:.1f} | {r['compile_s']:.1f} | {r['acquisition_s']:.1f} | "
            f"{r['cost_s']:.1f} | {r['suggest_s']:.1f} | {r['process_s']:.1f} |"
        )
    trial_s = data["trial_s"]
    lines += [
        "",
        f"Trial times of the committed studies (80 steps, load average 4–6): sst2-autopeft median "
        f"{trial_s['sst2-autopeft']:.0f} s, sst2-random {trial_s['sst2-random']:.0f} s; the ratio above uses 35 s, "
        "a trial at the new benchmark protocol.",
        "",
        "## 2. Quality per NUTS setting",
        "",
        f"Score GP, {data['folds']}-fold cross-validation over the distinct points; median (min–max) over NUTS seeds "
        f"{data['quality_seeds']}. A setting is within the reference when its median lies inside the reference's "
        "own seed range.",
        "",
        "| data (points) | NUTS setting | Spearman (held-out) | mean log predictive density |",
        "|---|---|---:|---:|",
    ]
    for ds in data["quality_sets"]:
        for name in [*SETTINGS, f"{BOTORCH} (botorch fit)"]:
            sel = [q for q in data["quality"] if q["data"] == ds and q["setting"] == name]
            if sel:
                lines.append(
                    f"| {ds} | {name} | {_spread([q['spearman'] for q in sel], '{:.3f}')} | "
                    f"{_spread([q['mlpd'] for q in sel], '{:.3f}')} |"
                )
    lines += [
        "",
        "Agreement of the suggestions with the reference's: EHVI of a setting's suggested point under the reference's "
        "acquisition (each repetition's fit) ÷ EHVI of the reference's own suggestion; median (min–max) over "
        "reference fits × the setting's repetitions (the reference row pairs each reference fit with its other "
        "seeds: its own spread). Same point: how often the suggestion equals that reference's.",
        "",
        "| n | NUTS setting | EHVI ratio | same point |",
        "|---:|---|---:|---:|",
    ]
    for n in ns:
        for name in SETTINGS:
            sel = [a for a in data["agreement"] if a["n"] == n and a["setting"] == name]
            ratios = [math.exp(a["log_ratio"]) for a in sel]
            same = sum(abs(a["log_ratio"]) < 1e-12 for a in sel)
            lines.append(f"| {n} | {name} | {_spread(ratios)} | {same}/{len(sel)} |")
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ns", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (seeds) per setting and n")
    p.add_argument("--quality-seeds", type=int, default=4, help="NUTS seeds per setting in the cross-validation")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--botorch-seeds", type=int, default=3, help="seeds of the BoTorch-fit cross-validation (slow)")
    p.add_argument("--output", default=str(OUT))
    p.add_argument("--skip-first", action="store_true", help="no fresh-process suggestions (a quick check)")
    p.add_argument("--report", action="store_true", help="only write the Markdown tables from the JSON results")
    p.add_argument("--first", choices=["peftlab", "botorch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.first:
        print(json.dumps(first_in_process(args.first)))
        return
    out = Path(args.output)
    if args.report:
        out.with_suffix(".md").write_text(report(json.loads(out.with_suffix(".json").read_text())))
        return
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    data: dict[str, Any] = {
        "command": " ".join(
            [f"{k}={shlex.quote(os.environ[k])}" for k in THREAD_VARS if k in os.environ]
            + [shlex.join(["python", "benchmarks/bo_cost.py", *sys.argv[1:]])]
        ),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
        f"1 thread (OMP/MKL/XLA), python {platform.python_version()}",
        "versions": ", ".join(
            f"{m} {__import__(m).__version__}" for m in ("botorch", "jax", "numpyro", "torch", "optuna")
        ),
        "ns": args.ns,
        "folds": args.folds,
        "quality_seeds": list(range(args.quality_seeds)),
        "trial_s": {s: _med([r["wall_time_s"] for r in trials(s)]) for s in ("sst2-autopeft", "sst2-random")},
    }
    load = [os.getloadavg()[0]]
    # first suggestion in fresh processes: BoTorch's fit, peftlab's, and peftlab's with a filled compilation cache
    data["first"] = {}
    if not args.skip_first:
        with tempfile.TemporaryDirectory() as cache:  # JAX's persistent compilation cache: empty, then filled
            data["first"] = {"botorch": run_first("botorch"), "peftlab": run_first("peftlab", cache)}
            data["first"]["peftlab, JAX cache filled"] = run_first("peftlab", cache)
        log(f"first suggestions: {data['first']}")
    load.append(os.getloadavg()[0])

    space = load_space("autopeft", "minilm")
    cost = Cost(space, memo=True)
    data["timing"], samplers = timing(space, cost, args.ns, args.reps, log)
    load.append(os.getloadavg()[0])
    data["agreement"] = agreement(space, samplers, args.ns, args.reps)
    log("agreement done")

    sets = {
        "sst2-autopeft (20)": distinct(observations(space, 20)),
        "sst2-random (20)": distinct(observations(space, 40)[20:]),
        "both (34)": distinct(observations(space, 40)),
    }
    data["quality_sets"] = list(sets)
    data["quality"] = []
    for seed in range(args.quality_seeds):  # seeds outermost: interleaved like the timing
        for ds, obs in sets.items():
            for name, setting in SETTINGS.items():
                q = cv_quality(space, obs, setting, seed, args.folds)
                data["quality"].append({"data": ds, "setting": name, "seed": seed} | q)
            if ds == "both (34)" and seed < args.botorch_seeds:  # BoTorch's own fit: is the compiled one the same?
                q = cv_quality(space, obs, SETTINGS[BOTORCH], seed, args.folds, botorch=True)
                data["quality"].append({"data": ds, "setting": f"{BOTORCH} (botorch fit)", "seed": seed} | q)
            log(f"quality seed {seed} {ds} done")
        load.append(os.getloadavg()[0])
    data["load"] = "1-minute load average during the run " + ", ".join(f"{x:.1f}" for x in load)
    data["seconds"] = time.perf_counter() - t_start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(report(data))
    log(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
