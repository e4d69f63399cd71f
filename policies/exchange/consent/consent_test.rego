package exchange.consent_test

import rego.v1

# Rules are referenced by full path: see access_test.rego.

role_system := "https://exchange.example.org/fhir/CodeSystem/exchange-role"

dr_bo := {"id": "dr-bo", "role": "clinician", "organization": "site-b", "purpose_of_use": ["TREAT"]}

study := {
	"type": "ImagingStudy",
	"study": "s1",
	"uid": "1.2.3",
	"patient": ["p1"],
	"custodian": "site-a",
	"security_labels": ["R"],
	"date": "2026-03-10",
}

request(consents) := {
	"subject": dr_bo,
	"action": "view",
	"resource": study,
	"consents": consents,
	"now": "2026-06-01T10:00:00Z",
}

consent(provision) := {
	"resourceType": "Consent",
	"status": "active",
	"scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
	"patient": {"reference": "Patient/p1"},
	"provision": provision,
}

ref(reference) := {"reference": {"reference": reference}}

codes(system, values) := [{"coding": [{"system": system, "code": v}]} | some v in values]

consent_actions(values) := codes("http://terminology.hl7.org/CodeSystem/consentaction", values)

purposes(values) := [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": v} | some v in values]

labels(values) := [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": v} | some v in values]

permit := {"type": "permit"}

deny := {"type": "deny"}

allows(consents) if data.exchange.consent.allow with input as request(consents)

allows_for(req) if data.exchange.consent.allow with input as req

denials(consents) := found if {
	found := data.exchange.consent.denials with input as request(consents)
}

# -- which consents count -----------------------------------------------------

test_a_permit_allows if allows([consent(permit)])

test_no_consent_neither_permits_nor_denies if {
	not allows([])
	not data.exchange.consent.denied with input as request([])
}

test_only_active_consents_about_the_patient_count if {
	not allows([object.union(consent(permit), {"status": "inactive"})])
	not allows([object.union(consent(permit), {"patient": {"reference": "Patient/p2"}})])
	not allows([object.union(consent(permit), {"scope": {"coding": [{"code": "research"}]}})])
	allows([object.remove(consent(permit), ["scope"])])
}

# -- actors -------------------------------------------------------------------

test_absolute_references if {
	absolute := object.union(consent(object.union(permit, {
		"actor": [ref("https://hub.example/fhir/Organization/site-b")],
		"data": [ref("https://hub.example/fhir/ImagingStudy/s1")],
	})), {"patient": {"reference": "https://hub.example/fhir/Patient/p1"}})
	allows([absolute])
	not allows([consent(object.union(permit, {"actor": [ref("https://hub.example/fhir/Organization/xsite-b")]}))])
	denials([consent(object.union(deny, {"actor": [ref("https://h/fhir/Organization/site-b")]}))]) == {
		"the patient has opted out of sharing with Organization site-b",
	}
}

test_actor_organisation_practitioner_and_role if {
	allows([consent(object.union(permit, {"actor": [ref("Organization/site-b")]}))])
	allows([consent(object.union(permit, {"actor": [ref("Practitioner/dr-bo")]}))])
	allows([consent(object.union(permit, {"actor": [ref("PractitionerRole/dr-bo")]}))])
	not allows([consent(object.union(permit, {"actor": [ref("Organization/site-c")]}))])
}

test_actor_role_alone_or_with_a_reference if {
	by_role := {"role": {"coding": [{"system": role_system, "code": "clinician"}]}, "reference": {"display": "clinicians"}}
	allows([consent(object.union(permit, {"actor": [by_role]}))])
	by_identifier := {"reference": {"identifier": {"system": role_system, "value": "clinician"}}}
	allows([consent(object.union(permit, {"actor": [by_identifier]}))])
	operators_of_b := object.union(ref("Organization/site-b"), {"role": {"coding": [{"system": role_system, "code": "operator"}]}})
	not allows([consent(object.union(permit, {"actor": [operators_of_b]}))])
	ircp_of_b := object.union(ref("Organization/site-b"), {"role": {"coding": [{"code": "IRCP"}]}})
	allows([consent(object.union(permit, {"actor": [ircp_of_b]}))])
}

# -- actions, purposes, data, labels ------------------------------------------

test_permit_without_action_permits_viewing_only if {
	allows([consent(permit)])
	not allows_for(object.union(request([consent(permit)]), {"action": "export"}))
	export := object.union(permit, {"action": [{"coding": [{"code": "use"}, {"code": "export"}]}]})
	allows_for(object.union(request([consent(export)]), {"action": "export"}))
}

test_deny_of_export_leaves_viewing if {
	no_export := consent(object.union(deny, {"action": [{"coding": [{"code": "export"}]}]}))
	allows([consent(permit), no_export])
	req := object.union(request([consent(permit), no_export]), {"action": "export"})
	data.exchange.consent.denials == {"the patient's consent refuses downloading the original images"} with input as req
}

test_permit_needs_every_stated_purpose if {
	allows([consent(object.union(permit, {"purpose": purposes(["TREAT", "COC"])}))])
	not allows([consent(object.union(permit, {"purpose": purposes(["HPAYMT"])}))])
	no_purpose := object.union(request([consent(object.union(permit, {"purpose": purposes(["TREAT"])}))]), {"subject": {"purpose_of_use": []}})
	not allows_for(no_purpose)
}

test_deny_by_purpose if {
	d := denials([consent(permit), consent(object.union(deny, {"purpose": purposes(["TREAT"])}))])
	d == {"the patient's consent refuses sharing for this purpose of use"}
	not allows([consent(permit), consent(object.union(deny, {"purpose": purposes(["TREAT"])}))])
	allows([consent(permit), consent(object.union(deny, {"purpose": purposes(["HMARKT"])}))])
	unstated := object.union(request([consent(object.union(deny, {"purpose": purposes(["HMARKT"])}))]), {"subject": {"purpose_of_use": []}})
	data.exchange.consent.denied with input as unstated
}

test_data_names_the_study if {
	allows([consent(object.union(permit, {"data": [ref("ImagingStudy/s1")]}))])
	allows([consent(object.union(permit, {"data": [{"reference": {"identifier": {"value": "urn:oid:1.2.3"}}}]}))])
	not allows([consent(object.union(permit, {"data": [ref("ImagingStudy/s2")]}))])
	denials([consent(object.union(deny, {"data": [ref("ImagingStudy/s1")]}))]) == {"the patient's consent refuses sharing this study"}
}

test_permit_labels_are_covered if {
	data.exchange.consent.covered_labels == {"R", "PSY"} with input as request([consent(object.union(permit, {"securityLabel": labels(["R", "PSY"])}))])
}

test_deny_with_labels_applies_to_labelled_data_only if {
	no_v := consent(object.union(deny, {"securityLabel": labels(["V"])}))
	allows([consent(permit), no_v])
	no_r := consent(object.union(deny, {"securityLabel": labels(["R"])}))
	denials([consent(permit), no_r]) == {"the patient's consent refuses sharing this kind of sensitive information"}
}

# -- time -----------------------------------------------------------------------

test_consent_period if {
	allows([consent(object.union(permit, {"period": {"start": "2026-01-01", "end": "2026-06-01"}}))])
	allows([consent(object.union(permit, {"period": {"start": "2026-06", "end": "2026"}}))])
	allows([consent(object.union(permit, {"period": {"start": "2026-06-01T09:00:00+00:00", "end": "2026-06-01T12:00:00+02:00"}}))])
	not allows([consent(object.union(permit, {"period": {"start": "2026-06-01T11:00:00Z"}}))])
	not allows([consent(object.union(permit, {"period": {"end": "2026-05-31"}}))])
	not allows([consent(object.union(permit, {"period": {"end": "2026-06-01T09:59:59Z"}}))])
}

test_lapsed_and_future_permits_are_named if {
	req := request([
		consent(object.union(permit, {"period": {"start": "2025-01-01", "end": "2025-12-31"}})),
		consent(object.union(permit, {"period": {"start": "2026-07-01"}})),
	])
	data.exchange.consent.lapsed == {
		"the patient's consent for this ended on 2025-12-31",
		"the patient's consent for this only takes effect on 2026-07-01",
	} with input as req
}

test_data_period_against_the_study_date if {
	allows([consent(object.union(permit, {"dataPeriod": {"start": "2026-01-01", "end": "2026-03-10"}}))])
	not allows([consent(object.union(permit, {"dataPeriod": {"start": "2026-03-11T00:00:00Z"}}))])
	old := consent(object.union(deny, {"dataPeriod": {"end": "2025-12-31"}}))
	allows([consent(permit), old])
	recent := consent(object.union(deny, {"dataPeriod": {"start": "2026-01-01"}}))
	denials([consent(permit), recent]) == {"the patient's consent refuses sharing images from this period"}
	undated := object.union(request([consent(permit), old]), {"resource": {"date": null}})
	data.exchange.consent.denied with input as undated
}

test_now_defaults_to_the_clock if {
	data.exchange.consent.now_ns > 0 with input as object.remove(request([]), ["now"])
	data.exchange.consent.today == "2026-06-02" with input as object.union(request([]), {"now": "2026-06-01T23:30:00-02:00"})
}

test_callers_without_an_organisation_or_id if {
	data.exchange.consent.caller_refs == {"Practitioner/x", "PractitionerRole/x"} with input as {"subject": {"id": "x"}}
	data.exchange.consent.caller_refs == set() with input as {"subject": {}}
}

# -- nesting and precedence -------------------------------------------------------

test_opt_out_with_an_exception_for_one_organisation if {
	except_b := consent(object.union(deny, {"provision": [object.union(permit, {"actor": [ref("Organization/site-b")]})]}))
	allows([except_b])
	not data.exchange.consent.opted_out with input as request([except_b])
	c := object.union(request([except_b]), {"subject": {"organization": "site-c"}})
	data.exchange.consent.denials == {"the patient has opted out of sharing their images"} with input as c
}

test_permit_with_a_nested_deny_of_restricted_data if {
	nested := consent(object.union(permit, {
		"actor": [ref("Organization/site-b")],
		"provision": [object.union(deny, {"securityLabel": labels(["R"])})],
	}))
	not allows([nested])
	denials([nested]) == {"the patient's consent refuses sharing this kind of sensitive information"}
}

test_three_levels_and_enclosing_labels if {
	inner := object.union(permit, {"actor": [ref("Practitioner/dr-bo")]})
	middle := object.union(deny, {"actor": [ref("Organization/site-b")], "provision": [inner]})
	outer := consent(object.union(permit, {"securityLabel": labels(["R"]), "provision": [middle]}))
	allows([outer])
	data.exchange.consent.covered_labels == {"R"} with input as request([outer])
	other := object.union(request([outer]), {"subject": {"id": "dr-cy"}})
	data.exchange.consent.denials == {"the patient has opted out of sharing with Organization site-b"} with input as other
}

test_an_enclosing_deny_with_labels_scopes_its_exceptions if {
	psy_except_b := consent(object.union(deny, {
		"securityLabel": labels(["PSY"]),
		"provision": [object.union(permit, {"actor": [ref("Organization/site-b")]})],
	}))
	not allows([psy_except_b])
	psy := object.union(request([psy_except_b]), {"resource": {"security_labels": ["PSY"]}})
	allows_for(psy)
	data.exchange.consent.covered_labels == {"PSY"} with input as psy
}

test_deny_wins_at_the_same_depth_and_across_consents if {
	both := consent(object.union(permit, {"provision": [permit, object.union(deny, {"actor": [ref("Organization/site-b")]})]}))
	not allows([both])
	not allows([consent(permit), consent(object.union(deny, {"actor": [ref("Practitioner/dr-bo")]}))])
	denials([consent(object.union(deny, {"actor": [ref("Practitioner/dr-bo")]}))]) == {"the patient has opted out of sharing with Practitioner dr-bo"}
}

test_role_denial_names_the_role if {
	by_role := {"role": {"coding": [{"system": role_system, "code": "clinician"}]}}
	denials([consent(object.union(deny, {"actor": [by_role]}))]) == {"the patient has opted out of sharing with anyone in the role clinician"}
}

test_blanket_opt_out if {
	data.exchange.consent.opted_out with input as request([consent(deny)])
	not data.exchange.consent.opted_out with input as request([consent(object.union(deny, {"actor": [ref("Organization/x")]}))])
}

test_requests_other_than_viewing_are_not_consent_matters if {
	not data.exchange.consent.denied with input as object.union(request([consent(deny)]), {"action": "share"})
}

# -- provider shares ------------------------------------------------------------------

share_policy := [{"uri": "urn:exchange:policy:provider-share"}]

share_category := [{"coding": [
	{"system": "http://loinc.org", "code": "64292-6"},
	{"system": "https://exchange.example.org/fhir/CodeSystem/consent-kind", "code": "provider-share"},
]}]

# A share of s1 with `actor` for 30 days from 2026-05-20, as the hub's $share writes it.
share(actor) := object.union(consent({
	"type": "permit",
	"actor": [actor],
	"action": consent_actions(["access"]),
	"purpose": purposes(["TREAT"]),
	"period": {"start": "2026-05-20T09:00:00Z", "end": "2026-06-19T09:00:00Z"},
	"data": [{"meaning": "instance", "reference": {"reference": "ImagingStudy/s1"}}],
}), {"policy": share_policy, "category": share_category, "performer": [{"reference": "Practitioner/dr-ada"}]})

test_a_provider_share_permits_the_named_practitioner_for_that_study if {
	shared := share(ref("Practitioner/dr-bo"))
	allows([shared])
	data.exchange.consent.received_share with input as request([shared])
	other := object.union(request([shared]), {"resource": {"study": "s2"}})
	not allows_for(other)
	not data.exchange.consent.received_share with input as other
}

test_a_share_with_an_organisation_names_its_staff if {
	data.exchange.consent.received_share with input as request([share(ref("Organization/site-b"))])
	not data.exchange.consent.received_share with input as request([share(ref("Organization/site-c"))])
}

test_shares_are_known_by_policy_or_by_category if {
	data.exchange.consent.provider_share(share(ref("Organization/site-b")))
	data.exchange.consent.provider_share(object.remove(share(ref("Organization/site-b")), ["policy"]))
	not data.exchange.consent.provider_share(consent(permit))
}

test_the_patients_own_permit_is_not_a_received_share if {
	own := consent(object.union(permit, {"actor": [ref("Practitioner/dr-bo")], "data": [ref("ImagingStudy/s1")]}))
	allows([own])
	not data.exchange.consent.received_share with input as request([own])
}

test_a_share_that_names_no_study_is_no_share if {
	shared := share(ref("Practitioner/dr-bo"))
	vague := object.union(object.remove(shared, ["provision"]), {"provision": object.remove(shared.provision, ["data"])})
	allows([vague])
	not data.exchange.consent.received_share with input as request([vague])
}

test_an_expired_share_grants_nothing_and_says_so if {
	expired := object.union(share(ref("Practitioner/dr-bo")), {"provision": {"period": {"start": "2026-05-01", "end": "2026-05-31"}}})
	not allows([expired])
	not data.exchange.consent.received_share with input as request([expired])
	data.exchange.consent.lapsed == {"the share of this study with you ended on 2026-05-31"} with input as request([expired])
	later := object.union(share(ref("Practitioner/dr-bo")), {"provision": {"period": {"start": "2026-07-01"}}})
	data.exchange.consent.lapsed == {"the share of this study with you only takes effect on 2026-07-01"} with input as request([later])
}

test_a_revoked_share_grants_nothing_and_says_so if {
	revoked := object.union(share(ref("Practitioner/dr-bo")), {"status": "inactive"})
	not allows([revoked])
	not data.exchange.consent.received_share with input as request([revoked])
	data.exchange.consent.revoked_shares == {"the share of this study with you was revoked"} with input as request([revoked])
	data.exchange.consent.revoked_shares == set() with input as request([object.union(revoked, {"status": "active"})])
}
