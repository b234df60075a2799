"""Findings from masks: metrics, the rule-based reading, and recompute after an edit."""
