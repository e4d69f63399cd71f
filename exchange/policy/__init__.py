"""The decision point: Rego policies evaluated by Open Policy Agent."""
