# Who may do what with a study. HIE operators own this file.
#
# Input (built by exchange.policy from plain values, never from the database):
#   input.subject  {id, role, organization, purpose_of_use[], patient}
#   input.action   "search" | "view" | "export"
#   input.resource {study, patient, custodian}   custodian = holding organisation
#   input.consents [FHIR Consent resources about the patient]   (later issues)
package exchange.access

import rego.v1

default allow := false

# Staff of the holding organisation see and export what their own site holds.
allow if {
	own_organisation
	input.subject.role in {"clinician", "operator", "system"}
	input.action in {"search", "view", "export"}
}

own_organisation if {
	input.subject.organization != null
	input.subject.organization == input.resource.custodian
}

# Plain-words reasons for a refusal, shown to the caller and written to the audit.
reasons contains "the study is held by another organisation and no consent permits access" if {
	not own_organisation
}

reasons contains sprintf("role %q may not %s studies", [input.subject.role, input.action]) if {
	own_organisation
	not allow
}
