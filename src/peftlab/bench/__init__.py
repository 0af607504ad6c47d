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
"""

from peftlab.bench.batch import count_tokens, padded_batch
from peftlab.bench.harness import BenchConfig, MethodPlan, plan, run
from peftlab.bench.report import cpu_model, environment, markdown, ratios, rows, summarize, write_csv, write_outputs
from peftlab.bench.worker import KINDS, Job, measure, run_worker, worker_main

__all__ = [
    "KINDS",
    "BenchConfig",
    "Job",
    "MethodPlan",
    "count_tokens",
    "cpu_model",
    "environment",
    "markdown",
    "measure",
    "padded_batch",
    "plan",
    "ratios",
    "rows",
    "run",
    "run_worker",
    "summarize",
    "worker_main",
    "write_csv",
    "write_outputs",
]
