"""The serving corpus: SQL under sql/, run by DuckDB (default) or Spark (local mode)."""
