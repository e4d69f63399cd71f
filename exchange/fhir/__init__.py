"""The FHIR index: R4 models, validation, persistence and search."""
