"""The hub: FHIR index, consent-checked broker, decisions and audit. Run by the HIE."""
