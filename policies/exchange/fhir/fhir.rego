# Direct FHIR interactions on the hub's index (not brokered studies).
#
# Input: input.subject {id, role, organization, scopes[]}, input.interaction
# ("read" | "create" | "update"), input.resource_type.
# Patient data (ImagingStudy, Patient, Consent, AuditEvent) reaches clinicians
# and patients only through consent-checked paths; until those exist they are
# refused here, never shown unchecked.
package exchange.fhir

import rego.v1

default allow := false

directory_types := {"Organization", "Endpoint"}

patient_data_types := {"ImagingStudy", "Patient", "Consent", "AuditEvent"}

# Anyone the HIE authenticated may read the directory of sites.
allow if {
	input.interaction == "read"
	input.resource_type in directory_types
}

# HIE operators administer the index.
allow if {
	input.subject.role == "operator"
}

# Sites publish and maintain what they hold (ownership checks come with publishing).
allow if {
	input.subject.role == "system"
	input.resource_type in {"ImagingStudy", "Patient", "Endpoint"}
}

reasons contains sprintf("%s data is only available through consent-checked access", [input.resource_type]) if {
	not allow
	input.resource_type in patient_data_types
}

reasons contains sprintf("role %q may not %s %s resources", [input.subject.role, input.interaction, input.resource_type]) if {
	not allow
	not input.resource_type in patient_data_types
}
