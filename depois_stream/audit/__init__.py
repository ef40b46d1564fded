"""Audit tools: read the quarantine back, export, re-score, release with an audit trail, report."""
