"""The documentation tells the truth about the command line, links, and the Vagrant lab.

- Every ``cachefs ...`` and ``python mount.py ...`` command in a shell code block of
  README.md and docs/*.md (and every such line in vagrant/*.sh) names a real sub-command,
  uses only options that sub-command's argparse parser accepts, and parses as a whole.
- Every ``/etc/fstab`` line in a ```fstab block uses only ``-o`` options cachefs knows.
- Every relative link in README.md and docs/*.md points to an existing file.
- vagrant/Vagrantfile is valid Ruby (``ruby -c``; ruby must be installed: this test fails
  rather than skips without it), vagrant/*.sh are valid bash (``bash -n``), and
  ``vagrant validate --ignore-provider`` passes.

No network, no mounts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from cachefs import cli

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
VAGRANT = REPO / "vagrant"

SHELL_LANGS = {"sh", "bash", "console", "shell"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<lang>[\w+-]*)[^\n]*$")
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", "{", "}", "!", "then", "do", "else", "if", "while", "until"}
PREFIX_COMMANDS = {"sudo", "env", "exec", "time", "nohup", "command", "run", "as_vagrant"}


def markdown_files() -> list[Path]:
    files = sorted(DOCS.glob("*.md")) + [REPO / "README.md"]
    if (VAGRANT / "README.md").exists():
        files.append(VAGRANT / "README.md")
    return [f for f in files if f.exists()]


def code_blocks(path: Path) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of each fenced code block."""
    blocks = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group("fence"), m.group("lang").lower(), i + 1
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence[:3]):
            body.append(lines[i])
            i += 1
        blocks.append((lang, start + 1, body))
        i += 1
    return blocks


def shell_lines(lines: list[str], console: bool) -> list[tuple[int, str]]:
    """Logical command lines (continuations joined, comments dropped, prompts removed)."""
    out: list[tuple[int, str]] = []
    pending = ""
    pending_no = 0
    for no, raw in enumerate(lines):
        line = raw.rstrip()
        if console:
            if not pending:
                if not line.lstrip().startswith("$ "):
                    continue  # output, not a command
                line = line.lstrip()[2:]
        if not pending:
            pending_no = no
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        if pending.strip() and not pending.lstrip().startswith("#"):
            out.append((pending_no, pending.strip()))
        pending = ""
    return out


def split_words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:  # unbalanced quotes in a prose-like line: fall back to plain split
        return line.split()


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """Every ``cachefs ARGS`` / ``python mount.py ARGS`` in one shell line: (kind, args)."""
    words = split_words(line)
    found = []
    at_command = True
    i = 0
    while i < len(words):
        word = words[i]
        if word in SEPARATORS or set(word) <= set(";&|()"):
            at_command = True
            i += 1
            continue
        if at_command and (word in PREFIX_COMMANDS or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", word)
                           or (word.startswith("-") and i > 0 and words[i - 1] in {"sudo", "env"})):
            if word == "sudo" or word == "env":
                # sudo -u USER / -H: skip its own options and their values
                i += 1
                while i < len(words) and words[i].startswith("-"):
                    if words[i] in ("-u", "-g", "-C", "-D") and i + 1 < len(words):
                        i += 1
                    i += 1
                continue
            i += 1
            continue
        if at_command:
            end = i + 1
            while end < len(words) and not (words[end] in SEPARATORS or set(words[end]) <= set(";&|()")):
                end += 1
            base = Path(word).name
            if base == "cachefs":
                found.append(("cachefs", words[i + 1:end]))
            elif re.fullmatch(r"python[0-9.]*", base) and i + 1 < end and Path(words[i + 1]).name == "mount.py":
                found.append(("mount.py", words[i + 2:end]))
            i = end
            at_command = False
            continue
        i += 1
    return found


