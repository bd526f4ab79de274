"""fhir-sidecar: a fail-closed FHIR write-back proxy."""
__version__ = "0.1.0"
