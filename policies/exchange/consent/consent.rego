# What the patient's Consent resources say about one request.
#
# Consents are FHIR R4 Consent resources as the registry stores them (IHE
# Privacy Consent on FHIR): status, scope, patient, provision {type, period,
# dataPeriod, actor[], action[], purpose[], securityLabel[], data[], provision[]}.
# This package reads input.subject, input.action, input.resource,
# input.consents and input.now (the input exchange.access documents).
#
# How a consent is read (docs/policy.md has the long version):
# - Only `active` consents whose patient is `Patient/<id>` for one of
#   input.resource.patient count, with scope patient-privacy (or no scope).
#   Other scopes (research, treatment) are not sharing directives.
# - A provision applies when every condition it states holds; a condition it
#   does not state holds for everything, except that a permit without `action`
#   permits viewing only: downloading (export) always needs an explicit
#   `export` action code (any code system; Exchange writes
#   https://exchange.example.org/fhir/CodeSystem/consent-action#export beside
#   consentaction#use, so the profile's required binding is still met).
#   consentaction access, disclose and use mean viewing.
# - References are `Type/id` or absolute URLs ending in it. Actors:
#   `Organization/<id>` names the caller's organisation, `Practitioner/<id>` or
#   `PractitionerRole/<id>` the caller; a code of the Exchange role system names
#   the caller's role, in actor.role (with a reference: both must match) or as
#   the reference's identifier (system = role system, value = the role) for
#   "anyone in this role".
# - Purposes: a permit needs every purpose the caller states to be listed; a
#   deny applies when any stated purpose is listed, or none is stated.
# - Security labels: on a permit they are the sensitive labels it covers; a
#   deny with labels applies only to data carrying one of them.
# - period is checked against input.now, dataPeriod against the study's date.
#   Dates without a time are UTC days, and an end date includes its whole day.
# - Nested provisions are exceptions that count only where the enclosing one
#   applies (three levels are read). In one consent the deepest applying
#   provision decides, deny before permit; across consents any deny wins.
# - Provider shares (the hub's `$share`: policy uri urn:exchange:policy:provider-share
#   or category consent-kind#provider-share) are ordinary permits here; they are
#   also named apart (received_share, revoked_shares) because the access policy
#   lets no one share on what was shared with them.
#
# Written for regorus' speed: alternatives are `else` chains (regorus evaluates
# every body of a rule, but stops an else chain at the first that holds), other
# packages reference data.exchange.consent.* by full path (an imported alias
# evaluates the whole package), and each provision's conditions are evaluated once.
package exchange.consent

import rego.v1

default allow := false

role_system := "https://exchange.example.org/fhir/CodeSystem/exchange-role"

viewing_actions := {"search", "read", "view"}

# Consent action codes that grant (permit) or withhold (deny) each request.
permit_codes := {"access", "disclose", "use", "export"} if {
	input.action in viewing_actions
} else := {"export"} if {
	input.action == "export"
}

deny_codes := {"access", "disclose", "use"} if {
	input.action in viewing_actions
} else := {"access", "disclose", "use", "export"} if {
	input.action == "export"
}

# The consents explicitly permit the request and none of them refuses it.
allow if {
	permitted
	not denied
}

permitted if {
	count(in_force) > 0
	count(permitting) > 0
}

denied if {
	count(in_force) > 0
	count(denying) > 0
}

# -- the request --------------------------------------------------------------

caller_refs := {
	concat("/", ["Organization", input.subject.organization]),
	concat("/", ["Practitioner", input.subject.id]),
	concat("/", ["PractitionerRole", input.subject.id]),
} if {
	is_string(input.subject.organization)
	is_string(input.subject.id)
} else := {concat("/", ["Practitioner", input.subject.id]), concat("/", ["PractitionerRole", input.subject.id])} if {
	is_string(input.subject.id)
} else := set()

patient_refs := {concat("/", ["Patient", id]) | some id in input.resource.patient}

study_refs := {concat("/", ["ImagingStudy", input.resource.study])} if is_string(input.resource.study)

study_uids := {input.resource.uid, concat(":", ["urn:oid", input.resource.uid])} if is_string(input.resource.uid)

purposes := {code | some code in input.subject.purpose_of_use}

resource_labels := {label | some label in input.resource.security_labels}

now_ns := time.parse_rfc3339_ns(input.now) if {
	is_string(input.now)
} else := time.now_ns()

today := substring(input.now, 0, 10) if {
	is_string(input.now)
	endswith(input.now, "Z")
} else := sprintf("%04d-%02d-%02d", time.date(now_ns))

study_ns := time.parse_ns("2006-01-02", input.resource.date) if is_string(input.resource.date)

# A reference (`Type/id`, or an absolute URL ending in it) to one of `wanted` (`Type/id`).
refers_to(ref, wanted) if {
	ref in wanted
} else if {
	is_string(ref)
	contains(ref, "://")
	some w in wanted
	endswith(ref, concat("", ["/", w]))
}

