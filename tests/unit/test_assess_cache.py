"""`risk.assess` memoizes its rule matching: the same answers as matching afresh, for
any service, organization and feed context, and a bounded cache."""

from __future__ import annotations

from datetime import date

from hypothesis import given, settings
from hypothesis import strategies as st

from recon_stream.domain import risk
from recon_stream.domain.policy_file import DEFAULT_POLICY
from recon_stream.domain.risk import OrgOverride, ServiceRule, Severity, assess
from recon_stream.domain.scans import Service
from recon_stream.domain.vulns import KevEntry, VulnContext

MODULES = sorted({m for rule in DEFAULT_POLICY.rules for m in rule.modules})
PRODUCTS = sorted({p for rule in DEFAULT_POLICY.rules for p in rule.products})
PORTS = sorted({port for rule in DEFAULT_POLICY.rules for _, port in rule.ports})
CVES = ["CVE-2019-0708", "CVE-2021-44228", "CVE-2024-0001"]

POLICY = DEFAULT_POLICY.model_copy(
    update={
        "organizations": {
            "org-1": (OrgOverride(port=("tcp", 3389), severity=Severity.LOW, why="jump host"),),
            "org-2": (OrgOverride(service=DEFAULT_POLICY.rules[0].name, severity=Severity.INFO),),
        }
    }
)

services = st.builds(
    Service,
    port=st.one_of(st.sampled_from(PORTS), st.integers(1, 65535)),
    transport=st.sampled_from(["tcp", "udp"]),
    module=st.one_of(
        st.none(), st.sampled_from(MODULES), st.sampled_from(MODULES).map(lambda m: m + "-x")
    ),
    product=st.one_of(
        st.none(), st.sampled_from(PRODUCTS), st.sampled_from(PRODUCTS).map(str.upper)
    ),
    vulns=st.lists(st.sampled_from(CVES), max_size=3, unique=True).map(tuple),
    max_cvss=st.one_of(st.none(), st.floats(0, 10)),
)
contexts = st.dictionaries(
    st.sampled_from(CVES),
    st.builds(
        VulnContext,
        kev=st.one_of(
            st.none(),
            st.just(KevEntry(cve="CVE-2019-0708", added=date(2026, 1, 5), ransomware=True)),
        ),
    ),
)


def fresh(*args: object) -> tuple[Severity, tuple[str, ...]]:
    risk._match_cache.clear()
    return assess(*args)  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(services, min_size=1, max_size=8),
    st.sampled_from([None, "org-0", "org-1", "org-2"]),
    contexts,
)
def test_memoized_assessments_equal_fresh_ones(
    batch: list[Service], org: str | None, context: dict[str, VulnContext]
) -> None:
    expected = [fresh(s, POLICY, org, context) for s in batch]
    # Twice over, warm: hits for every service after the first pass.
    for _ in range(2):
        assert [assess(s, POLICY, org, context) for s in batch] == expected


def test_a_policy_with_other_rules_is_matched_against_its_own_rules() -> None:
    service = Service(port=3389, module="rdp")
    before = assess(service, DEFAULT_POLICY)
    renamed = tuple(
        rule.model_copy(update={"name": "Remote desktop", "severity": Severity.LOW})
        if "rdp" in rule.modules
        else rule
        for rule in DEFAULT_POLICY.rules
    )
    other = DEFAULT_POLICY.model_copy(update={"rules": renamed})
    after = assess(service, other)
    assert after != before
    assert after == fresh(service, other)
    assert assess(service, DEFAULT_POLICY) == before


def test_the_cache_stays_bounded() -> None:
    risk._match_cache.clear()
    rule = ServiceRule(name="X", severity=Severity.HIGH, modules=frozenset({"x"}))
    policy = DEFAULT_POLICY.model_copy(update={"rules": (rule,)})
    for port in range(1, risk.MATCH_CACHE_SIZE + 500):
        assess(Service(port=port, module="x"), policy)
    assert len(risk._match_cache) == risk.MATCH_CACHE_SIZE
    assert assess(Service(port=1, module="x"), policy)[0] == Severity.HIGH
