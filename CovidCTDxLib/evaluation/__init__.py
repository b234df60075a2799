"""Scan-level metrics for scoring pipeline outputs against real scans and their labels."""
