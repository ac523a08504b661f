"""One grammar of sizes and durations for the whole file (vhostmd.conf(5), VALUES).

Every element or attribute that takes a duration reads ``1w`` as 604800 seconds,
every one that takes a size reads every unit form the same way, and text the
grammar does not describe is a ConfigError naming the file and the line.
"""

from __future__ import annotations

from typing import Callable, Dict

import pytest
from click.testing import CliRunner
from helpers.config import config_text

from vhostmd_py.config import (
    DEFAULT_STATE_DIR,
    NO_BUILTIN_FIELDS,
    Config,
    parse_config,
    parse_duration,
    parse_size,
    records,
    units,
)
from vhostmd_py.ctl.main import main as vhostmdctl
from vhostmd_py.errors import ConfigError

WEEK = 7 * 86400
DISK = "/dev/shm/unused"
VM = '<vm name="web">'


def alarms(period: str = "60", inhibit: str = "3600") -> str:
    """An <alarms> section whose VM variable has these trigger and inhibit periods."""
    return (
        "  <alarms>\n"
        "    <alarm><name>cpu_usage</name><alarm_trigger_level>90</alarm_trigger_level>"
        f"<alarm_trigger_period>{period}</alarm_trigger_period>"
        f"<alarm_auto_inhibit_period>{inhibit}</alarm_auto_inhibit_period></alarm>\n"
        "  </alarms>\n"
    )


def accounting(period: str = "1d", offset: str = "0", tx: str = "1G", vm_rx: str = "1G") -> str:
    """An <accounting> section with a default budget and one per-VM override."""
    return (
        f'  <accounting period="{period}" period_offset="{offset}">\n'
        f'    <budget tx="{tx}"/>\n'
        f'    {VM}<budget rx="{vm_rx}"/></vm>\n'
        "  </accounting>\n"
    )


def load(*, extra: str = "", after: str = "", size: str = "64", unit: str = "k") -> Config:
    """The test config with EXTRA at the end of <globals> and AFTER after <metrics>."""
    text = config_text(DISK, [("Stamp", "string", "host", "echo one")], size=size, unit=unit,
                       extra=extra, after_metrics=after)
    return parse_config(text.encode(), file="units.conf")


def line_of(fragment: str, *, extra: str = "", after: str = "") -> int:
    """The line of the test config on which FRAGMENT starts."""
    text = config_text(DISK, [("Stamp", "string", "host", "echo one")], extra=extra,
                       after_metrics=after)
    return next(i for i, line in enumerate(text.splitlines(), 1) if fragment in line)


# Every place of the file that takes a duration: (config fragments, the value read).
DURATIONS: Dict[str, Callable[[str], Config]] = {
    "history retention": lambda d: load(extra=f'<history retention="{d}"/>'),
    "history heartbeat": lambda d: load(extra=f'<history heartbeat="{d}"/>'),
    "accounting period": lambda d: load(after=accounting(period=d)),
    "accounting period_offset": lambda d: load(after=accounting(period="2w", offset=d)),
    "alarm_trigger_period": lambda d: load(after=alarms(period=d)),
    "alarm_auto_inhibit_period": lambda d: load(after=alarms(inhibit=d)),
}
READ: Dict[str, Callable[[Config], int]] = {
    "history retention": lambda c: c.history.retention if c.history else -1,
    "history heartbeat": lambda c: c.history.heartbeat or -1 if c.history else -1,
    "accounting period": lambda c: c.accounting.period if c.accounting else -1,
    "accounting period_offset": lambda c: c.accounting.period_offset if c.accounting else -1,
    "alarm_trigger_period":
        lambda c: c.alarms.variables_for_vm("u", "x")[0].alarm_trigger_period
        if c.alarms else -1,
    "alarm_auto_inhibit_period":
        lambda c: c.alarms.variables_for_vm("u", "x")[0].alarm_auto_inhibit_period
        if c.alarms else -1,
}


