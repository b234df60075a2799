"""Results into MRML and back: geometry, segmentation, tables, scene transaction."""
