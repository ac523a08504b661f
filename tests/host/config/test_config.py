"""Tests of vhostmd_py.config: DTD validation, records, errors with file and line."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import List

import pytest
from helpers import DATA as TEST_DATA

from vhostmd_py.config import (
    DEFAULT_CHANNEL_PATH,
    Config,
    MetricSpec,
    Variable,
    default_dtd_path,
    load_config,
)
from vhostmd_py.errors import ConfigError

DATA = TEST_DATA / "configs"


def _golden_configs(golden: Path) -> List[Path]:
    up = sorted((golden / "upstream" / "configs").glob("*.xml"))
    ref = sorted((golden / "reference-configs").glob("*.conf"))
    return [*up, *ref, golden / "reference-configs" / "upstream-vhostmd.xml"]


def _variant(golden: Path, tmp_path: Path, old: str, new: str, name: str = "variant.xml") -> Path:
    """basic-1k.xml with one edit, like upstream's daemon-cli cases."""
    text = (golden / "upstream" / "configs" / "basic-1k.xml").read_text()
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new, 1))
    return path


def test_every_golden_config_loads(golden: Path) -> None:
    """Every upstream and reference config is accepted."""
    paths = _golden_configs(golden)
    assert len(paths) >= 19
    for path in paths:
        config = load_config(path)
        assert isinstance(config, Config)
        assert config.metrics, path


def test_basic_config_records(golden: Path) -> None:
    """basic-1k becomes the expected frozen records."""
    path = golden / "upstream" / "configs" / "basic-1k.xml"
    config = load_config(path)
    assert config.file == str(path)
    assert config.disk_name == "host-metrics-disk"
    assert config.disk_path == "/dev/shm/vhostmd-anchor/basic-1k/vhostmd0"
    assert config.disk_size == 1024
    assert config.update_period == 1
    assert config.path == "/usr/sbin:/sbin:/usr/bin:/bin"
    assert config.transports == ("vbd",)
    assert [m.name for m in config.metrics] == ["Answer", "Greeting", "Pair", "Ident", "VCpus"]
    assert config.metrics[2] == MetricSpec(
        name="Pair",
        type="group",
        context="host",
        action="echo 1,2",
        unit=None,
        variables=(Variable("First", "uint32"), Variable("Second", "uint32")),
    )
    assert config.metrics[4].action == (
        "virsh CONNECT dominfo NAME | awk '/^CPU\\(s\\)/ {print $2}'"
    )
    assert [m.name for m in config.host_metrics()] == ["Answer", "Greeting", "Pair"]
    assert [m.name for m in config.vm_metrics()] == ["Ident", "VCpus"]


