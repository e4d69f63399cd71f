package exchange.fhir_test

import rego.v1

import data.exchange.fhir

clinician := {"id": "dr", "role": "clinician", "organization": "org-a"}

test_anyone_reads_the_site_directory if {
	fhir.allow with input as {"subject": clinician, "interaction": "read", "resource_type": "Endpoint"}
}

test_clinician_cannot_write_the_directory if {
	not fhir.allow with input as {"subject": clinician, "interaction": "create", "resource_type": "Organization"}
}

test_clinician_gets_no_unchecked_patient_data if {
	not fhir.allow with input as {"subject": clinician, "interaction": "read", "resource_type": "Patient"}
	not fhir.allow with input as {"subject": clinician, "interaction": "read", "resource_type": "Consent"}
}

test_clinician_searches_studies_through_the_access_decision if {
	fhir.allow with input as {"subject": clinician, "interaction": "read", "resource_type": "ImagingStudy"}
	not fhir.allow with input as {"subject": clinician, "interaction": "update", "resource_type": "ImagingStudy"}
}

test_patient_reads_disclosures_through_the_access_decision if {
	fhir.allow with input as {"subject": {"role": "patient"}, "interaction": "read", "resource_type": "AuditEvent"}
	not fhir.allow with input as {"subject": {"role": "patient"}, "interaction": "create", "resource_type": "AuditEvent"}
}

test_refusal_of_patient_data_says_why if {
	some reason in fhir.reasons with input as {"subject": clinician, "interaction": "read", "resource_type": "Patient"}
	contains(reason, "consent-checked")
}

test_operator_administers if {
	fhir.allow with input as {"subject": {"role": "operator"}, "interaction": "update", "resource_type": "Consent"}
}

test_site_system_publishes_studies if {
	fhir.allow with input as {"subject": {"role": "system"}, "interaction": "create", "resource_type": "ImagingStudy"}
}

test_site_system_cannot_write_consents if {
	not fhir.allow with input as {"subject": {"role": "system"}, "interaction": "update", "resource_type": "Consent"}
}

test_patient_role_denied_by_default if {
	not fhir.allow with input as {"subject": {"role": "patient"}, "interaction": "read", "resource_type": "Patient"}
	not fhir.allow with input as {"subject": {"role": "patient"}, "interaction": "update", "resource_type": "ImagingStudy"}
}
