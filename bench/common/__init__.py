"""What every benchmark shares (``python -m bench`` skips this package by name).

* :mod:`bench.common.cluster`: a throwaway control plane (private Redis, scheduler and
  simulated-fleet processes) and /proc sampling of what they spend;
* :mod:`bench.common.stats`: the one percentile definition and latency summary every
  results table uses;
* :mod:`bench.common.loadgen`: open- and closed-loop load, in one process or spread
  over several;
* :mod:`bench.common.results`: the provenance of a run (argv, git commit, machine,
  probed runtime versions) and the one writer and reader of results files.
"""
