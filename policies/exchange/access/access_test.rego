package exchange.access_test

import rego.v1

# Rules are referenced by full path (data.exchange.access.x): an imported
# package alias would make regorus evaluate, and count as covered, the whole package.

now := "2026-06-01T10:00:00Z"

clinician_a := {"id": "dr-ada", "role": "clinician", "organization": "site-a", "purpose_of_use": ["TREAT"]}

clinician_b := {"id": "dr-bo", "role": "clinician", "organization": "site-b", "purpose_of_use": ["TREAT"]}

study := {
	"type": "ImagingStudy",
	"study": "s1",
	"uid": "1.2.3",
	"patient": ["p1", "hie-1"],
	"custodian": "site-a",
	"security_labels": [],
	"date": "2026-03-10",
}

psy_study := object.union(study, {"security_labels": ["PSY", "N"]})

request(subject, action, consents) := {
	"subject": subject,
	"action": action,
	"resource": study,
	"consents": consents,
	"now": now,
}

on(req, resource) := object.union(object.remove(req, ["resource"]), {"resource": resource})

as_purpose(subject, purposes) := object.union(subject, {"purpose_of_use": purposes})

consent(provision) := {
	"resourceType": "Consent",
	"status": "active",
	"scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
	"patient": {"reference": "Patient/p1"},
	"provision": provision,
}

org(id) := {"reference": {"reference": concat("/", ["Organization", id])}}

