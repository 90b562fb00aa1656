"""`make bench`: the full stack against the database's and the transport's own limits.

See BENCHMARKS.md for what it measures and how to read the table; `python -m bench --help`.
"""
