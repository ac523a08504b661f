"""vhostmd_py.sources.shell.substitution: one-pass safe token substitution (no process runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.vms import TEST_VM, vm_named

from vhostmd_py.errors import ActionError
from vhostmd_py.sources.shell.substitution import substitute


def test_upstream_tokens_byte_identical() -> None:
    """Safe values are inserted verbatim: the command is upstream's."""
    uri = "test:///default"
    assert (
        substitute("virsh CONNECT dominfo NAME | awk '/^CPU/ {print $2}'", TEST_VM, uri)
        == "virsh --connect 'test:///default' dominfo test | awk '/^CPU/ {print $2}'"
    )
    assert (
        substitute("echo NAME-VMID-UUID", TEST_VM, uri)
        == "echo test-1-6695eb01-f6a4-8304-79aa-97f2502e193f"
    )


def test_connect_without_uri_is_empty() -> None:
    """CONNECT becomes nothing without -c (upstream)."""
    assert substitute("virsh CONNECT list", None, None) == "virsh  list"


def test_host_context_replaces_only_connect() -> None:
    """In host context NAME/VMID/UUID/ID stay literal (edge-4k HostNameToken)."""
    assert substitute("echo NAME VMID UUID ID CONNECT", None, "qemu:///system") == (
        "echo NAME VMID UUID ID --connect 'qemu:///system'"
    )


def test_one_pass_no_rescan() -> None:
    """A VM named UUID keeps its name (upstream replaced it again)."""
    vm = vm_named("UUID", 3)
    assert substitute("echo NAME", vm, None) == "echo UUID"
    assert substitute("echo NAME:UUID", vm_named("VMID", 4), None) == (
        "echo VMID:00000000-0000-4000-8000-000000000004"
    )


def test_whole_word_id() -> None:
    """ID is replaced as a whole word only, without breaking VMID/UUID."""
    vm = vm_named("x", 42)
    assert substitute("echo ID VMID UUID ID_X IDS xID", vm, None) == (
        "echo 42 42 00000000-0000-4000-8000-000000000042 ID_X IDS xID"
    )


def test_plain_text_replacement_kept() -> None:
    """Upstream replaces tokens inside words too (HOSTNAME -> HOST<name>): kept."""
    assert substitute("echo HOSTNAME", vm_named("vm1"), None) == "echo HOSTvm1"


def test_unsafe_value_quoted_unquoted_refused_in_quotes() -> None:
    """Unsafe values: shell-quoted when unquoted, refused inside quotes; safe ones verbatim."""
    vm = vm_named("it's")
    assert substitute("echo NAME", vm, None) == "echo 'it'\"'\"'s'"
    for action in ("echo 'NAME'", 'echo "NAME"', "echo 'pre NAME post'"):
        with pytest.raises(ActionError, match="quoted text may be code"):
            substitute(action, vm, None, metric="M")
    assert substitute("echo 'NAME'", vm_named("vm0001"), None) == "echo 'vm0001'"


@pytest.mark.parametrize(
    ("action", "why"),
    [
        ("sh -c 'virsh dominfo NAME'", "single-quoted"),
        ('bash -c "virsh dominfo NAME"', "double-quoted"),
        ("awk '/NAME/ {print}' /etc/hosts", "single-quoted"),
        ("ssh host \"virsh dominfo NAME\"", "double-quoted"),
        ("eval virsh dominfo NAME", "'eval'"),
        ("ssh host virsh dominfo NAME", "'ssh'"),
        ("sudo -u qemu virsh dominfo NAME", "'sudo'"),
        ("echo NAME | xargs virsh dominfo", "'xargs'"),
        ("/bin/sh -ec \"true\" NAME", "'/bin/sh"),
    ],
)
def test_second_interpreter_never_gets_an_unsafe_value(
    action: str, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quoted text and eval/ssh/sh -c re-read values as code: unsafe names are refused there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ActionError) as info:
        substitute(action, vm_named("a;touch INJECTED"), None, metric="M")
    assert why in info.value.reason
    # The same action with a plain name is upstream's command, unchanged.
    assert substitute(action, vm_named("vm0001"), None) == action.replace("NAME", "vm0001")


def test_unsafe_uri_quoted() -> None:
    """A URI with shell characters is quoted, never run."""
    uri = "qemu+ssh://root@h/system?x=1;touch Q"
    assert substitute("virsh CONNECT list", None, uri) == (
        "virsh --connect 'qemu+ssh://root@h/system?x=1;touch Q' list"
    )
    with pytest.raises(ActionError, match="double-quoted"):
        substitute('echo "CONNECT"', None, uri)


@pytest.mark.parametrize(
    ("action", "why"),
    [
        ("echo $(echo NAME)", "$(...)"),
        ("echo `echo NAME`", "backticks"),
        ("cat <<EOF\nNAME\nEOF", "here-document"),
        ("true # NAME", "comment"),
        ("echo \\NAME", "backslash"),
        ("echo $NAME", "follows a $"),  # a variable name upstream: never quotable
        ("echo ${NAME}", "${...}"),
        ("echo 'NAME", "unbalanced"),
        ("case x in x) echo NAME;; esac", "parentheses"),
        ('echo "$(echo "NAME")"', "$(...)"),
    ],
)
def test_unsure_context_refused_for_unsafe_values(action: str, why: str) -> None:
    """Where the quoting context is unclear an unsafe value refuses the metric."""
    with pytest.raises(ActionError) as info:
        substitute(action, vm_named("a;touch Y"), None, metric="M")
    assert info.value.metric == "M"
    assert info.value.vm == "a;touch Y"
    assert why in info.value.reason
    # A safe value needs no quoting and is fine anywhere.
    assert "vm0001" in substitute(action, vm_named("vm0001"), None)


def test_subshell_parentheses_are_transparent() -> None:
    """A ( ... ) subshell keeps normal quoting rules."""
    assert substitute("(echo NAME)", vm_named("a b"), None) == "(echo 'a b')"


def test_nul_in_value_refused() -> None:
    """A NUL can never be passed to a process: refused."""
    with pytest.raises(ActionError):
        substitute("echo NAME", vm_named("a\x00b"), None)


def test_id_token_leaves_shell_variables_alone() -> None:
    """Whole-word ID is substituted, but $ID and ${ID} are the user's shell variables."""
    vm = vm_named("vm5")
    assert substitute("echo ID x-ID-y", vm, None) == "echo 5 x-5-y"
    assert substitute("echo $ID ${ID} IDX", vm, None) == "echo $ID ${ID} IDX"
