# Who may do what with a study: the exchange's one access decision.
#
# Input (built by exchange.policy.DecisionInput from plain values, never from the database):
#   input.subject   {id, role, organization, purpose_of_use[], patient, reason, studies[]}
#                   reason = the stated reason for break-the-glass access; studies = the
#                   studies (ids) a patient session from an access code covers, if any
#   input.action    search | read | view | export | share | revoke-share | write-consent |
#                   read-audit
#   input.resource  {type, study, uid, patient[] (linked ids too), custodian (holding
#                   organisation), security_labels[], date (YYYY-MM-DD)}
#   input.consents  [FHIR Consent resources about the patient, as stored]
#   input.now       RFC 3339 instant (UTC) the decision is made at
#   input.share     revoke-share only: the provider-share Consent to be revoked, as stored
# HIE-wide settings come from data.exchange.settings (policies/data.json).
#
# Entry points: `decision` {allow, reasons[], obligations[], policy_version} for one
# input; `decisions` for input.batch[] (a page of search candidates in one call);
# `sharing` {default_days, max_days} for the hub's `$share` (no input needed).
#
# Written for regorus' speed: alternatives are `else` chains (regorus evaluates every
# body of a rule, but stops an else chain at the first that holds), and the consent
# package is referenced by full path (an imported alias evaluates the whole package).
package exchange.access

import rego.v1

default allow := false

# -- entry points -------------------------------------------------------------

decision := {
	"allow": allow,
	"reasons": reasons,
	"obligations": obligations,
	"policy_version": policy_version,
}

decisions := [answer | some item in input.batch; answer := decision with input as item]

allow if granted_by

# -- settings: data.exchange.settings (policies/data.json) over safe defaults --

default mode := "opt-in"

mode := data.exchange.settings.mode

default sensitive := ["R", "V", "PSY", "HIV", "ETH", "SUD"]

sensitive := data.exchange.settings.sensitive_labels

default custodian_roles := ["clinician", "system"]

custodian_roles := data.exchange.settings.custodian_roles

default recipient_roles := ["clinician"]

recipient_roles := data.exchange.settings.recipient_roles

default default_sharing_purposes := ["TREAT"]

default_sharing_purposes := data.exchange.settings.default_sharing_purposes

default share_roles := ["clinician"]

share_roles := data.exchange.settings.share_roles

# How long a provider share lasts when the sharer does not say, and at most.
default share_default_days := 30

share_default_days := data.exchange.settings.sharing.default_days

default share_max_days := 90

share_max_days := data.exchange.settings.sharing.max_days

# What the hub's `$share` needs to know: periods, who may share, and the purposes a share
# may not carry (emergency access is break-the-glass, never a share).
sharing := {
	"default_days": share_default_days,
	"max_days": share_max_days,
	"roles": share_roles,
	"emergency_purposes": break_glass_purposes,
}

default consent_admin_roles := ["operator"]

consent_admin_roles := data.exchange.settings.consent_admin_roles

default audit_reader_roles := ["operator"]

audit_reader_roles := data.exchange.settings.audit_reader_roles

# HIE operators run the index: they may find and read studies' index entries (never images).
default index_reader_roles := ["operator"]

index_reader_roles := data.exchange.settings.index_reader_roles

default break_glass_purposes := ["ETREAT", "BTG"]

break_glass_purposes := data.exchange.settings.break_glass.purposes

default break_glass_roles := ["clinician"]

break_glass_roles := data.exchange.settings.break_glass.roles

default break_glass_actions := ["search", "read", "view"]

break_glass_actions := data.exchange.settings.break_glass.actions

default break_glass_covers_sensitive := false

break_glass_covers_sensitive := data.exchange.settings.break_glass.covers_sensitive

default policy_semver := "unversioned"

policy_semver := data.exchange.policy_version

default bundle_revision := "unrevised"

bundle_revision := data.exchange.bundle.revision

