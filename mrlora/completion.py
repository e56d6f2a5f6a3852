"""``mrlora completion bash|zsh``: a shell completion script for the subcommands and their flags.

    source <(mrlora completion bash)   # in ~/.bashrc; or save it as ~/.local/share/bash-completion/completions/mrlora
    source <(mrlora completion zsh)    # in ~/.zshrc

Why generated from the commands' own argparse parsers: a hand-written list goes stale the first time a flag is
added. Most commands build their parser inside ``main``, so each parser is captured at the moment ``main`` asks
it to parse (:func:`command_parser`), without running the command. Generating imports every command module
(torch included), so it takes a few seconds; the script it prints is static and completes instantly.

The zsh script loads zsh's own ``bashcompinit`` and registers the same function, so both shells complete
exactly the same words. Completion covers subcommand names, each command's flags, the second-level commands
(``merge export``, ``rate distill``, ...), and the values of flags with fixed choices; anything else falls back
to the shell's file name completion.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import sys
from dataclasses import dataclass, field
from typing import Iterator

from mrlora.cli import add_version_flag, run_cli

SHELLS = ("bash", "zsh")
# Commands whose main() picks another parser from its first word instead of argparse sub-parsers:
# `mrlora merge export ...` (mrlora.reduce.cli).
WORD_SUBCOMMANDS = {"merge": ("export",)}
_SAFE_WORD = re.compile(r"^[\w.:/@%+=,-]+$")


class _Captured(BaseException):
    """Raised instead of parsing, carrying the parser (BaseException: no command's error handler catches it)."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


@contextlib.contextmanager
def _capture_parsers() -> Iterator[None]:
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    argparse.ArgumentParser.parse_known_args = capture  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args = original  # type: ignore[method-assign]


def command_parser(name: str, argv: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The parser ``mrlora NAME ARGV`` parses its arguments with (the command itself does not run)."""
    from mrlora.commands import COMMANDS

    module = importlib.import_module(COMMANDS[name][0])
    with _capture_parsers():
        try:
            module.main(list(argv))
        except _Captured as got:
            return got.parser
    raise RuntimeError(f"{COMMANDS[name][0]}.main() returned without parsing its arguments")


@dataclass
class Completions:
    """What one command line position completes to: flags, sub-commands, and each flag's fixed choices."""

    flags: list[str] = field(default_factory=list)
    subcommands: list[str] = field(default_factory=list)
    choices: dict[str, list[str]] = field(default_factory=dict)


def _from_parser(parser: argparse.ArgumentParser) -> tuple[Completions, dict[str, argparse.ArgumentParser]]:
    comp, subparsers = Completions(), {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                comp.subcommands.append(sub_name)
                subparsers[sub_name] = sub
            continue
        if not action.option_strings and action.choices is not None:  # a positional with fixed values
            comp.subcommands.extend(str(c) for c in action.choices)
        comp.flags.extend(s for s in action.option_strings if s.startswith("--"))
        if action.option_strings and action.choices is not None and action.nargs != 0:
            words = [str(c) for c in action.choices if _SAFE_WORD.match(str(c))]
            for option in action.option_strings:
                comp.choices[option] = words
    return comp, subparsers


def completion_table() -> dict[str, Completions]:
    """Key ("" for the top level, "status", "merge export", ...) -> what completes there."""
    from mrlora.commands import COMMANDS

    table = {"": Completions(flags=["--help", "--version"], subcommands=list(COMMANDS))}
    for name in COMMANDS:
        comp, subparsers = _from_parser(command_parser(name))
        for word in WORD_SUBCOMMANDS.get(name, ()):
            comp.subcommands.append(word)
            table[f"{name} {word}"], _ = _from_parser(command_parser(name, (word,)))
        for sub_name, sub in subparsers.items():
            table[f"{name} {sub_name}"], _ = _from_parser(sub)
        table[name] = comp
    return table


def _words(words: list[str]) -> str:
    return " ".join(w for w in words if _SAFE_WORD.match(w))


def bash_script(table: dict[str, Completions]) -> str:
    nested = sorted(k for k in table if " " in k)
    word_cases, choice_cases = [], []
    for key, comp in table.items():
        if not key:
            continue
        word_cases.append(f'        "{key}") subs="{_words(comp.subcommands)}"; flags="{_words(comp.flags)}" ;;')
        for option, choices in comp.choices.items():
            if choices:
                choice_cases.append(f'        "{key}|{option}") values="{_words(choices)}" ;;')
    nested_pattern = "|".join(f'"{k}"' for k in nested) or '""'
    top = table[""]
    return f"""# bash completion for mrlora (generated by `mrlora completion bash` from the commands' parsers)
_mrlora() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local key subs="" flags="" values="" first=2
    COMPREPLY=()
    if (( COMP_CWORD == 1 )); then
        if [[ "$cur" == -* ]]; then
            COMPREPLY=( $(compgen -W "{_words(top.flags)}" -- "$cur") )
        else
            COMPREPLY=( $(compgen -W "{_words(top.subcommands)}" -- "$cur") )
        fi
        return 0
    fi
    key="${{COMP_WORDS[1]}}"
    if (( COMP_CWORD > 2 )); then
        case "$key ${{COMP_WORDS[2]}}" in
            {nested_pattern}) key="$key ${{COMP_WORDS[2]}}"; first=3 ;;
        esac
    fi
    case "$key|$prev" in
{chr(10).join(choice_cases) or '        "") ;;'}
    esac
    if [[ -n "$values" ]]; then
        COMPREPLY=( $(compgen -W "$values" -- "$cur") )
        return 0
    fi
    case "$key" in
{chr(10).join(word_cases)}
        *) return 0 ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=( $(compgen -W "$flags" -- "$cur") )
    elif (( COMP_CWORD == first )) && [[ -n "$subs" ]]; then
        COMPREPLY=( $(compgen -W "$subs" -- "$cur") )
    fi
    return 0
}}
complete -o default -F _mrlora mrlora
"""


def zsh_script(table: dict[str, Completions]) -> str:
    return (
        "# zsh completion for mrlora (generated by `mrlora completion zsh`): the bash completion function, run\n"
        "# through zsh's bashcompinit, so both shells complete the same words.\n"
        "autoload -U +X compinit && { (( $+functions[compdef] )) || compinit }\n"
        "autoload -U +X bashcompinit && bashcompinit\n" + bash_script(table)
    )


def main(argv: list[str] | None = None) -> int:
    """The command line: the script on stdout, exit 0; an unknown shell is a usage error (2)."""
    return run_cli(_main, argv, prog="mrlora completion")


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(
        prog="mrlora completion",
        description="Print a shell completion script for mrlora's subcommands and flags. bash: "
        "`source <(mrlora completion bash)` (or save it under ~/.local/share/bash-completion/completions/mrlora); "
        "zsh: `source <(mrlora completion zsh)` in ~/.zshrc.",
    )
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    add_version_flag(p)
    args = p.parse_args(argv)
    table = completion_table()
    sys.stdout.write(bash_script(table) if args.shell == "bash" else zsh_script(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
