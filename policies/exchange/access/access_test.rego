package exchange.access_test

import rego.v1

import data.exchange.access

clinician_a := {"id": "dr-a", "role": "clinician", "organization": "org-a"}

study_at_a := {"study": "1.2.3", "patient": "p1", "custodian": "org-a"}

test_own_organisation_may_view if {
	access.allow with input as {"subject": clinician_a, "action": "view", "resource": study_at_a}
}

test_other_organisation_is_denied_by_default if {
	not access.allow with input as {
		"subject": object.union(clinician_a, {"organization": "org-b"}),
		"action": "view", "resource": study_at_a,
	}
}

test_denial_says_why if {
	count(access.reasons) > 0 with input as {
		"subject": object.union(clinician_a, {"organization": "org-b"}),
		"action": "view", "resource": study_at_a,
	}
}

test_patient_role_is_not_staff if {
	not access.allow with input as {
		"subject": {"id": "p1", "role": "patient", "organization": "org-a"},
		"action": "export", "resource": study_at_a,
	}
}

test_missing_input_denies if {
	not access.allow with input as {}
}