# The engine gives data.exchange.bundle.version (data.json's version + the bundle hash).
policy_version := data.exchange.bundle.version if {
	is_string(data.exchange.bundle.version)
} else := concat("+", [policy_semver, bundle_revision])

# -- facts about the request --------------------------------------------------

known_actions := {"search", "read", "view", "export", "share", "revoke-share", "write-consent", "read-audit"}

viewing_actions := {"search", "read", "view"}

study_actions := {"search", "read", "view", "export"}

index_actions := {"search", "read"}

# How a refusal names each action.
doing := {
	"search": "find",
	"read": "read",
	"view": "view",
	"export": "download the original images of",
}

role := input.subject.role

purposes := {code | some code in input.subject.purpose_of_use}

sensitive_labels := {label | some label in input.resource.security_labels; label in sensitive}

# The request says who holds the study and whose it is (the consents are found by patient).
study_described if {
	is_string(input.resource.custodian)
	is_array(input.resource.patient)
	count(input.resource.patient) > 0
}

from_custodian if {
	is_string(input.subject.organization)
	input.subject.organization == input.resource.custodian
}

own_patient if {
	role == "patient"
	is_string(input.subject.patient)
	input.subject.patient in input.resource.patient
	session_covers_study
}

# The disclosures about a patient are theirs to read, whichever studies a session covers.
own_records if {
	role == "patient"
	is_string(input.subject.patient)
	input.subject.patient in input.resource.patient
}

# A patient session opened with an access code (input.subject.studies) covers only the
# studies the code was issued for; a patient's own sign-in covers all of theirs.
default session_covers_study := false

session_covers_study if not input.subject.studies

session_covers_study if input.resource.study in input.subject.studies

break_glass_claimed if {
	some code in input.subject.purpose_of_use
	code in break_glass_purposes
}

reason_stated if {
	is_string(input.subject.reason)
	count(trim_space(input.subject.reason)) > 0
}

sensitive_covered if count(sensitive_labels - data.exchange.consent.covered_labels) == 0

# Opt-out HIE: images are shared for treatment unless the patient said otherwise.
shared_by_default if {
	mode == "opt-out"
	input.action in viewing_actions
	count(purposes) > 0
	every code in purposes {
		code in default_sharing_purposes
	}
}

# -- what allows a request, first match wins ----------------------------------

granted_by := study_grant if input.action in study_actions

granted_by := share_grant if input.action == "share"

granted_by := revoke_grant if {
	input.action == "revoke-share"
	is_object(input.share)
}

granted_by := consent_grant if input.action == "write-consent"

granted_by := audit_grant if input.action == "read-audit"

study_grant := "custodian" if {
	custodian_access
} else := "patient" if {
	own_patient
} else := "consent" if {
	shared_access
	data.exchange.consent.permitted
} else := "default" if {
	shared_access
} else := "emergency" if {
	emergency_access
} else := "operator" if {
	role in index_reader_roles
	input.action in index_actions
}

# The holding organisation's own staff may always see (and download) its own studies.
custodian_access if {
	from_custodian
	role in custodian_roles
}

# Another organisation's clinician: by the patient's consent or the HIE default.
# Downloading needs an explicit export permission, sensitive labels an explicit permit,
# and any refusal in a consent wins.
shared_access if {
	consent_decides
	not data.exchange.consent.denied
	sensitive_covered
	permitted_by_consent_or_default
}

consent_decides if {
	study_described
	not from_custodian
	role in recipient_roles
	not break_glass_claimed
}

permitted_by_consent_or_default if {
	data.exchange.consent.permitted
} else if {
	shared_by_default
}

# Break-the-glass: emergency treatment with a stated reason, even against the
# patient's choices; audited as emergency access and the holding site notified.
emergency_access if {
	break_glass_claimed
	study_described
	reason_stated
	role in break_glass_roles
	input.action in break_glass_actions
	emergency_covers_sensitive
}

