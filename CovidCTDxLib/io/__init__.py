"""Reading CTs and segmentations; writing seg.nrrd, results.json / CSV and the report."""
