"""Reliability scenarios: real daemons against the real emulator and ledger, with figures.

``scenarios`` holds the scenarios (each a function of a scale), ``test_reliability`` runs
them small in the regular suite, ``report`` runs them large and prints a table.
"""
