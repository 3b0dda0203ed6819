"""Speed benchmarks of the course's reference code against the libraries. Run: ``python -m benchmarks.run``."""
