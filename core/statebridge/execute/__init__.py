"""Execution: streaming a plan group by group under a memory budget, across ranks, into an atomic commit."""