consent_action(code) := {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": code}]}

export_action := {"coding": [
	{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "use"},
	{"system": "https://exchange.example.org/fhir/CodeSystem/consent-action", "code": "export"},
]}

label(code) := {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": code}

opt_out := consent({"type": "deny"})

permit_b := consent({"type": "permit", "actor": [org("site-b")], "action": [consent_action("access")]})

permit_b_export := consent({"type": "permit", "actor": [org("site-b")], "action": [export_action]})

permit_b_psy := consent({"type": "permit", "actor": [org("site-b")], "securityLabel": [label("PSY")]})

decide(req) := answer if {
	answer := data.exchange.access.decision with input as req
}

# -- the holding organisation and the patient ---------------------------------

test_own_staff_may_view_and_export_even_after_opt_out if {
	every action in ["search", "read", "view", "export"] {
		d := decide(request(clinician_a, action, [opt_out]))
		d.allow
		d.reasons == ["staff of the organisation that holds a study may always see it"]
	}
}

test_own_site_system_may_view if {
	decide(request({"id": "site-a", "role": "system", "organization": "site-a"}, "view", [])).allow
}

test_operator_of_the_holding_organisation_may_not_view if {
	d := decide(request({"id": "op", "role": "operator", "organization": "site-a"}, "view", []))
	not d.allow
	d.reasons == [`role "operator" may not view studies`]
}

test_patient_sees_and_exports_own_studies if {
	me := {"id": "p1", "role": "patient", "organization": null, "patient": "hie-1"}
	decide(request(me, "view", [opt_out])).allow
	d := decide(request(me, "export", []))
	d.allow
	d.reasons == ["patients may see and download their own studies"]
}

test_patient_cannot_see_someone_elses_study if {
	d := decide(request({"id": "p2", "role": "patient", "patient": "p2"}, "view", []))
	not d.allow
	d.reasons == ["patients may only see their own studies"]
}

# -- another organisation: HIE mode, purposes, consents -----------------------

test_opt_out_hie_shares_for_treatment if {
	d := decide(request(clinician_b, "view", []))
	d.allow
	d.reasons == ["the exchange shares images for treatment unless the patient has opted out"]
	d.obligations == []
	startswith(d.policy_version, "0.4.0+")
}

test_opt_in_hie_needs_consent if {
	d := decide(request(clinician_b, "view", [])) with data.exchange.settings.mode as "opt-in"
	not d.allow
	d.reasons == ["the patient has not consented to sharing their images with your organisation"]
	decide(request(clinician_b, "view", [permit_b])).allow with data.exchange.settings.mode as "opt-in"
}

test_patient_opt_out_denies_other_organisations if {
	d := decide(request(clinician_b, "view", [opt_out]))
	not d.allow
	d.reasons == ["the patient has opted out of sharing their images"]
}

test_other_purposes_need_explicit_consent if {
	d := decide(request(as_purpose(clinician_b, ["HPAYMT"]), "view", []))
	not d.allow
	d.reasons == ["purpose of use HPAYMT needs the patient's explicit consent; without it images are shared only for treatment"]
	decide(request(as_purpose(clinician_b, ["HPAYMT"]), "view", [permit_b])).allow
}

test_no_purpose_is_not_treatment if {
	d := decide(request(as_purpose(clinician_b, []), "view", []))
	not d.allow
	d.reasons == ["no purpose of use was stated; without the patient's explicit consent images are shared only for treatment"]
}

test_explicit_permit_says_so if {
	d := decide(request(clinician_b, "view", [permit_b]))
	d.reasons == ["the patient's consent permits this"]
}

test_other_roles_of_other_organisations_are_refused if {
	d := decide(request({"id": "site-b", "role": "system", "organization": "site-b", "purpose_of_use": ["TREAT"]}, "search", []))
	not d.allow
	d.reasons == [`role "system" may not find studies held by another organisation`]
}

test_export_needs_explicit_permission if {
	d := decide(request(clinician_b, "export", [permit_b]))
	not d.allow
	d.reasons == ["downloading the original images needs the patient's explicit permission; viewing them may be allowed"]
	decide(request(clinician_b, "export", [permit_b_export])).allow
}

test_sensitive_labels_need_a_permit_naming_them if {
	d := decide(on(request(clinician_b, "view", []), psy_study))
	not d.allow
	d.reasons == ["the study holds sensitive information that needs the patient's explicit consent"]
	decide(on(request(clinician_b, "view", [permit_b_psy]), psy_study)).allow
}

test_lapsed_consent_is_named if {
	expired := consent({"type": "permit", "actor": [org("site-b")], "period": {"start": "2025-01-01", "end": "2025-12-31"}})
	d := decide(request(clinician_b, "view", [expired])) with data.exchange.settings.mode as "opt-in"
	not d.allow
	"the patient's consent for this ended on 2025-12-31" in d.reasons
}

# -- break the glass ----------------------------------------------------------

emergency := object.union(as_purpose(clinician_b, ["ETREAT"]), {"reason": " unconscious patient, suspected stroke "})

test_break_the_glass_overrides_opt_out_with_obligations if {
	d := decide(request(emergency, "view", [opt_out]))
	d.allow
	d.reasons == ["emergency (break-the-glass) access: it is audited as such and the holding site is notified"]
	[audit, notify] := d.obligations
	audit.code == "audit-emergency-access"
	audit.reason == "unconscious patient, suspected stroke"
	notify.code == "notify-custodian"
	notify.organization == "site-a"
}

test_break_the_glass_needs_a_reason if {
	d := decide(request(object.union(emergency, {"reason": "  "}), "view", []))
	not d.allow
	d.reasons == ["break-the-glass access needs a stated reason"]
}

test_break_the_glass_does_not_export if {
	d := decide(request(emergency, "export", []))
	not d.allow
	d.reasons == ["break-the-glass access does not let you download the original images of studies"]
}

test_break_the_glass_is_for_clinicians if {
	d := decide(request(object.union(emergency, {"role": "operator"}), "view", []))
	not d.allow
	d.reasons == [`role "operator" may not use break-the-glass access`]
}

test_break_the_glass_does_not_open_sensitive_studies if {
	d := decide(on(request(emergency, "view", []), psy_study))
	not d.allow
	d.reasons == ["the study holds sensitive information that break-the-glass access does not open"]
	decide(on(request(emergency, "view", []), psy_study)).allow with data.exchange.settings.break_glass.covers_sensitive as true
}

test_own_staff_breaking_the_glass_get_no_obligations if {
	d := decide(request(object.union(emergency, {"organization": "site-a"}), "view", []))
	d.allow
	d.obligations == []
}

# -- share, write-consent, read-audit -----------------------------------------

test_holding_organisation_may_share if {
	d := decide(request(clinician_a, "share", []))
	d.allow
	d.reasons == ["the organisation that holds a study may share it with another provider"]
}

clinician_c := {"id": "dr-cy", "role": "clinician", "organization": "site-c", "purpose_of_use": ["TREAT"]}

opt_in := {"mode": "opt-in"}

practitioner(id) := {
	"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
	"reference": {"reference": concat("/", ["Practitioner", id])},
}

# A provider share of s1 by dr-bo (site-b) with `actor`, as the hub's $share writes it.
provider_share(actor) := object.union(consent({
	"type": "permit",
	"actor": [actor],
	"action": [consent_action("access")],
	"purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}],
	"period": {"start": "2026-05-20T09:00:00Z", "end": "2026-06-19T09:00:00Z"},
	"data": [{"meaning": "instance", "reference": {"reference": "ImagingStudy/s1"}}],
}), {
	"policy": [{"uri": "urn:exchange:policy:provider-share"}],
	"performer": [{"reference": "Practitioner/dr-bo"}],
	"organization": [{"reference": "Organization/site-b"}],
})

share_with_cy := provider_share(practitioner("dr-cy"))

with_settings(settings) := object.union(data.exchange.settings, settings)

test_a_viewer_by_the_patients_consent_may_share if {
	d := decide(request(clinician_b, "share", [permit_b])) with data.exchange.settings as with_settings(opt_in)
	d.allow
	d.reasons == ["a clinician who may view a study may share it with another provider"]
}

test_a_viewer_by_default_sharing_may_share if {
	decide(request(clinician_b, "share", [])).allow
}

test_the_recipient_of_a_share_views_but_cannot_share_on if {
	v := decide(request(clinician_c, "view", [share_with_cy])) with data.exchange.settings as with_settings(opt_in)
	v.allow
	v.reasons == ["the patient's consent permits this"]
	d := decide(request(clinician_c, "share", [share_with_cy])) with data.exchange.settings as with_settings(opt_in)
	not d.allow
	d.reasons == ["shared studies cannot be shared further"]
}

test_a_recipient_who_could_view_anyway_still_cannot_share_on if {
	# opt-out HIE: site-c would see the study by default, but its access came with a share
	d := decide(request(clinician_c, "share", [share_with_cy]))
	not d.allow
	d.reasons == ["shared studies cannot be shared further"]
	by_org := provider_share(org("site-c"))
	decide(request(clinician_c, "share", [by_org])).reasons == ["shared studies cannot be shared further"]
}

test_a_share_of_another_study_does_not_make_a_recipient if {
	d := decide(on(request(clinician_c, "share", [share_with_cy]), object.union(study, {"study": "s2"})))
	d.allow
}

test_the_holding_organisation_may_share_what_it_also_received if {
	d := decide(request(clinician_a, "share", [provider_share(org("site-a"))]))
	d.reasons == ["the organisation that holds a study may share it with another provider"]
}

test_whoever_may_not_view_cannot_share if {
	d := decide(request(clinician_b, "share", [opt_out]))
	not d.allow
	d.reasons == ["the patient has opted out of sharing their images", "you may only share studies you may view"]
	e := decide(request(clinician_c, "share", [])) with data.exchange.settings as with_settings(opt_in)
	not e.allow
	e.reasons == [
		"the patient has not consented to sharing their images with your organisation",
		"you may only share studies you may view",
	]
}

test_an_expired_share_no_longer_grants_view if {
	expired := object.union(share_with_cy, {"provision": {"period": {"end": "2026-05-31"}}})
	d := decide(request(clinician_c, "view", [expired])) with data.exchange.settings as with_settings(opt_in)
	not d.allow
	"the share of this study with you ended on 2026-05-31" in d.reasons
	# no longer a recipient: where the HIE shares by default, the clinician may share
	decide(request(clinician_c, "share", [expired])).allow
}

test_a_revoked_share_no_longer_grants_view if {
	revoked := object.union(share_with_cy, {"status": "inactive"})
	d := decide(request(clinician_c, "view", [revoked])) with data.exchange.settings as with_settings(opt_in)
	not d.allow
	d.reasons == [
		"the patient has not consented to sharing their images with your organisation",
		"the share of this study with you was revoked",
	]
}

test_a_share_never_grants_export if {
	d := decide(request(clinician_c, "export", [share_with_cy])) with data.exchange.settings as with_settings(opt_in)
	not d.allow
	d.reasons == ["downloading the original images needs the patient's explicit permission; viewing them may be allowed"]
}

test_the_patients_opt_out_overrides_a_share if {
	d := decide(request(clinician_c, "view", [share_with_cy, opt_out]))
	not d.allow
	d.reasons == ["the patient has opted out of sharing their images"]
}

test_break_the_glass_does_not_share if {
	d := decide(request(emergency, "share", []))
	not d.allow
	d.reasons == ["break-the-glass access does not let you share studies"]
}

test_sharing_respects_opt_out_and_sensitivity if {
	d := decide(request(clinician_a, "share", [opt_out]))
	d.reasons == ["the patient has opted out of sharing their images"]
	e := decide(on(request(clinician_a, "share", []), psy_study))
	e.reasons == ["a study holding sensitive information can be shared only by the patient's own consent"]
	f := decide(request({"id": "site-a", "role": "system", "organization": "site-a"}, "share", []))
	f.reasons == [`role "system" may not share studies`]
	g := decide(on(request(clinician_b, "share", [permit_b_psy]), psy_study))
	g.reasons == ["a study holding sensitive information can be shared only by the patient's own consent"]
}

test_patient_shares_and_records_own_consent if {
	me := {"id": "p1", "role": "patient", "patient": "p1"}
	decide(request(me, "share", [])).reasons == ["patients may share their own studies"]
	decide(request(me, "write-consent", [])).reasons == ["patients may record their own consent"]
	other := decide(request({"id": "p2", "role": "patient", "patient": "p2"}, "share", []))
	not other.allow
	other.reasons == ["patients may share only their own studies"]
}

test_sharing_settings_come_from_data if {
	data.exchange.access.sharing == {"default_days": 30, "max_days": 90, "roles": ["clinician"], "emergency_purposes": ["ETREAT", "BTG"]}
	shorter := data.exchange.access.sharing with data.exchange.settings.sharing as {"default_days": 7, "max_days": 14}
	[shorter.default_days, shorter.max_days] == [7, 14]
	data.exchange.access.sharing == {"default_days": 30, "max_days": 90, "roles": ["clinician"], "emergency_purposes": ["ETREAT", "BTG"]} with data.exchange.settings as {}
}

# -- revoking a share -------------------------------------------------------------

revoke(subject, share) := object.union(request(subject, "revoke-share", [share]), {"share": share})

test_whoever_shared_may_revoke if {
	d := decide(revoke(clinician_b, share_with_cy))
	d.allow
	d.reasons == ["whoever shared a study may revoke the share"]
}

test_the_holding_organisation_patient_and_operators_may_revoke if {
	decide(revoke(clinician_a, share_with_cy)).reasons == ["the organisation that holds a study may revoke its shares"]
	decide(revoke({"id": "p1", "role": "patient", "patient": "hie-1"}, share_with_cy)).reasons == ["patients may revoke shares of their own studies"]
	decide(revoke({"id": "op", "role": "operator", "organization": "hie"}, share_with_cy)).reasons == ["HIE operators keep the consent registry"]
}

test_others_may_not_revoke if {
	colleague := object.union(clinician_b, {"id": "dr-other"})
	every subject in [clinician_c, colleague, {"id": "p2", "role": "patient", "patient": "p2"}] {
		d := decide(revoke(subject, share_with_cy))
		not d.allow
		d.reasons == ["only whoever shared the study, the organisation that holds it, the patient or an HIE operator can revoke this share"]
	}
	e := decide(request({"id": "op", "role": "operator", "organization": "hie"}, "revoke-share", []))
	not e.allow
	e.reasons == ["the request does not say which share is to be revoked"]
}

test_operators_keep_the_consent_registry if {
	decide(request({"id": "op", "role": "operator", "organization": "hie"}, "write-consent", [])).reasons == ["HIE operators keep the consent registry"]
	d := decide(request(clinician_a, "write-consent", []))
	not d.allow
	d.reasons == ["only the patient or an HIE operator can record a consent for this patient"]
}

test_audit_trail_readers if {
	every subject in [
		{"id": "op", "role": "operator", "organization": "hie"},
		{"id": "p1", "role": "patient", "patient": "p1"},
		clinician_a,
	] {
		decide(request(subject, "read-audit", [])).allow
	}
	d := decide(request(clinician_b, "read-audit", []))
	not d.allow
	d.reasons == ["only the patient, the organisation that holds the study or an HIE operator can read this audit trail"]
}

# -- malformed requests ---------------------------------------------------------

test_missing_input_denies if {
	d := decide({})
	not d.allow
	d.reasons == ["the request does not say what is to be done", "the request does not say who is asking"]
	not data.exchange.access.allow with input as {}
}

test_unknown_action_denies if {
	d := decide(request(clinician_a, "delete", []))
	d.reasons == [`"delete" is not an action the exchange knows`]
}

test_missing_custodian_denies if {
	d := decide(on(request(clinician_b, "view", []), object.remove(study, ["custodian"])))
	not d.allow
	"the request does not say which organisation holds the study or whose it is" in d.reasons
	e := decide(on(request(object.union(clinician_b, {"purpose_of_use": ["ETREAT"], "reason": "x"}), "view", []), object.union(study, {"patient": []})))
	not e.allow
}

test_fallback_reason_when_nothing_specific_applies if {
	d := decide(request({"id": "x", "role": "clinician"}, "share", [])) with data.exchange.access.refusals as set()
	d.reasons == ["no rule of the exchange's policy allows this"]
}

# -- batches --------------------------------------------------------------------

test_batch_decides_each_item if {
	batch := [
		request(clinician_b, "view", []),
		request(clinician_b, "view", [opt_out]),
		on(request(clinician_b, "view", []), psy_study),
	]
	answers := data.exchange.access.decisions with input as {"batch": batch}
	[a.allow | some a in answers] == [true, false, false]
}

# -- settings from data.json ----------------------------------------------------

test_settings_come_from_data if {
	data.exchange.access.mode == "opt-out"
	"PSY" in data.exchange.access.sensitive
	data.exchange.access.recipient_roles == ["clinician"]
	data.exchange.access.break_glass_purposes == ["ETREAT", "BTG"]
	data.exchange.access.break_glass_covers_sensitive == false
}

test_settings_have_safe_defaults if {
	data.exchange.access.mode == "opt-in" with data.exchange.settings as {}
	data.exchange.access.break_glass_actions == ["search", "read", "view"] with data.exchange.settings as {}
	data.exchange.access.policy_version == "0.4.0+1f2e3d" with data.exchange.bundle as {"revision": "1f2e3d"}
	data.exchange.access.policy_version == "0.4.0+abc" with data.exchange.bundle as {"version": "0.4.0+abc"}
}

test_operators_may_find_and_read_index_entries if {
	some action in ["search", "read"]
	d := decide(request({"id": "op", "role": "operator", "organization": "hie"}, action, []))
	d.allow
	d.reasons == ["HIE operators may find studies in the index, but not see their images"]
}

test_operators_may_not_view_or_export_images_held_elsewhere if {
	some action in ["view", "export"]
	d := decide(request({"id": "op", "role": "operator", "organization": "hie"}, action, []))
	not d.allow
}

test_patient_session_from_an_access_code_covers_only_its_studies if {
	me := {"id": "p1", "role": "patient", "organization": null, "patient": "hie-1"}
	decide(request(object.union(me, {"studies": ["s1"]}), "export", [])).allow
	d := decide(request(object.union(me, {"studies": ["s9"]}), "view", []))
	not d.allow
	d.reasons == ["the access code this session was opened with does not cover this study"]
}

test_patient_session_reads_all_disclosures_about_the_patient if {
	me := {"id": "p1", "role": "patient", "organization": null, "patient": "hie-1", "studies": ["s9"]}
	audit := {"type": "AuditEvent", "study": "", "patient": ["hie-1"], "custodian": null}
	decide(on(request(me, "read-audit", []), audit)).allow
	other := object.union(audit, {"patient": ["hie-2"]})
	not decide(on(request(me, "read-audit", []), other)).allow
}
