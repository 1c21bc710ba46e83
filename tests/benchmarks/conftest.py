"""The benchmarks are run by hand (`python -m tests.benchmarks.run`), never by pytest."""

collect_ignore_glob = ["*.py"]
