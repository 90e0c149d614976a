"""CPU benchmarks of cbd_fast (pytest-benchmark). Run from the repository root, e.g.

    python -m pytest benchmarks/test_bench_banzhaf.py --benchmark-columns=median,min,rounds
"""
