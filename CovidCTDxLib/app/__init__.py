"""Front doors outside Slicer: the command line and the background worker protocol."""
