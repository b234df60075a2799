"""Lung masking: right and left lung, airways, body, zones, and the neural lung model hook."""