# -- which consents count -----------------------------------------------------

in_force contains i if {
	some i, c in input.consents
	c.status == "active"
	refers_to(c.patient.reference, patient_refs)
	privacy_scope(c)
}

privacy_scope(c) if {
	not c.scope
} else if {
	some coding in c.scope.coding
	coding.code == "patient-privacy"
}

# -- provisions, by path [consent, nested, nested] ----------------------------

provision[[i]] := input.consents[i].provision if some i in in_force

provision[[i, j]] := nested if {
	some i in in_force
	some j, nested in input.consents[i].provision.provision
}

provision[[i, j, k]] := nested if {
	some i in in_force
	some j, k
	nested := input.consents[i].provision.provision[j].provision[k]
}

# What a provision states about the caller, the study and the time holds.
in_scope contains path if {
	some path, p in provision
	actor_ok(p)
	data_ok(p)
	period_ok(p)
}

applies_at contains path if {
	some path in in_scope
	applies(provision[path])
}

# An enclosing provision scopes its exceptions, read as broadly as a deny.
encloses_at contains path if {
	some path in in_scope
	p := provision[path]
	p.provision
	deny_action_ok(p)
	deny_purpose_ok(p)
	deny_data_period_ok(p)
	enclosing_labels_ok(p)
}

# [consent index, depth, type, labels covered (with those of enclosing provisions), path]
applying contains [i, 0, p.type, label_codes(p), [i]] if {
	some [i] in applies_at
	p := provision[[i]]
}

applying contains [i, 1, p.type, label_codes(provision[[i]]) | label_codes(p), [i, j]] if {
	some [i, j] in applies_at
	[i] in encloses_at
	p := provision[[i, j]]
}

applying contains [i, 2, p.type, labels, [i, j, k]] if {
	some [i, j, k] in applies_at
	[i] in encloses_at
	[i, j] in encloses_at
	p := provision[[i, j, k]]
	labels := (label_codes(provision[[i]]) | label_codes(provision[[i, j]])) | label_codes(p)
}

deepest[i] := max({d | some [j, d, _, _, _] in applying; j == i}) if {
	some [i, _, _, _, _] in applying
}

denying contains i if {
	some [i, d, "deny", _, _] in applying
	deepest[i] == d
}

permitting contains i if {
	some [i, _, _, _, _] in applying
	not i in denying
}

# Sensitive labels the permitting consents name.
covered_labels contains label if {
	count(in_force) > 0
	some [i, _, "permit", labels, _] in applying
	i in permitting
	some label in labels
}

# The patient has opted out of all sharing: a consent in force whose only
# provision is an unconditional deny.
opted_out if {
	some [i] in in_scope
	p := provision[[i]]
	p.type == "deny"
	not p.provision
	not p.actor
	not p.action
	not p.purpose
	not p.data
	not p.securityLabel
	not p.dataPeriod
}

# -- provider shares ------------------------------------------------------------

provider_share_uri := "urn:exchange:policy:provider-share"

consent_kind_system := "https://exchange.example.org/fhir/CodeSystem/consent-kind"

# A Consent the hub wrote for a provider's share (`$share`), not the patient's own choice.
provider_share(c) if {
	some p in c.policy
	p.uri == provider_share_uri
} else if {
	some concept in c.category
	some coding in concept.coding
	coding.system == consent_kind_system
	coding.code == "provider-share"
}

# A share names its recipients and its study explicitly (a share without them is no share).
names_recipient_and_study(p) if {
	p.type == "permit"
	is_array(p.actor)
	count(p.actor) > 0
	is_array(p.data)
	count(p.data) > 0
	actor_ok(p)
	data_ok(p)
}

# Provider shares in force that name the caller (as a practitioner or by organisation)
# and this study: the caller's access may come from someone else's share.
received_shares contains i if {
	some i in in_force
	c := input.consents[i]
	provider_share(c)
	names_recipient_and_study(c.provision)
	period_ok(c.provision)
}

received_share if count(received_shares) > 0

# Shares of this study with the caller that were revoked (status inactive).
revoked_shares contains "the share of this study with you was revoked" if {
	some c in input.consents
	c.status == "inactive"
	provider_share(c)
	refers_to(c.patient.reference, patient_refs)
	names_recipient_and_study(c.provision)
}

# -- sentences for refusals ---------------------------------------------------

denials contains denial(provision[path]) if {
	some [i, d, "deny", _, path] in applying
	deepest[i] == d
}

denial(p) := sprintf("the patient has opted out of sharing with %s", [min(named_parties(p))]) if {
	count(named_parties(p)) > 0
} else := "the patient's consent refuses sharing for this purpose of use" if {
	p.purpose
} else := "the patient's consent refuses sharing this kind of sensitive information" if {
	p.securityLabel
} else := "the patient's consent refuses downloading the original images" if {
	p.action
	count({c.code | some concept in p.action; some c in concept.coding} & {"access", "disclose", "use"}) == 0
} else := "the patient's consent refuses sharing this study" if {
	p.data
} else := "the patient's consent refuses sharing images from this period" if {
	p.dataPeriod
} else := "the patient has opted out of sharing their images"

