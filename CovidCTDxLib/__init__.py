"""CovidCTDx library: chest CT → lungs, lesions, COVID-19 classification, severity, findings.

Importable without Slicer; the Slicer module (``CovidCTDx/CovidCTDx.py``) is a thin layer
over it.
"""
__version__ = "0.1.0"
