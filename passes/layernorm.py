"""Placeholder: filled in by its family (issue 3)."""
CANDIDATES = ()
