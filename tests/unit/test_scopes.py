import pytest

from exchange.errors import Forbidden
from exchange.security.scopes import permits, require


@pytest.mark.parametrize(
    ("scopes", "rtype", "interaction", "allowed"),
    [
        ({"user/ImagingStudy.rs"}, "ImagingStudy", "r", True),
        ({"user/ImagingStudy.rs"}, "ImagingStudy", "s", True),
        ({"user/ImagingStudy.rs"}, "ImagingStudy", "c", False),
        ({"user/ImagingStudy.rs"}, "Patient", "r", False),
        ({"user/*.cruds"}, "Consent", "d", True),
        ({"system/Patient.cu"}, "Patient", "u", True),
        ({"patient/ImagingStudy.read"}, "ImagingStudy", "s", True),
        ({"patient/ImagingStudy.read"}, "ImagingStudy", "u", False),
        ({"user/Observation.write"}, "Observation", "c", True),
        ({"user/ImagingStudy.rs?status=available"}, "ImagingStudy", "r", True),
        ({"openid", "fhirUser", "launch"}, "ImagingStudy", "r", False),
        (set(), "ImagingStudy", "r", False),
    ],
)
def test_smart_scopes(scopes, rtype, interaction, allowed):
    assert permits(scopes, rtype, interaction) is allowed


def test_require_says_what_is_missing():
    with pytest.raises(Forbidden, match="create on Patient"):
        require({"user/Patient.rs"}, "Patient", "c")
