"""Benchmarks. Run each from the repository root as ``python -m bench.NAME`` (its docstring has the options):
that is how one imports its siblings (``bench.ds_launch``) and the test helpers (``tests.fixtures``)."""
