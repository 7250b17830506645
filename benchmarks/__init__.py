"""Hand-run benchmarks (`make bench`, `python -m benchmarks.run [name] [--quick]`); never part of `make test`."""
