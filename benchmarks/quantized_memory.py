"""Memory of loading a base in full precision, NF4 and int8 (``load_model(name, quantize=...)``), each afresh.

Per setting: the resident set before loading (Python, torch, transformers, peftlab imported), the peak resident set
while loading, the resident set once loaded, the bytes the model's tensors occupy (peftlab's count: packed weights
with their scales), and the median forward time of one 1×128-token batch in eval mode on one thread.

SmolLM2-135M is packaged as a GGUF file, which transformers cannot quantize while loading: the model is read in
full precision and then quantized (written to a temporary folder and read back quantized), so its peak is the
full-precision load's, and memory the freed full-precision copy held is not all given back to the system. The
same weights saved as a safetensors folder (``--folder``, made once by this script) are quantized while they load,
which is what a quantized base costs when it comes as safetensors (every hub checkpoint).

    OMP_NUM_THREADS=1 python benchmarks/quantized_memory.py --model smollm2-135m --folder \
        --output benchmarks/results/quantized_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = ("fp32", "nf4", "int8")

_CHILD = """
import gc, json, statistics, sys, time
import torch
import peftlab
from peftlab.backbone.quant import storage_bytes
from peftlab.memory import current_rss, peak_rss
torch.set_num_threads(1)
name, setting = sys.argv[1], sys.argv[2]
before = current_rss()
model = peftlab.load_model(name, quantize=None if setting == "fp32" else setting)
gc.collect()
peak, loaded = peak_rss(), current_rss()
ids = torch.randint(3, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
times = []
with torch.inference_mode():
    for i in range(6):
        start = time.perf_counter()
        model(input_ids=ids)
        if i:
            times.append(time.perf_counter() - start)
print(json.dumps({"setting": setting, "rss_before": before, "peak_rss": peak, "rss_loaded": loaded,
                  "model_bytes": storage_bytes(model), "forward_s": statistics.median(times)}))
"""


_SAVE = """
import sys
from pathlib import Path
import peftlab
from peftlab.backbone.quant import write_folder
write_folder(peftlab.load_model(sys.argv[1]), Path(sys.argv[2]))
"""


def measure(model: str, setting: str) -> dict:
    """One setting in a fresh interpreter: a process's peak resident set only grows, so each needs its own."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, model, setting], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def table(rows: list[dict]) -> str:
    """A markdown table, forward times relative to full precision."""
    base = rows[0]["forward_s"]
    lines = [
        "| load | base | RSS before load (MiB) | peak RSS (MiB) | RSS loaded (MiB) | tensors (MiB) "
        "| forward 1×128 (s) | vs fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['source']} | {r['setting']} | {_mib(r['rss_before'])} | {_mib(r['peak_rss'])} | "
            f"{_mib(r['rss_loaded'])} | "
            f"{_mib(r['model_bytes'])} | {r['forward_s']:.3f} | {r['forward_s'] / base:.2f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--folder", action="store_true", help="also load from a safetensors copy of the model")
    parser.add_argument("--output", help="write the rows and the command as JSON here")
    args = parser.parse_args()
    rows = [measure(args.model, s) | {"source": args.model} for s in SETTINGS]
    if args.folder:
        with tempfile.TemporaryDirectory(prefix="quantized-memory-") as folder:
            subprocess.run([sys.executable, "-c", _SAVE, args.model, folder], check=True, capture_output=True)
            rows += [measure(folder, s) | {"source": "safetensors folder"} for s in SETTINGS]
    print(table(rows))
    if args.output:
        import bitsandbytes
        import torch

        record = {
            "command": "OMP_NUM_THREADS=1 python " + shlex.join(sys.argv),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "rows": rows,
        }
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
