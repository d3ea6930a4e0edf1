"""Benchmarks: speed, latency and memory, as ratios against baselines measured in the same run.

Run them with ``tox -e bench`` or ``python -m tests.benchmarks --help``. Each measurement
runs in a fresh child process (:mod:`tests.benchmarks.child`), contenders take turns in a
rotating order, and every figure is a median over several rounds. Never part of ``pytest``.
"""
