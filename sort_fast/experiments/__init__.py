"""Experiments that reproduce the paper's results on the embedded synthetic benchmark
(``python -m sort_fast.experiments.table1``; docs/REPRODUCTION.md).

``table1`` is the command line and the order of its steps; ``protocol`` says which runs it
makes with which flags and how λ is chosen, ``jobs`` runs them, ``columns`` names what Table 1
reports, ``tables`` and ``figure`` draw it, ``stats`` compares rows per seed and
``wording_rule`` is the text-only shortcut without learning."""
