"""hermes_py: a store-and-forward DICOM router with a filesystem spool."""

__version__ = "0.1.0"
