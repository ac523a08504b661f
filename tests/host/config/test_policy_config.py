"""vhostmd.conf's <policy> section: rules, where they come from, errors with file:line."""

from __future__ import annotations

import pytest
from helpers.config import config_text

from vhostmd_py.config import parse_config
from vhostmd_py.config.policy import resolve
from vhostmd_py.config.records import DEFAULT_REFRESH, Rule
from vhostmd_py.errors import ConfigError


def _conf(policy: str) -> bytes:
    return config_text("/dev/shm/vhostmd-test", [("M", "uint64", "host", "echo 1")],
                       after_metrics=policy).encode()


def test_no_policy_section_is_upstream_behaviour() -> None:
    assert parse_config(_conf("")).policy is None


def test_policy_rules_by_name_and_uuid() -> None:
    config = parse_config(_conf(
        '<policy refresh="1w"><policy_default shared="no"><deny>HostName</deny></policy_default>'
        '<policy_vm name="sap01"><allow>VCpus</allow><allow>Total*</allow></policy_vm>'
        '<policy_vm uuid="ABCDEF01-0000-0000-0000-000000000000" blocked="yes"/></policy>\n'))
    policy = config.policy
    assert policy is not None
    assert policy.refresh == 7 * 86400 and policy.metadata is True
    assert policy.default == Rule(deny=("HostName",), shared=False)
    assert policy.by_name["sap01"] == Rule(allow=("VCpus", "Total*"))
    where, rule = policy.config_rule("other", "abcdef01-0000-0000-0000-000000000000") or ("", None)
    assert rule == Rule(blocked=True) and "uuid=abcdef01" in where


def test_policy_defaults() -> None:
    policy = parse_config(_conf("<policy/>\n")).policy
    assert policy is not None
    assert policy.refresh == DEFAULT_REFRESH and policy.metadata is True
    assert policy.default == Rule()


@pytest.mark.parametrize("section, wording", [
    ('<policy>\n<policy_vm><deny>X</deny></policy_vm></policy>\n', "exactly one of name= or uuid="),
    ('<policy>\n<policy_vm name="a" uuid="b"/></policy>\n', "exactly one of name= or uuid="),
    ('<policy>\n<policy_vm name="a"/><policy_vm name="a"/></policy>\n', "given twice"),
    ('<policy>\n<policy_default><allow> </allow></policy_default></policy>\n', "is empty"),
    ('<policy refresh="soon">\n</policy>\n', "refresh"),
    ('<policy refresh="0">\n</policy>\n', "out of range"),
    ('<policy>\n<policy_default blocked="maybe"/></policy>\n', "DTD"),
])
def test_policy_errors_name_the_file_and_line(section: str, wording: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_conf(section), file="vhostmd.conf")
    assert wording in str(err.value)
    assert err.value.file == "vhostmd.conf" and err.value.line is not None


def test_resolve_takes_each_field_from_the_first_rule_that_says_it() -> None:
    got = resolve(("metadata", Rule(deny=("A",))),
                  ("config policy_default", Rule(allow=("A", "B"), shared=False)))
    assert got.deny == ("A",) and got.allow == ("A", "B") and got.shared is False
    assert got.blocked is False
    assert got.origin == {"deny": "metadata", "allow": "config policy_default",
                          "shared": "config policy_default", "blocked": "built-in"}
    assert got.sees("B") and not got.sees("A") and not got.sees("C")
