"""Offline evaluation: metrics through the serving Retriever, peers in the same harness, reports."""
