"""From files to tensors and back: readers and writers per format (``io/``), dataset discovery,
splits and checks, label values, SAM's input geometry and intensity, and postprocessing."""
