"""nanod benchmarks: each bench_*.py prints a JSON object (name, median, unit, target) as its last stdout line."""
