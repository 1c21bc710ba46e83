"""The load and soak test: `python -m tests.soak.run_soak` (see docs/soak.md). Never collected by pytest."""
