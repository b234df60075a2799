"""Weight-free lesion detection: density engine and the ground-glass / consolidation split."""
