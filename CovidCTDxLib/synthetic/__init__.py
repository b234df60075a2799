"""Synthetic data: phantoms, scanner model, lesions and transformations of real scans."""
