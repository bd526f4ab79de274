"""fhir-sidecar: a fail-closed FHIR write-back proxy."""
__version__ = "0.2.1"
