import os

# The server runs requests in parallel itself: numpy's BLAS threads would only
# spin against them (7 % of the CPU under load in benchmarks/bench_load.py).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from .cli import main  # noqa: E402

raise SystemExit(main())