def test_records_are_frozen(golden: Path) -> None:
    """Config records cannot be modified after loading."""
    config = load_config(golden / "upstream" / "configs" / "basic-1k.xml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.update_period = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.metrics[0].action = "rm -rf /"  # type: ignore[misc]


def test_units_and_sizes(golden: Path, tmp_path: Path) -> None:
    """k/K x1024, m/M x1048576, empty unit = bytes."""
    cases = {'unit="k">1<': 1024, 'unit="K">2<': 2048, 'unit="m">1<': 1048576}
    cases.update({'unit="M">256<': 268435456, 'unit="">4096<': 4096})
    for new, size in cases.items():
        path = _variant(golden, tmp_path, 'unit="k">1<', new)
        assert load_config(path).disk_size == size, new


def test_edge_config_units_and_group_unit(golden: Path) -> None:
    """A metric's unit is kept; group variables keep their own types."""
    config = load_config(golden / "upstream" / "configs" / "edge-4k.xml")
    by_name = {m.name: m for m in config.metrics}
    assert by_name["GroupUnit"].unit == "MiB"
    assert by_name["GroupUnit"].variables == (
        Variable("GU1", "uint64"),
        Variable("GU2", "uint64"),
    )
    assert by_name["MultiLine"].unit == "s"
    assert by_name["Long"].unit is None
    assert by_name["XmlMetric"].action.startswith("echo \"<metric type='uint32'")


def test_virtio_defaults_and_readme_example(golden: Path) -> None:
    """<virtio> without channel_path (upstream README example) gets libvirt's default directory."""
    config = load_config(golden / "reference-configs" / "readme-example.conf")
    assert config.virtio.channel_path == DEFAULT_CHANNEL_PATH
    assert config.virtio.max_channels == 1024
    assert config.virtio.expiration_time == 15  # 15 >= 3 x 5
    assert config.transports == ("vbd", "virtio")
    upstream = load_config(golden / "reference-configs" / "upstream-vhostmd.xml")
    assert upstream.virtio.channel_path == "/var/run/libvirt/qemu/channel"


def test_expiration_raised_to_three_periods(golden: Path) -> None:
    """expiration_time is raised to 3 x update_period, as upstream."""
    sap = load_config(golden / "reference-configs" / "rhel-sap-vhostmd.conf")
    assert sap.update_period == 60
    assert sap.virtio.expiration_time == 180


def test_multiline_action_stripped_but_kept_verbatim(golden: Path) -> None:
    """Leading/trailing whitespace of an action goes, its inner text stays."""
    config = load_config(golden / "reference-configs" / "upstream-vhostmd.xml")
    action = {m.name: m.action for m in config.metrics}["UsedMem"]
    assert action.startswith("[ -f /proc/xen/privcmd ] && echo")
    assert action.endswith("awk '{ printf \"%d\\n\", $3/1024; }'")
    assert "|| \\\n          free" in action


def test_skipped_metrics_warn_with_file_and_line(caplog: pytest.LogCaptureFixture) -> None:
    """Unusable metrics are skipped with a warning naming file:line; the rest loads."""
    path = DATA / "skipped-metrics.xml"
    with caplog.at_level(logging.WARNING, logger="vhostmd_py.config"):
        config = load_config(path)
    assert [m.name for m in config.metrics] == ["Kept"]
    kept = config.metrics[0]
    assert kept.unit is None  # empty unit attribute = no unit
    assert kept.action == "echo one \\\n          two  three"  # comment not part of it
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{path}:21: skipping metric without a name" in m for m in messages)
    assert any(f"{path}:25: skipping metric NoAction: empty action" in m for m in messages)
    assert any(f"{path}:29: skipping group metric NoVariables" in m for m in messages)
    # Transports deduplicated, order kept; virtio defaults and raised expiration.
    assert config.transports == ("virtio", "vbd")
    assert config.virtio.max_channels == 4
    assert config.virtio.expiration_time == 30
    assert config.disk_size == 65536


def test_small_disk_warns(golden: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A disk under 64 KiB is accepted with a warning (upstream guests cannot read it)."""
    small = golden / "upstream" / "configs" / "basic-1k.xml"
    with caplog.at_level(logging.WARNING, logger="vhostmd_py.config"):
        load_config(small)
    assert any(
        "smaller than 65536" in r.getMessage() and f"{small}:9" in r.getMessage()
        for r in caplog.records
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vhostmd_py.config"):
        load_config(golden / "upstream" / "configs" / "basic-64k.xml")
    assert not any("smaller than" in r.getMessage() for r in caplog.records)


def test_no_doctype_is_validated_against_ours() -> None:
    """DEVIATION: a config without DOCTYPE is accepted (upstream: "no DTD found")."""
    config = load_config(DATA / "no-doctype.xml")
    assert config.disk_size == 1048576
    assert config.metrics[0].name == "Answer"


def test_no_doctype_still_validated(tmp_path: Path) -> None:
    """Without DOCTYPE the file is still checked against our grammar."""
    text = (DATA / "no-doctype.xml").read_text().replace("<path>/bin", "<bogus/><path>/bin")
    path = tmp_path / "nodoc-bogus.xml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.line == 10
    assert "bogus" in info.value.reason


def test_doctype_location_ignored(golden: Path, tmp_path: Path) -> None:
    """The DOCTYPE's system id is never fetched; our shipped grammar is used."""
    path = _variant(
        golden,
        tmp_path,
        'SYSTEM "vhostmd.dtd"',
        'SYSTEM "http://198.51.100.1/evil.dtd"',
    )
    assert load_config(path).disk_size == 1024


def test_dtd_violation_names_file_line_reason(golden: Path, tmp_path: Path) -> None:
    """Upstream's dtd-invalid case: the first DTD error's line and message."""
    path = _variant(
        golden, tmp_path, "<transport>vbd</transport>", "<transport>vbd</transport><bogus/>"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.file == str(path)
    # upstream: "dtd-invalid.xml:13: element bogus: validity error : No declaration ..."
    assert err.line == 13
    assert "No declaration for element bogus" in err.reason
    assert str(err).startswith(f"{path}:13: ")


def test_syntax_error_names_line(golden: Path, tmp_path: Path) -> None:
    """A malformed file is refused with the line of the syntax error."""
    path = _variant(golden, tmp_path, "<update_period>1</update_period>", "<update_period>1")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.line is not None and info.value.line >= 11
    assert "XML syntax error" in info.value.reason


def test_missing_file(tmp_path: Path) -> None:
    """An unreadable file names the file and the OS reason."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.xml")
    assert info.value.file == str(tmp_path / "nope.xml")
    assert "could not read file" in info.value.reason
    assert isinstance(info.value.__cause__, FileNotFoundError)


@pytest.mark.parametrize(
    ("case", "old", "new", "line"),
    [
        ("size-too-small", 'unit="k">1<', 'unit="k">0<', 9),
        ("size-bad-unit", 'unit="k">1<', 'unit="b">1<', 9),
        ("size-too-big", 'unit="k">1<', 'unit="m">257<', 9),
        ("period-zero", "<update_period>1<", "<update_period>0<", 11),
        ("xenstore", "<transport>vbd<", "<transport>xenstore<", 13),
    ],
)
def test_semantic_errors_match_upstream_wording(
    golden: Path, tmp_path: Path, case: str, old: str, new: str, line: int
) -> None:
    """Upstream's daemon-cli cases: same message, plus file and line."""
    path = _variant(golden, tmp_path, old, new, f"{case}.xml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    upstream_first_line = (
        (golden / "upstream" / "daemon-cli" / f"{case}.stderr").read_text().splitlines()[0]
    )
    assert upstream_first_line in info.value.reason
    assert info.value.line == line
    assert info.value.file == str(path)


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("<transport>vbd<", "<transport>carrier-pigeon<", "Unknown transport 'carrier-pigeon'"),
        ("<update_period>1<", "<update_period>soon<", "update_period 'soon' is not an integer"),
        ('unit="k">1<', 'unit="k">lots<', "disk size 'lots' is not an integer"),
        (
            "<update_period>",
            "<virtio><max_channels>0</max_channels><expiration_time>15</expiration_time>"
            "</virtio><update_period>",
            "max_channels (0) less than minimum supported (1)",
        ),
        ('<metric type="int32"', '<metric type="float"', "fails DTD validation"),
        ('<metric type="int32" context="host"', '<metric type="int32"', "fails DTD validation"),
    ],
)
def test_other_invalid_settings(
    golden: Path, tmp_path: Path, old: str, new: str, reason: str
) -> None:
    """Other bad settings are refused with a clear reason and a line."""
    with pytest.raises(ConfigError) as info:
        load_config(_variant(golden, tmp_path, old, new))
    assert reason in info.value.reason
    assert info.value.line is not None


def test_entities_are_refused_not_expanded(golden: Path, tmp_path: Path) -> None:
    """Entity tricks (XXE, billion laughs) never reach an action."""
    text = (golden / "upstream" / "configs" / "basic-1k.xml").read_text()
    text = text.replace(
        '<!DOCTYPE vhostmd SYSTEM "vhostmd.dtd">',
        '<!DOCTYPE vhostmd [<!ENTITY x SYSTEM "file:///etc/passwd"><!ENTITY a "aaaa">]>',
    ).replace("<action>echo 42</action>", "<action>echo &x;&a;</action>")
    path = tmp_path / "entities.xml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "entity reference" in info.value.reason


def test_shipped_grammars(golden: Path, repo_root: Path) -> None:
    """vhostmd.dtd = upstream's with channel_path optional and <source>, plus optional extensions.

    The extensions (<history>, <metrics_endpoint>, <disk_per_vm>, <freshness> in
    <globals>; <alarms>, <accounting> and <policy> after <metrics>) only add elements:
    every upstream config stays valid.
    """
    text = (repo_root / "vhostmd.dtd").read_text()
    history = text.index("<!-- vhostmd-py extension, optional: the RRD history")
    metrics = text.index("<!ELEMENT metrics (")
    monitoring = text.index("<!-- vhostmd-py extension (optional, docs/man/vhostmd.conf.5): alarms")
    ours = (text[:history] + text[metrics:monitoring]).rstrip("\n").splitlines()
    theirs = (golden / "reference-configs" / "vhostmd.dtd").read_text().rstrip("\n").splitlines()
    changed = {
        "<!ELEMENT vhostmd (globals,metrics)>":
            ["<!ELEMENT vhostmd (globals,metrics,alarms?,accounting?,policy?)>"],
        "<!ELEMENT globals (disk,virtio*,update_period,path,transport+)>":
            ["<!ELEMENT globals (disk,virtio*,update_period,path,transport+,history?,"
             "metrics_endpoint?,disk_per_vm?,freshness?)>"],
        "<!ELEMENT virtio (channel_path,max_channels,expiration_time)>":
            ["<!ELEMENT virtio (channel_path?,max_channels,expiration_time)>"],
        "<!ELEMENT metric (name,action,variable*)>":
            ["<!ELEMENT metric (name,(action|source),variable*)>"],
        "<!ELEMENT action (#PCDATA)>": [
            "<!ELEMENT action (#PCDATA)>",
            "<!-- vhostmd-py: a built-in source field instead of a shell action",
            "     (vhostmd.conf(5), docs/METRICS.md) -->",
            "<!ELEMENT source (#PCDATA)>",
        ],
    }
    expected = [out for line in theirs for out in changed.get(line, [line])]
    assert sum(line in changed for line in theirs) == len(changed)
    assert ours == expected
    # The extensions only add declarations, never redeclare upstream's.
    declared = {line.split()[1] for line in theirs if line.startswith("<!ELEMENT")}
    extension = (text[history:metrics] + text[monitoring:]).splitlines()
    added = [line.split()[1] for line in extension if line.startswith("<!ELEMENT")]
    assert {"history", "metrics_endpoint", "alarms", "accounting"} <= set(added)
    assert not declared & set(added)
    assert (repo_root / "metric.dtd").read_bytes() == (
        golden / "reference-configs" / "metric.dtd"
    ).read_bytes()
    assert Path(default_dtd_path()).read_bytes() == (repo_root / "vhostmd.dtd").read_bytes()
    assert (repo_root / "vhostmd_py" / "data" / "metric.dtd").read_bytes() == (
        repo_root / "metric.dtd"
    ).read_bytes()


def test_explicit_dtd_parameter(golden: Path, tmp_path: Path) -> None:
    """The grammar path is a parameter; upstream's strict DTD refuses the README example."""
    strict = golden / "reference-configs" / "vhostmd.dtd"
    with pytest.raises(ConfigError) as info:
        load_config(golden / "reference-configs" / "readme-example.conf", dtd=strict)
    assert "virtio" in info.value.reason
    missing = tmp_path / "missing.dtd"
    with pytest.raises(ConfigError) as info2:
        load_config(golden / "upstream" / "configs" / "basic-1k.xml", dtd=missing)
    assert "grammar" in info2.value.reason