named_parties(p) := {party(a) | some a in p.actor; names_caller(a)}

party(a) := replace(ref, "/", " ") if {
	some ref in caller_refs
	refers_to(a.reference.reference, {ref})
} else := sprintf("anyone in the role %s", [input.subject.role])

# Permits that would apply but are not (or no longer) in force.
lapsed contains sprintf("%s ended on %s", [what_lapsed(input.consents[i]), p.period.end]) if {
	some i in in_force
	p := provision[[i]]
	permit_except_period(p)
	p.period.end
	not ends_ok(p.period.end, now_ns, today)
}

lapsed contains sprintf("%s only takes effect on %s", [what_lapsed(input.consents[i]), p.period.start]) if {
	some i in in_force
	p := provision[[i]]
	permit_except_period(p)
	p.period.start
	not starts_ok(p.period.start, now_ns, today)
}

what_lapsed(c) := "the share of this study with you" if {
	provider_share(c)
} else := "the patient's consent for this"

permit_except_period(p) if {
	p.type == "permit"
	p.period
	actor_ok(p)
	data_ok(p)
	applies(p)
}

# -- conditions ---------------------------------------------------------------

# Given in_scope (actor, data and period hold), the rest of a provision's conditions.
applies(p) if {
	p.type == "permit"
	permit_action_ok(p)
	permit_purpose_ok(p)
	permit_data_period_ok(p)
} else if {
	p.type == "deny"
	deny_action_ok(p)
	deny_purpose_ok(p)
	deny_data_period_ok(p)
	deny_labels_ok(p)
}

enclosing_labels_ok(p) if {
	p.type == "permit"
} else if {
	deny_labels_ok(p)
}

actor_ok(p) if {
	not p.actor
} else if {
	some a in p.actor
	names_caller(a)
}

names_caller(a) if {
	refers_to(a.reference.reference, caller_refs)
	count({c | some c in a.role.coding; c.system == role_system; c.code != input.subject.role}) == 0
} else if {
	not a.reference.reference
	some c in a.role.coding
	c.system == role_system
	c.code == input.subject.role
} else if {
	a.reference.identifier.system == role_system
	a.reference.identifier.value == input.subject.role
}

permit_action_ok(p) if {
	not p.action
	input.action in viewing_actions
} else if {
	some concept in p.action
	some c in concept.coding
	c.code in permit_codes
}

deny_action_ok(p) if {
	not p.action
	deny_codes
} else if {
	some concept in p.action
	some c in concept.coding
	c.code in deny_codes
}

permit_purpose_ok(p) if {
	not p.purpose
} else if {
	count(purposes) > 0
	count(purposes - {c.code | some c in p.purpose}) == 0
}

deny_purpose_ok(p) if {
	not p.purpose
} else if {
	count(purposes) == 0
} else if {
	some c in p.purpose
	c.code in purposes
}

data_ok(p) if {
	not p.data
} else if {
	some d in p.data
	refers_to(d.reference.reference, study_refs)
} else if {
	some d in p.data
	d.reference.identifier.value in study_uids
}

label_codes(p) := {c.code | some c in p.securityLabel}

deny_labels_ok(p) if {
	not p.securityLabel
} else if {
	some c in p.securityLabel
	c.code in resource_labels
}

period_ok(p) if {
	not p.period
} else if {
	starts_ok(object.get(p.period, "start", null), now_ns, today)
	ends_ok(object.get(p.period, "end", null), now_ns, today)
}

permit_data_period_ok(p) if {
	not p.dataPeriod
} else if {
	starts_ok(object.get(p.dataPeriod, "start", null), study_ns, input.resource.date)
	ends_ok(object.get(p.dataPeriod, "end", null), study_ns, input.resource.date)
}

# A deny with a data period also applies when the study's date is unknown.
deny_data_period_ok(p) if {
	not p.dataPeriod
} else if {
	not is_string(input.resource.date)
} else if {
	permit_data_period_ok(p)
}

# A start or an end (FHIR date or dateTime, or null) against an instant and its UTC day.
starts_ok(start, t, day) if {
	start == null
} else if {
	is_string(start)
	not contains(start, "T")
	start <= substring(day, 0, count(start))
} else if {
	is_string(start)
	contains(start, "T")
	time.parse_rfc3339_ns(start) <= t
}

ends_ok(end, t, day) if {
	end == null
} else if {
	is_string(end)
	not contains(end, "T")
	substring(day, 0, count(end)) <= end
} else if {
	is_string(end)
	contains(end, "T")
	t <= time.parse_rfc3339_ns(end)
}
