"""``python -m peftlab.bench --worker JOB``: the worker process of one measurement."""

import sys

from peftlab.bench.worker import worker_main

sys.exit(worker_main(sys.argv[1:]))
