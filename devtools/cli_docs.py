"""The man page and the bash and zsh completions of ``cachefs``, made from its parser.

Owns ``data/cachefs.1``, ``data/bash-completion/cachefs`` and ``data/zsh/_cachefs``: every
word of them comes from ``cachefs.cli.build_parser`` (sub-commands, their help, options,
metavars, choices), so that they say what the command takes. They are committed, so that
an install from the source needs no generator (pyproject.toml's ``data-files`` installs
them into ``share/``), and ``tests/test_cli_docs.py`` makes them anew and compares, so
that they cannot go stale: after a change to the parser run

    python -m devtools.cli_docs          # writes the three files
    python -m devtools.cli_docs --check  # exit status 1 if one differs

Reads the parser only: never changes ``cachefs``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from cachefs import __version__, cli
from cachefs.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
MAN_PAGE = REPO / "data" / "cachefs.1"
BASH_COMPLETION = REPO / "data" / "bash-completion" / "cachefs"
ZSH_COMPLETION = REPO / "data" / "zsh" / "_cachefs"
GENERATED = "generated from cachefs.cli.build_parser by devtools/cli_docs.py: do not edit"

#: metavars whose values are paths (besides options of type Path)
PATH_METAVARS = {"FILE", "DIR", "PATH", "MOUNTPOINT", "CACHE_DIR", "REMOTE"}


# -- the parser, walked -----------------------------------------------------------------------

def subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, list[str], str, argparse.ArgumentParser]]:
    """(name, aliases, one-line help, parser) of each sub-command, in the parser's order."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help or "" for choice in sub._choices_actions}
    seen: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, subparser in sub.choices.items():
        if id(subparser) in seen:
            aliases[seen[id(subparser)]].append(name)
        else:
            seen[id(subparser)] = name
            aliases[name] = []
    for name, subparser in sub.choices.items():
        if name in aliases:
            yield name, aliases[name], helps.get(name, ""), subparser


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]


def positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


def help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The option's help as --help shows it (%(default)s and the like filled in)."""
    if not action.help:
        return ""
    return " ".join(parser._get_formatter()._expand_help(action).split())


def takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper()


def is_path(action: argparse.Action) -> bool:
    return action.type is Path or metavar(action) in PATH_METAVARS


# -- man page ---------------------------------------------------------------------------------

