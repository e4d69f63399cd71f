# Direct FHIR interactions on the hub's index (not brokered studies).
#
# Input: input.subject {id, role, organization, scopes[]}, input.interaction
# ("read" | "create" | "update"), input.resource_type.
# This is the type-level gate only. ImagingStudy and AuditEvent resources that pass it
# are then decided one by one by data.exchange.access (consent, custodian, own patient),
# so a clinician or patient may search them here and still sees only what that policy
# allows. Patient and Consent records stay with operators and sites (administration).
package exchange.fhir

import rego.v1

default allow := false

directory_types := {"Organization", "Endpoint"}

patient_data_types := {"ImagingStudy", "Patient", "Consent", "AuditEvent"}

consent_checked_types := {"ImagingStudy", "AuditEvent"}

# Anyone the HIE authenticated may read the directory of sites.
allow if {
	input.interaction == "read"
	input.resource_type in directory_types
}

# Studies and audit records are read through the per-resource access decision.
allow if {
	input.interaction == "read"
	input.resource_type in consent_checked_types
	input.subject.role in {"clinician", "patient", "system"}
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
