"""The man page and the bash/zsh completions (devtools/cli_docs.py): made from the parser,
current (made anew and compared, so that a new option cannot be left out), complete
(every sub-command and option), and valid (groff renders the page without a warning,
bash and zsh parse the completions, and bash's completes as a user would see it).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess

import pytest

from cachefs.cli import build_parser
from devtools import cli_docs

MAN = cli_docs.MAN_PAGE
BASH = cli_docs.BASH_COMPLETION
ZSH = cli_docs.ZSH_COMPLETION


def test_the_files_are_made_from_the_parser_as_it_is() -> None:
    for path, text in cli_docs.generated().items():
        assert path.exists(), f"{path} is missing: run python -m devtools.cli_docs"
        assert path.read_text() == text, f"{path} is stale: run python -m devtools.cli_docs"


def _every_command_and_option() -> list[tuple[str, list[str]]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = [("", [o for a in parser._actions for o in a.option_strings])]
    for name, subparser in sub.choices.items():
        found.append((name, [o for a in subparser._actions for o in a.option_strings if o not in ("-h", "--help")]))
    return found


def test_the_man_page_lists_every_command_and_option() -> None:
    text = MAN.read_text()
    for command, option_strings in _every_command_and_option():
        if command:
            assert cli_docs.roff(command) in text, command
        for option in option_strings:
            assert f"\\fB{cli_docs.roff(option)}\\fR" in text, f"{command} {option}"
    from cachefs import cli
    for name in [*cli.OWN_OPTIONS, *cli.FUSE_OPTIONS, *cli.FUSE_VALUE_OPTIONS, *cli.FUSE_REFUSED, *cli.MOUNT_ONLY]:
        assert f"\\fB{cli_docs.roff(name)}" in text, f"-o {name}"
    for command in ("mount", "unmount", "umount", "status", "recover"):
        assert f'.SS "cachefs {command}' in text or f", {command}\"" in text, command


def test_the_man_page_renders_without_warnings() -> None:
    groff = shutil.which("groff")
    assert groff, "groff is not installed: scripts/run installs groff-base for the tests"
    result = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(MAN)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stderr, result.stderr
    rendered = subprocess.run([groff, "-man", "-Tascii", "-P", "-cbou", str(MAN)], capture_output=True,
                              text=True, timeout=60).stdout
    assert "--accept-new-host-key" in rendered and "cachefs recover" in rendered


def test_the_bash_completion_parses() -> None:
    result = subprocess.run(["bash", "-n", str(BASH)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _complete(*words: str) -> list[str]:
    """What bash's completion offers after ``cachefs WORDS`` (the last word is completed)."""
    script = (f'source "{BASH}"; COMP_WORDS=(cachefs "$@"); COMP_CWORD=$#; _cachefs; '
              'printf "%s\\n" "${COMPREPLY[@]}"')
    result = subprocess.run(["bash", "-c", script, "complete", *words], capture_output=True, text=True,
                            timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


def test_the_bash_completion_completes_commands_options_and_choices() -> None:
    assert _complete("mo") == ["mount"]
    assert sorted(_complete("un")) == ["unmount", "unpin"]
    assert sorted(_complete("mount", "--cache-")) == ["--cache-dir", "--cache-key-file", "--cache-size"]
    assert sorted(_complete("resolve", "f.txt", "--keep", "")) == ["both", "local", "remote"]
    assert sorted(_complete("mount", "--callbacks", "")) == ["auto", "inotifywait", "off", "python3"]
    assert _complete("mount", "--timeout", "") == []  # a number: nothing to offer
    assert "usr" in _complete("status", "us")  # paths
    for command, option_strings in _every_command_and_option():
        if command:
            offered = set(_complete(command, "-"))
            assert set(option_strings) <= offered, (command, set(option_strings) - offered)


def test_the_zsh_completion_parses() -> None:
    zsh = shutil.which("zsh")
    assert zsh, "zsh is not installed: scripts/run installs it for the tests"
    result = subprocess.run([zsh, "-n", str(ZSH)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = ZSH.read_text()
    assert text.startswith("#compdef cachefs\n")
    for command, option_strings in _every_command_and_option():
        if command:
            assert f"'{command}:" in text, command
        for option in option_strings:
            assert option in text, f"{command} {option}"


@pytest.mark.parametrize("path", [MAN, BASH, ZSH], ids=lambda p: p.name)
def test_the_files_say_they_are_generated(path) -> None:
    assert cli_docs.GENERATED in path.read_text()


#: Types WORDS and a tab into an interactive zsh (zpty) that loads the completion, and
#: prints what the terminal shows, until every expected word is there or 30 s pass.
_ZSH_DRIVER = r"""
zmodload zsh/zpty
zpty z 'zsh -f -i'
zpty -w z "fpath=($1 \$fpath); autoload -Uz compinit; compinit -u -D; setopt nobeep; PROMPT='>'"
zpty -w -n z "$2"$'\t'
shift 2
local seen= chunk
for ((i = 0; i < 300; i++)); do
    while zpty -rt z chunk; do seen+=$chunk; done
    local missing=0 word
    for word in "$@"; do [[ $seen == *"typed"*$word* ]] || missing=1; done
    (( missing )) || break
    seen=${seen/compinit/typed}
    sleep 0.1
done
zpty -d z
print -r -- "$seen"
"""


@pytest.mark.parametrize("line, expected", [
    ("cachefs mo", ["cachefs mount"]),
    ("cachefs mount --cache-", ["--cache-dir", "--cache-key-file", "--cache-size"]),
    ("cachefs resolve x --keep ", ["both", "local", "remote"]),
    ("cachefs mount --callbacks ", ["auto", "inotifywait", "off", "python3"]),
])
def test_the_zsh_completion_completes(line: str, expected: list[str]) -> None:
    zsh = shutil.which("zsh")
    assert zsh, "zsh is not installed: scripts/run installs it for the tests"
    result = subprocess.run([zsh, "-f", "-c", _ZSH_DRIVER, "zsh", str(ZSH.parent), line, *expected],
                            capture_output=True, text=True, timeout=60, cwd="/")
    shown = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]|\r", "", result.stdout)
    after = shown.split("typed", 1)[-1]
    for word in expected:
        assert word in after, f"{line!r}<TAB> did not offer {word!r}: {after[-400:]!r}"