emergency_covers_sensitive if {
	break_glass_covers_sensitive == true
} else if {
	sensitive_covered
}

# Provider sharing is one hop: a clinician who may view a study by any grant but a
# provider share (holding it, the patient's consent, the HIE's default sharing) may share
# it with another provider (the hub writes a provider-share Consent, which the consent
# rules then read as a permit for the recipient); whoever holds it through a share cannot
# share it on. Patients may share their own studies. Sensitive studies are shared only by
# the patient's own consent.
share_grant := "patient-share" if {
	own_patient
} else := "custodian-share" if {
	from_custodian
	role in share_roles
	count(sensitive_labels) == 0
	not data.exchange.consent.opted_out
} else := "viewer-share" if {
	role in share_roles
	count(sensitive_labels) == 0
	not share_recipient
	viewing_grant in {"consent", "default"}
}

share_recipient if data.exchange.consent.received_share

# The patient's own consents, without providers' shares: what a sharer's view is judged on.
own_consents := [c | some c in input.consents; not data.exchange.consent.provider_share(c)]

viewing_grant := grant if {
	grant := study_grant with input.action as "view" with input.consents as own_consents
}

# Who may end a provider share (input.share): whoever made it, staff of the holding
# organisation, the patient and HIE operators.
revoke_grant := "sharer-revoke" if {
	made_the_share
} else := "custodian-revoke" if {
	from_custodian
	role in custodian_roles
} else := "patient-revoke" if {
	own_patient
} else := "operator-revoke" if {
	role in consent_admin_roles
}

made_the_share if {
	some performer in input.share.performer
	data.exchange.consent.refers_to(performer.reference, data.exchange.consent.caller_refs)
}

# Patients record their own consents; HIE operators keep the consent registry.
consent_grant := "patient-consent" if {
	own_patient
} else := "operator-consent" if {
	role in consent_admin_roles
}

# Patients read the disclosures about themselves, the holding organisation those
# about its studies, HIE operators all of them.
audit_grant := "audit" if {
	own_records
} else := "audit" if {
	from_custodian
	role in custodian_roles
} else := "audit" if {
	role in audit_reader_roles
}

# -- obligations: what the caller of the policy must do when it acts ----------

default obligations := []

obligations := [
	{
		"code": "audit-emergency-access",
		"text": "record this as emergency (break-the-glass) access, with the reason given",
		"reason": trim_space(input.subject.reason),
	},
	{
		"code": "notify-custodian",
		"organization": input.resource.custodian,
		"text": sprintf("notify %s, which holds the study, of the emergency access", [input.resource.custodian]),
	},
] if granted_by == "emergency"

# -- reasons: plain sentences for the caller, the operator and the audit ------

reasons := [grounds[granted_by]] if {
	allow
} else := sort(refusals) if {
	count(refusals) > 0
} else := ["no rule of the exchange's policy allows this"]

grounds := {
	"custodian": "staff of the organisation that holds a study may always see it",
	"patient": "patients may see and download their own studies",
	"consent": "the patient's consent permits this",
	"default": "the exchange shares images for treatment unless the patient has opted out",
	"emergency": "emergency (break-the-glass) access: it is audited as such and the holding site is notified",
	"operator": "HIE operators may find studies in the index, but not see their images",
	"custodian-share": "the organisation that holds a study may share it with another provider",
	"patient-share": "patients may share their own studies",
	"viewer-share": "a clinician who may view a study may share it with another provider",
	"sharer-revoke": "whoever shared a study may revoke the share",
	"custodian-revoke": "the organisation that holds a study may revoke its shares",
	"patient-revoke": "patients may revoke shares of their own studies",
	"operator-revoke": "HIE operators keep the consent registry",
	"patient-consent": "patients may record their own consent",
	"operator-consent": "HIE operators keep the consent registry",
	"audit": "this audit trail is open to the patient, the holding organisation and HIE operators",
}

