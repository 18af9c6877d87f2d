"""hotbed benchmarks: ``python -m bench <name> [options]``. Each prints ratios against
a baseline measured in the same run and writes JSON under bench/results/."""
