"""Exchange: a federated medical-image exchange for a Health Information Exchange."""

__version__ = "0.1.0"
