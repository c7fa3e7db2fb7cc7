"""Benchmarks for ``make bench``: each module's ``run()`` returns (name, ratio, target) rows.

Ratios are measured against anchors timed in the same run on the same machine, so they are
comparable across machines; absolute times are printed for information only.
"""