@pytest.mark.parametrize("where", sorted(DURATIONS))
@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1w", WEEK), (" 1 w ", WEEK), ("2d", 2 * 86400), ("3h", 3 * 3600), ("90m", 5400),
     ("45s", 45), ("600", 600)],
)
def test_every_duration_takes_every_unit_including_weeks(where: str, text: str,
                                                         seconds: int) -> None:
    """`1w` (and s, m, h, d, none) reads the same in every section that takes a duration."""
    assert READ[where](DURATIONS[where](text)) == seconds


def test_disk_per_vm_grace_reads_weeks_and_checks_its_range() -> None:
    """grace= reads `1w` as 604800 s, over its 3-day maximum: refused naming that number."""
    grace = load(extra='<disk_per_vm path="/dev/shm/v/%u" grace="2d"/>').disk_per_vm
    assert grace is not None and grace.grace == 2 * 86400
    with pytest.raises(ConfigError, match=f"disk_per_vm grace {WEEK} is out of range"):
        load(extra='<disk_per_vm path="/dev/shm/v/%u" grace="1w"/>')


@pytest.mark.parametrize("where", sorted(DURATIONS))
@pytest.mark.parametrize("text", ["1x", "w", "1.5h", "-1d", "1 2d", "1_000", "\u0661\u0662"])
def test_text_that_is_no_duration_is_refused_with_file_and_line(where: str, text: str) -> None:
    """Anything else is a ConfigError naming the file and the element's line (perfmon's
    alarm periods also keep what Python's int() reads, as perfmon does)."""
    if where.startswith("alarm_") and text in ("1_000", "\u0661\u0662"):
        assert READ[where](DURATIONS[where](text)) in (1000, 12)
        return
    with pytest.raises(ConfigError) as info:
        DURATIONS[where](text)
    assert info.value.file == "units.conf"
    assert info.value.line is not None
    assert repr(text) in info.value.reason or f"'{text}'" in info.value.reason


def test_the_error_names_the_line_of_the_attribute() -> None:
    """history retention's error is on <history>'s line."""
    extra = '<history retention="1x"/>'
    with pytest.raises(ConfigError) as info:
        load(extra=extra)
    assert info.value.line == line_of("<history", extra=extra)
    assert "history retention: '1x' is not a duration" in info.value.reason


def test_upstream_elements_keep_plain_integers() -> None:
    """<update_period> is upstream's integer of seconds: `1m` is refused there, as upstream."""
    text = config_text(DISK, [("Stamp", "string", "host", "echo one")], period="1m")
    with pytest.raises(ConfigError, match="update_period '1m' is not an integer"):
        parse_config(text.encode())


SIZE_FORMS = {
    "1024": 1024, "1024B": 1024,
    "64k": 64 << 10, "64K": 64 << 10, "64kB": 64 << 10, "64KB": 64 << 10, "64KiB": 64 << 10,
    "64kiB": 64 << 10, "2m": 2 << 20, "2M": 2 << 20, "2MB": 2 << 20, "2MiB": 2 << 20,
    "3g": 3 << 30, "3G": 3 << 30, "3GB": 3 << 30, "3GiB": 3 << 30,
    "4t": 4 << 40, "4T": 4 << 40, "4TB": 4 << 40, "4TiB": 4 << 40,
}


def _split(form: str) -> tuple[str, str]:
    digits = form.rstrip("kKmMgGtTiB")
    return digits, form[len(digits):]


@pytest.mark.parametrize("form", sorted(SIZE_FORMS))
def test_budgets_take_every_size_form(form: str) -> None:
    """<budget tx=> (the default) and <vm><budget rx=> (an override) read every form."""
    number, unit = _split(form)
    config = load(after=accounting(tx=form, vm_rx=f"{number} {unit}"))
    assert config.accounting is not None
    assert config.accounting.budget.tx == SIZE_FORMS[form]
    assert config.accounting.budget_for("u", "web").rx == SIZE_FORMS[form]