def option_strings(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("cachefs.cli.build_parser has no sub-commands")


def mount_py_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mount.py")
    cli.add_mount_arguments(parser)
    return parser


def check_options(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """Problems with the ``-x``/``--xyz`` words of ``args`` for ``parser`` (exact names only)."""
    known = option_strings(parser)
    problems = []
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            break
        if word.startswith("--"):
            name = word.split("=", 1)[0]
            action = known.get(name)
            if action is None:
                problems.append(f"unknown option {name}")
            elif "=" not in word and action.nargs != 0:
                i += 1  # its value
        elif word.startswith("-") and len(word) > 1 and not re.fullmatch(r"-\d+(\.\d+)?", word):
            # a cluster of short options: -fv, -o VALUE, -oVALUE
            for pos in range(1, len(word)):
                name = "-" + word[pos]
                action = known.get(name)
                if action is None:
                    problems.append(f"unknown option {name} (in {word})")
                    break
                if action.nargs != 0:
                    if pos == len(word) - 1:
                        i += 1  # the value is the next word
                    break
        i += 1
    return problems


def parse_problems(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """argparse's own verdict (and the -o sorting of cachefs mount), or None if fine."""
    if any(a in ("-h", "--help", "--version") for a in args):
        return None
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parser.parse_args(args)
            if hasattr(ns, "fuse_options"):
                cli.apply_dash_o(ns, parser)
    except SystemExit as exc:
        if exc.code:
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
    return None


def check_invocation(kind: str, args: list[str]) -> list[str]:
    if kind == "mount.py":
        parser = mount_py_parser()
        rest = args
    else:
        subs = subparsers()
        if not args:
            return ["'cachefs' without a sub-command"]
        if args[0] in ("-h", "--help", "--version"):
            return []
        if args[0].startswith("-"):
            return [f"unknown top-level option {args[0]}"]
        if args[0] in subs:
            parser, rest = subs[args[0]], args[1:]
        elif args[0] in cli.COMMANDS:
            return [f"sub-command {args[0]} is in cli.COMMANDS but not in build_parser()"]
        else:
            # "cachefs REMOTE MOUNTPOINT -o ..." as mount.fuse3 runs it: cachefs.cli.main
            # treats it as mount; in documentation it is far more likely a typo.
            return [f"unknown sub-command {args[0]!r} (known: {', '.join(sorted(subs))})"]
    problems = check_options(parser, rest)
    if not problems:
        verdict = parse_problems(parser, rest)
        if verdict:
            problems.append(verdict)
    return problems


def documented_commands() -> list[tuple[str, int, str, str, list[str]]]:
    """(file, line, text, kind, args) of every documented invocation."""
    found = []
    for path in markdown_files():
        for lang, first, body in code_blocks(path):
            if lang not in SHELL_LANGS:
                continue
            for offset, text in shell_lines(body, console=lang == "console"):
                for kind, args in invocations(text):
                    found.append((str(path.relative_to(REPO)), first + offset, text, kind, args))
    for path in sorted(VAGRANT.glob("*.sh")):
        for offset, text in shell_lines(path.read_text().splitlines(), console=False):
            for kind, args in invocations(text):
                found.append((str(path.relative_to(REPO)), 1 + offset, text, kind, args))
    return found


# -- the helpers check themselves --------------------------------------------------------

def test_the_extractor_finds_what_it_should() -> None:
    assert invocations("cachefs mount a:b /mnt --cache-dir x && cachefs status") == [
        ("cachefs", ["mount", "a:b", "/mnt", "--cache-dir", "x"]), ("cachefs", ["status"])]
    assert invocations("sudo -u vagrant -H cachefs unmount -z /m") == [("cachefs", ["unmount", "-z", "/m"])]
    assert invocations(".venv/bin/python mount.py r m -f") == [("mount.py", ["r", "m", "-f"])]
    assert invocations("echo cachefs status") == []
    assert invocations("ls ~/.cache/cachefs") == []
    assert check_invocation("cachefs", ["mount", "r", "m", "--no-such"]) == ["unknown option --no-such"]
    assert check_invocation("cachefs", ["status", "--cache-dir", "x"])[0].startswith("unknown option")
    assert check_invocation("cachefs", ["resolve", "--keep", "mine", "p"])  # bad choice
    assert check_invocation("cachefs", ["mount", "r", "m", "-o", "bogus=1"])  # -o sorting
    assert check_invocation("cachefs", ["frobnicate"])
    assert check_invocation("cachefs", ["mount", "r", "m", "-fv", "-o", "allow_other"]) == []
    assert check_invocation("mount.py", ["r", "m", "--timeout", "5", "-p", "2222"]) == []


def test_docs_show_commands() -> None:
    commands = documented_commands()
    files = {c[0] for c in commands}
    assert "docs/usage.md" in files, "docs/usage.md shows no cachefs command"
    assert "README.md" in files, "README.md shows no cachefs command"


@pytest.mark.parametrize("where,line,text,kind,args", documented_commands(),
                         ids=lambda v: v if isinstance(v, str) and "/" in v and v.endswith((".md", ".sh")) else None)
def test_documented_command_is_accepted(where: str, line: int, text: str, kind: str, args: list[str]) -> None:
    problems = check_invocation(kind, args)
    assert not problems, f"{where}:{line}: {text}\n  " + "\n  ".join(problems)


# -- fstab lines -------------------------------------------------------------------------------

def fstab_lines() -> list[tuple[str, int, str]]:
    out = []
    for path in markdown_files():
        for lang, first, body in code_blocks(path):
            if lang != "fstab":
                continue
            for offset, text in enumerate(body):
                if text.strip() and not text.lstrip().startswith("#"):
                    out.append((str(path.relative_to(REPO)), first + offset, text))
    return out


@pytest.mark.parametrize("where,line,text", fstab_lines())
def test_fstab_line_options_are_known(where: str, line: int, text: str) -> None:
    fields = text.split()
    assert len(fields) == 6, f"{where}:{line}: an fstab line has 6 fields: {text}"
    assert fields[2] == "fuse.cachefs", f"{where}:{line}: type should be fuse.cachefs"
    problems = check_invocation("mount.py", [fields[0], fields[1], "-o", fields[3]])
    assert not problems, f"{where}:{line}: {text}\n  " + "\n  ".join(problems)


# -- links ---------------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links() -> list[tuple[str, str, Path]]:
    out = []
    for path in markdown_files():
        base = path.parent
        text = path.read_text()
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # links in code blocks are not links
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue
            file_part = target.split("#", 1)[0]
            out.append((str(path.relative_to(REPO)), target, (base / file_part).resolve()))
    return out


def test_docs_have_links() -> None:
    assert relative_links(), "no relative links found: is the link pattern broken?"


@pytest.mark.parametrize("where,target,resolved", relative_links(), ids=lambda v: str(v) if isinstance(v, str) else None)
def test_relative_link_points_to_a_file(where: str, target: str, resolved: Path) -> None:
    assert resolved.exists(), f"{where}: link {target!r} points to {resolved}, which does not exist"


# -- the Vagrant lab -------------------------------------------------------------------------

def test_vagrantfile_is_valid_ruby() -> None:
    ruby = shutil.which("ruby")
    assert ruby, ("ruby is not installed, so vagrant/Vagrantfile cannot be checked: add the Debian "
                  "package 'ruby' to the packages scripts/run installs")
    result = subprocess.run([ruby, "-c", str(VAGRANT / "Vagrantfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr or result.stdout


@pytest.mark.parametrize("script", sorted(p.name for p in VAGRANT.glob("*.sh")))
def test_vagrant_script_is_valid_bash(script: str) -> None:
    path = VAGRANT / script
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    head = path.read_text().splitlines()[:20]
    assert any(line.strip() == "set -euo pipefail" for line in head), f"{script} lacks 'set -euo pipefail'"


def test_vagrant_lab_has_its_scripts() -> None:
    for name in ("Vagrantfile", "provision-server.sh", "provision-client.sh", "tour.sh"):
        assert (VAGRANT / name).exists(), f"vagrant/{name} is missing"
    text = (VAGRANT / "Vagrantfile").read_text()
    for script in re.findall(r'path:\s*"([^"]+)"', text):
        assert (VAGRANT / script).exists(), f"the Vagrantfile provisions with {script}, which does not exist"


def test_vagrant_validate() -> None:
    # Debian's vagrant package is installed by scripts/run; no provider (VirtualBox,
    # libvirt) runs here, so the Vagrantfile is validated without one.
    vagrant = shutil.which("vagrant")
    assert vagrant is not None, "vagrant is not installed: scripts/run setup installs it"
    result = subprocess.run([vagrant, "validate", "--ignore-provider"], cwd=VAGRANT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr or result.stdout


# -- every mount option is documented where a user looks for it --------------------------

def test_usage_lists_every_dash_o_option() -> None:
    """usage.md's list of cachefs's own ``-o`` settings names each one cli.OWN_OPTIONS takes
    (``no_passthrough`` and ``request_spin`` once went missing from such a list)."""
    text = (DOCS / "usage.md").read_text()
    section = text[text.index("### `-o` options"):text.index("### /etc/fstab")]
    own = section[section.index("**cachefs's own settings**"):section.index("**FUSE options**")]
    missing = [name for name in cli.OWN_OPTIONS if f"`{name}`" not in own]
    assert not missing, f"docs/usage.md's -o list lacks {missing}"


def test_readme_and_usage_list_every_mount_option() -> None:
    """Each long option of ``cachefs mount`` has a row in README's option table and in
    usage.md's (``--request-spin`` was missing from README)."""
    options = [s for s in option_strings(mount_py_parser()) if s.startswith("--") and s != "--help"]
    for path in (REPO / "README.md", DOCS / "usage.md"):
        rows = [line for line in path.read_text().splitlines() if line.startswith("| `-")]
        missing = [o for o in options if not any(re.search(rf"`{re.escape(o)}\b(?![-\w])", r) for r in rows)]
        assert not missing, f"{path.relative_to(REPO)}'s option table lacks {missing}"
