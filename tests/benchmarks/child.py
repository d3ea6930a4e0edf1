"""Run one measurement in this fresh process and print its result as one JSON line.

    python -m tests.benchmarks.child MODULE:FUNCTION '{"keyword": "arguments"}'

``MODULE`` is a module of this package. A fresh process per measurement keeps rounds
independent (no garbage, caches or threads left by the previous contender).
"""

from __future__ import annotations

import importlib
import json
import os
import sys


def main() -> int:
    target, arguments = sys.argv[1], json.loads(sys.argv[2])
    module_name, function_name = target.split(":")
    module = importlib.import_module(f"tests.benchmarks.{module_name}")
    result = getattr(module, function_name)(**arguments)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    # Exit without waiting for threads or tasks a contender left behind (gcloud-aio's
    # subscribe() can hang when cancelled): the measurement is done.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