@pytest.mark.parametrize("form", sorted(SIZE_FORMS))
def test_disk_sizes_take_every_unit_form(form: str) -> None:
    """<size unit=> and <disk_per_vm size= unit=> read every unit the same way; a size
    outside 1 KiB .. 256 MiB is refused naming the size in bytes the unit made."""
    number, unit = _split(form)
    size = SIZE_FORMS[form]
    per_vm = f'<disk_per_vm path="/dev/shm/v/%u" size="{number}" unit="{unit}"/>'
    if units.DISK_SIZE_RANGE[0] <= size <= units.DISK_SIZE_RANGE[1]:
        config = load(size=number, unit=unit, extra=per_vm)
        assert config.disk_size == size
        assert config.disk_per_vm is not None and config.disk_per_vm.size == size
        return
    for kwargs in ({"size": number, "unit": unit}, {"extra": per_vm}):
        with pytest.raises(ConfigError, match=rf"Specified metrics disk size \({size}\) not"):
            load(**kwargs)


@pytest.mark.parametrize("text", ["10X", "G", "10 G B", "-5M", "1.5G", "1_0G", "10kk"])
def test_text_that_is_no_size_is_refused_with_file_and_line(text: str) -> None:
    """A budget the grammar does not describe: ConfigError at the <budget>'s line."""
    after = accounting(tx=text)
    with pytest.raises(ConfigError) as info:
        load(after=after)
    assert info.value.line == line_of("<budget", after=after)
    assert f"tx={text!r} is not a size" in info.value.reason


def test_unknown_disk_unit_keeps_upstreams_wording() -> None:
    """`b` is no unit: upstream's "(-1)" message (golden daemon-cli/size-bad-unit)."""
    with pytest.raises(ConfigError, match=r"disk size \(-1\) not within supported range"):
        load(unit="b")


def test_parsers_directly() -> None:
    """The grammar itself: the units and the limit on digits."""
    assert [parse_duration(t) for t in ("0", "1s", "1m", "1h", "1d", "1w")] == [
        0, 1, 60, 3600, 86400, WEEK]
    assert parse_size("10 GiB") == 10 << 30
    assert units.size_factor("") == 1 and units.size_factor("B") == 1
    assert units.size_factor("b") is None and units.size_factor("kb") is None
    for bad in ("1" * 19, "1" * 5000):
        with pytest.raises(ValueError):
            parse_duration(bad)
        with pytest.raises(ValueError):
            parse_size(bad)


def test_one_state_directory_default() -> None:
    """The history's default, the monitors', vhostmdctl's: one constant."""
    assert records.HistoryConfig().state_dir == DEFAULT_STATE_DIR == units.DEFAULT_STATE_DIR
    option = next(p for p in vhostmdctl.params if p.name == "state_dir")
    assert option.default == DEFAULT_STATE_DIR


def test_vhostmdctl_since_takes_weeks() -> None:
    """`--since 1w` passes the option check (then fails on the missing state directory);
    `--since 1x` is a usage error."""
    runner = CliRunner()
    missing = ["--state-dir", "/nonexistent/vhostmd-state"]
    week = runner.invoke(vhostmdctl, [*missing, "history", "--vm", "host", "--metric", "cpu",
                                      "--since", "1w"])
    assert week.exit_code == 1, week.output
    assert "state directory does not exist" in week.output
    bad = runner.invoke(vhostmdctl, [*missing, "history", "--vm", "host", "--metric", "cpu",
                                     "--since", "1x"])
    assert bad.exit_code == 2
    assert "'1x' is not a duration" in bad.output


def test_no_builtin_fields_unless_handed_in() -> None:
    """The parser knows the built-in fields it is given, and no others."""

    class Field:
        context = "host"
        kind = "int"
        variables = ()

        def compatible_types(self) -> tuple[str, ...]:
            return ("uint64",)

    metric = ('<metric type="uint64" context="host"><name>X</name>'
              "<source>made.up</source></metric>")
    text = config_text(DISK, [metric]).encode()
    with pytest.raises(ConfigError, match=r"unknown built-in source field 'made\.up'; known: $"):
        parse_config(text, builtin_fields=NO_BUILTIN_FIELDS)
    config = parse_config(text, builtin_fields={"made.up": Field()})
    assert config.metrics[0].source == "made.up"
