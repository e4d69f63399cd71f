"""DICOM parsing, validation, sanitising and (later) ImagingStudy building."""