refusals := malformed if {
	count(malformed) > 0
} else := study_refusals if {
	input.action in study_actions
} else := share_refusals if {
	input.action == "share"
} else := revoke_refusals if {
	input.action == "revoke-share"
} else := {"only the patient or an HIE operator can record a consent for this patient"} if {
	input.action == "write-consent"
} else := {"only the patient, the organisation that holds the study or an HIE operator can read this audit trail"}

malformed contains "the request does not say who is asking" if not is_string(role)

malformed contains "the request does not say what is to be done" if not input.action

malformed contains sprintf("%q is not an action the exchange knows", [input.action]) if {
	input.action
	not input.action in known_actions
}

# Studies: the most telling refusal first.
study_refusals := {"the request does not say which organisation holds the study or whose it is"} if {
	not study_described
} else := {"the access code this session was opened with does not cover this study"} if {
	role == "patient"
	input.subject.patient in input.resource.patient
	not session_covers_study
} else := {"patients may only see their own studies"} if {
	role == "patient"
} else := break_glass_refusals if {
	break_glass_claimed
} else := consent_refusals if {
	consent_decides
} else := {sprintf("role %q may not %s studies", [role, doing[input.action]])} if {
	from_custodian
} else := {sprintf("role %q may not %s studies held by another organisation", [role, doing[input.action]])}

break_glass_refusals contains "break-the-glass access needs a stated reason" if not reason_stated

break_glass_refusals contains sprintf("role %q may not use break-the-glass access", [role]) if {
	not role in break_glass_roles
}

break_glass_refusals contains sprintf("break-the-glass access does not let you %s studies", [doing[input.action]]) if {
	not input.action in break_glass_actions
}

break_glass_refusals contains "the study holds sensitive information that break-the-glass access does not open" if {
	not emergency_covers_sensitive
}

consent_refusals := data.exchange.consent.denials if {
	data.exchange.consent.denied
} else := unconsented

unconsented contains "the study holds sensitive information that needs the patient's explicit consent" if {
	not sensitive_covered
}

unconsented contains "downloading the original images needs the patient's explicit permission; viewing them may be allowed" if {
	input.action == "export"
	not data.exchange.consent.permitted
}

unconsented contains not_shared_reason if {
	input.action in viewing_actions
	not data.exchange.consent.permitted
	not shared_by_default
}

unconsented contains lapse if {
	not data.exchange.consent.permitted
	some lapse in data.exchange.consent.lapsed
}

unconsented contains revoked if {
	not data.exchange.consent.permitted
	some revoked in data.exchange.consent.revoked_shares
}

not_shared_reason := "the patient has not consented to sharing their images with your organisation" if {
	mode != "opt-out"
} else := "no purpose of use was stated; without the patient's explicit consent images are shared only for treatment" if {
	count(purposes) == 0
} else := sprintf(
	"purpose of use %s needs the patient's explicit consent; without it images are shared only for treatment",
	[concat(", ", sort(purposes))],
)

share_refusals := {"shared studies cannot be shared further"} if {
	not from_custodian
	share_recipient
} else := {"patients may share only their own studies"} if {
	role == "patient"
} else := {sprintf("role %q may not share studies", [role])} if {
	not role in share_roles
} else := {"a study holding sensitive information can be shared only by the patient's own consent"} if {
	count(sensitive_labels) > 0
} else := {"the patient has opted out of sharing their images"} if {
	from_custodian
} else := {"break-the-glass access does not let you share studies"} if {
	break_glass_claimed
} else := viewing_refusals | {"you may only share studies you may view"}

viewing_refusals := found if {
	found := study_refusals with input.action as "view" with input.consents as own_consents
}

revoke_refusals := {"the request does not say which share is to be revoked"} if {
	not input.share
} else := {"only whoever shared the study, the organisation that holds it, the patient or an HIE operator can revoke this share"}
