"""Experiments that reproduce the paper's results on the embedded synthetic benchmark
(``python -m sort_fast.experiments.table1``)."""
