"""The risk policy in force: the built-in one, changed by RECON_RISK_POLICY_FILE."""

from __future__ import annotations

from recon_stream.domain.policy_file import DEFAULT_POLICY, PolicyError, parse_policy
from recon_stream.domain.risk import RiskPolicy
from recon_stream.settings import Settings


def effective_policy(settings: Settings) -> RiskPolicy:
    """The built-in policy, changed by RECON_RISK_POLICY_FILE when set; `PolicyError`
    (naming the file, the line and the field) for a file that cannot be used."""
    path = settings.risk_policy_file
    if path is None:
        return DEFAULT_POLICY
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PolicyError(f"{path}: cannot read the policy file ({error.strerror})") from None
    return parse_policy(text, str(path), base=DEFAULT_POLICY)
