"""The site node: intake, encrypted multi-tenant store, grant-gated DICOMweb, outbox."""
