"""Head-to-head efficiency of PEFT methods, as in the survey's Table 5 (Lialin et al., section 11.3).

For each method: trainable / stored / changed parameters (counted on the meta device), peak memory while
training, training and inference throughput in non-padding input tokens per second (inference unmerged
and, where the method has mergeable modules, merged), and the training step's time over the forward time
of the same batch. Optionally the peft library's equivalent of each method is measured in the same run,
and a short training run gives each method a test score.

Every measurement runs in a fresh process (``python -m peftlab.bench --worker JOB``, one JSON line back)
so that its peak memory is its own: on the CPU the process's peak resident set (``ru_maxrss``), reported
with the resident set of the loaded model it started from; on CUDA ``torch.cuda.max_memory_allocated``.
Warm-up iterations are not timed; every statistic is the median with its interquartile range.

Every run measures the frozen floor first (every weight frozen, gradients to the embedding output) and, unless left
out, full fine-tuning; rows are ``--methods`` items ``NAME[:KEY=VALUE...]`` or methods-file items, labelled as given
(:mod:`peftlab.bench.entries`), and each gets its step over the floor's beside the cost model's prediction of it
from counted FLOPs (:mod:`peftlab.bench.flops`).
"""

from peftlab.bench.batch import count_tokens, padded_batch
from peftlab.bench.entries import FLOOR, FULL, Entry, parse_methods, read_methods_file
from peftlab.bench.flops import StepFlops, predict, predict_floor
from peftlab.bench.harness import BenchConfig, MethodPlan, plan, run
from peftlab.bench.report import cpu_model, environment, markdown, ratios, rows, summarize, write_csv, write_outputs
from peftlab.bench.worker import KINDS, Job, measure, run_worker, worker_main

__all__ = [
    "FLOOR",
    "FULL",
    "KINDS",
    "BenchConfig",
    "Entry",
    "Job",
    "MethodPlan",
    "StepFlops",
    "count_tokens",
    "cpu_model",
    "environment",
    "markdown",
    "measure",
    "padded_batch",
    "parse_methods",
    "plan",
    "predict",
    "predict_floor",
    "ratios",
    "read_methods_file",
    "rows",
    "run",
    "run_worker",
    "summarize",
    "worker_main",
    "write_csv",
    "write_outputs",
]
