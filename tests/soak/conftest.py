"""The soak test is run by hand (`python -m tests.soak.run_soak`), never by pytest."""

collect_ignore_glob = ["*"]