def roff(text: str) -> str:
    """Text safe in a roff line: backslashes and hyphens escaped, no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def man_page() -> str:
    parser = build_parser()
    lines = [
        f'.\\" {GENERATED}',
        f'.TH CACHEFS 1 "" "cachefs {__version__}" "User Commands"',
        ".SH NAME",
        "cachefs \\- " + roff((parser.description or "").rstrip(".").replace("Mount", "mount", 1)),
        ".SH SYNOPSIS",
        ".B cachefs",
        ".I COMMAND",
        "[\\fIOPTIONS\\fR] [\\fIARGUMENTS\\fR]",
        ".br",
        ".B cachefs",
        ".I REMOTE MOUNTPOINT",
        "[\\fB\\-o\\fR \\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        roff(parser.description or ""),
        "The second form is the same as \\fBcachefs mount\\fR; it is how \\fBmount\\fR(8) and",
        "\\fI/etc/fstab\\fR run it (\\fB\\-t fuse.cachefs\\fR). \\fBcachefs COMMAND \\-\\-help\\fR",
        "shows the same text as this page for one command.",
        ".SH OPTIONS",
    ]
    for action in options(parser):
        lines += _man_option(parser, action)
    lines.append(".SH COMMANDS")
    for name, aliases, _short, subparser in subcommands(parser):
        title = "cachefs " + name + "".join(f", {alias}" for alias in aliases)
        lines += [f'.SS "{roff(title)}"', ".B cachefs " + roff(name)]
        if any("-h" not in a.option_strings for a in options(subparser)):
            lines.append("[\\fIOPTIONS\\fR]")
        for action in positionals(subparser):
            word = metavar(action)
            word = f"[{word}]" if action.nargs == "?" else f"{word} ..." if action.nargs == "+" else word
            lines.append(".I " + roff(word))
        lines += [".PP", roff(subparser.description or "")]
        for action in positionals(subparser):
            lines += [".TP", ".I " + roff(metavar(action)), roff(help_text(subparser, action))]
        for action in options(subparser):
            if "-h" not in action.option_strings:
                lines += _man_option(subparser, action)
    lines += _man_dash_o(_subparser(parser, "mount"))
    lines += [
        ".SH FILES",
        ".TP",
        ".I MOUNTPOINT/.cachefs/status",
        "the state of a mount (JSON), as \\fBcachefs status \\-\\-json\\fR prints it",
        ".TP",
        ".I MOUNTPOINT/.cachefs/control",
        "commands written to a mount (offline, online, sync, pin ...)",
        ".TP",
        ".I ~/.cache/cachefs/",
        "the caches, one folder per remote (\\fB$XDG_CACHE_HOME/cachefs/\\fR when set)",
        ".SH EXIT STATUS",
        "0 on success, 1 when the command failed (one line on standard error says why, starting",
        "with \\(lqcachefs:\\(rq), 2 for a usage error.",
        ".SH SEE ALSO",
        "\\fBfusermount3\\fR(1), \\fBsshfs\\fR(1), \\fBssh\\fR(1);",
        "README.md and docs/ in the source (docs/usage.md: every command and option)",
    ]
    return "\n".join(lines) + "\n"


def _man_dash_o(mount: argparse.ArgumentParser) -> list[str]:
    """The ``-o`` names (an /etc/fstab line's options), from cli's own tables."""
    lines = [".SH MOUNT OPTIONS (\\-o)",
             "\\fB\\-o\\fR takes comma-separated names, as an \\fI/etc/fstab\\fR line gives them.",
             "cachefs's own, each the same as its option above:"]
    by_dest = {a.dest: a for a in options(mount)}
    for name, dest in cli.OWN_OPTIONS.items():
        action = by_dest[dest]
        long = next(o for o in action.option_strings if o.startswith("--"))
        value = f"=\\fI{roff(metavar(action))}\\fR" if takes_value(action) else ""
        lines += [".TP", f"\\fB{roff(name)}\\fR{value}", f"as \\fB{roff(long)}\\fR"]
    lines += [
        ".PP",
        "Passed to FUSE: " + ", ".join(f"\\fB{roff(n)}\\fR" for n in sorted(cli.FUSE_OPTIONS)) + "; and "
        + ", ".join(f"\\fB{roff(n)}=\\fR\\fIVALUE\\fR" for n in sorted(cli.FUSE_VALUE_OPTIONS)) + ".",
        ".PP",
        "Refused: " + "; ".join(f"\\fB{roff(n)}\\fR ({roff(why)})" for n, why in sorted(cli.FUSE_REFUSED.items())) + ".",
        ".PP",
        "Ignored (meant for \\fBmount\\fR(8) or systemd): "
        + ", ".join(f"\\fB{roff(n)}\\fR" for n in sorted(cli.MOUNT_ONLY)) + ", and \\fBx\\-\\fR\\fINAME\\fR.",
        ".PP",
        "sshfs's names, in any case: " + ", ".join(_sshfs_name(n, m) for n, m in cli.SSHFS_OPTIONS.items()) + ".",
    ]
    return lines


def _sshfs_name(name: str, meaning: "str | tuple[str, object] | None") -> str:
    """One of sshfs's -o names and what cachefs makes of it (cli.SSHFS_OPTIONS)."""
    if meaning is None:
        what = "accepted; cachefs always does this"
    elif meaning == "":
        what = "yes and ask as cachefs always does, accept\\-new as \\fB\\-\\-accept\\-new\\-host\\-key\\fR, no refused"
    elif isinstance(meaning, tuple):
        what = f"as \\fB{roff(meaning[0])}\\fR"
    elif " " in meaning:
        what = "refused: " + roff(meaning)
    else:
        what = f"as \\fB{roff(meaning)}\\fR"
    return f"\\fB{roff(name)}\\fR ({what})"


def _man_option(parser: argparse.ArgumentParser, action: argparse.Action) -> list[str]:
    names = ", ".join(f"\\fB{roff(option)}\\fR" for option in action.option_strings)
    if takes_value(action):
        names += f" \\fI{roff(metavar(action))}\\fR"
    return [".TP", names, roff(help_text(parser, action))]


# -- bash -------------------------------------------------------------------------------------

def bash_completion() -> str:
    parser = build_parser()
    commands = [name for name, aliases, _h, _p in subcommands(parser) for name in [name, *aliases]]
    cases = []
    for name, aliases, _short, subparser in subcommands(parser):
        words = " ".join(o for a in options(subparser) for o in a.option_strings)
        values = []
        for action in options(subparser):
            if not takes_value(action):
                continue
            pattern = "|".join(action.option_strings)
            if action.choices is not None:
                values.append(f'{pattern}) COMPREPLY=($(compgen -W "{" ".join(map(str, action.choices))}" -- "$cur")); return ;;')
            elif is_path(action):
                values.append(f'{pattern}) COMPREPLY=($(compgen -f -- "$cur")); return ;;')
            else:
                values.append(f"{pattern}) return ;;  # {metavar(action)}")
        body = "\n".join(f"                {v}" for v in values)
        cases.append(f'        {"|".join([name, *aliases])})\n'
                     f'            opts="{words}"\n'
                     f'            case "$prev" in\n{body}\n            esac\n            ;;')
    top = " ".join(o for a in options(parser) for o in a.option_strings)
    return f"""# bash completion for cachefs ({GENERATED})
# Installed as share/bash-completion/completions/cachefs: bash-completion loads it when
# cachefs is first completed; or source it from ~/.bashrc.
_cachefs() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local command="" i opts
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            -*) ;;
            *) command="${{COMP_WORDS[i]}}"; break ;;
        esac
    done
    if [[ -z $command ]]; then
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "{top}" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "{" ".join(commands)}" -- "$cur"))
        fi
        return
    fi
    case "$command" in
{chr(10).join(cases)}
        *)
            # "cachefs REMOTE MOUNTPOINT -o ...": the mount's own options
            command=mount
            opts="{" ".join(o for a in options(_subparser(parser, "mount")) for o in a.option_strings)}"
            ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -o filenames -o bashdefault -F _cachefs cachefs
"""


def _subparser(parser: argparse.ArgumentParser, wanted: str) -> argparse.ArgumentParser:
    return next(p for name, _a, _h, p in subcommands(parser) if name == wanted)


# -- zsh --------------------------------------------------------------------------------------

def _zsh_text(text: str) -> str:
    """A description for _arguments and _describe: its first clause, without the
    characters they give a meaning ([ ] : \\ ' `)."""
    text = re.split(r" \(|; |: ", text, maxsplit=1)[0]
    return re.sub(r"[\[\]:\\'`$]", "", text)


def zsh_completion() -> str:
    parser = build_parser()
    described = []
    cases = []
    for name, aliases, short, subparser in subcommands(parser):
        for word in [name, *aliases]:
            described.append(f"        '{word}:{_zsh_text(short)}'")
        specs = []
        for action in options(subparser):
            specs.append(_zsh_option(subparser, action))
        for position, action in enumerate(positionals(subparser), start=1):
            action_word = "_files" if is_path(action) else " "
            where = "*" if action.nargs == "+" else str(position)
            optional = ":" if action.nargs == "?" else ""
            specs.append(f"'{where}:{optional}{metavar(action)}:{action_word}'")
        body = " \\\n                ".join(specs)
        cases.append(f"        ({'|'.join([name, *aliases])})\n"
                     f"            _arguments -s \\\n                {body}\n            ;;")
    return f"""#compdef cachefs
# zsh completion for cachefs ({GENERATED})
# Installed as share/zsh/site-functions/_cachefs: a folder on $fpath (e.g.
# /usr/local/share/zsh/site-functions), or add its folder to fpath before compinit.

_cachefs() {{
    local curcontext="$curcontext" state line
    local -a commands
    commands=(
{chr(10).join(described)}
    )
    _arguments -C \\
        '(- *)--version[show the version and exit]' \\
        '(- *)'{{-h,--help}}'[show the help and exit]' \\
        '1: :->command' \\
        '*:: :->arguments'
    case $state in
        (command)
            _describe -t commands 'cachefs command' commands
            _files
            ;;
        (arguments)
            case $words[1] in
{chr(10).join(cases)}
            esac
            ;;
    esac
}}

_cachefs "$@"
"""


def _zsh_option(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    names = action.option_strings
    text = _zsh_text(help_text(parser, action))
    repeat = "*" if isinstance(action, argparse._AppendAction) else ""
    if not takes_value(action):
        exclusive = "(- *)" if "-h" in names else f"({' '.join(names)})" if len(names) > 1 else ""
        spec = f"[{text}]"
    else:
        exclusive = "" if repeat or len(names) == 1 else f"({' '.join(names)})"
        if action.choices is not None:
            value = f"({' '.join(map(str, action.choices))})"
        elif is_path(action):
            value = "_files -/" if metavar(action) == "DIR" else "_files"
        else:
            value = " "
        spec = f"[{text}]:{metavar(action)}:{value}"
        names = [n + ("=" if n.startswith("--") else "+") for n in names]
    if len(names) == 1:
        return f"'{repeat}{exclusive}{names[0]}{spec}'"
    return f"'{repeat}{exclusive}'{{{','.join(names)}}}'{spec}'"


# -- writing and checking ---------------------------------------------------------------------

def generated() -> dict[Path, str]:
    return {MAN_PAGE: man_page(), BASH_COMPLETION: bash_completion(), ZSH_COMPLETION: zsh_completion()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make the man page and the completions from cachefs's parser.")
    parser.add_argument("--check", action="store_true", help="only compare: exit status 1 if a file differs")
    args = parser.parse_args(argv)
    stale = []
    for path, text in generated().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    if args.check and stale:
        print("stale: " + ", ".join(str(p.relative_to(REPO)) for p in stale)
              + " (run: python -m devtools.cli_docs)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
