"""Read the repository's Dockerfile into stages and instructions, for the deploy tests.

Enough of the Dockerfile grammar for assertions about our own file: comments, line
continuations, ``ARG`` defaults substituted into ``FROM``, ``AS`` stage names, and JSON
(exec-form) arguments. It is not a general parser: heredocs and escape directives are refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Instruction", "Stage", "exec_form", "parse_dockerfile"]


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper-case: RUN, COPY, ...
    value: str  # the rest of the logical line, continuations joined
    line: int  # 1-based line where it starts


@dataclass
class Stage:
    name: str
    base: str  # FROM argument with global ARG defaults substituted
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def _logical_lines(text: str) -> list[tuple[int, str]]:
    if "<<" in text and re.search(r"<<-?\s*['\"]?[A-Z]+", text):
        raise ValueError("heredocs are not supported by dockerfile_model")
    lines: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # comments (and parser directives) vanish, even inside continuations
        if not current:
            start = number
        # Docker joins a continuation by deleting the backslash and the newline, nothing more.
        if raw.rstrip().endswith("\\"):
            current.append(raw.rstrip()[:-1])
            continue
        current.append(raw)
        lines.append((start, "".join(current).strip()))
        current = []
    if current:
        raise ValueError("Dockerfile ends inside a line continuation")
    return lines


def _substitute(value: str, args: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in args:
            raise ValueError(f"FROM uses ${name}, which has no global ARG default")
        return args[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, value)


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in _logical_lines(path.read_text()):
        keyword, _, value = text.partition(" ")
        keyword = keyword.upper()
        value = value.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", value, re.I)
            if not match:
                raise ValueError(f"line {line}: cannot read FROM {value!r}")
            base = _substitute(match.group(1), global_args)
            stages.append(Stage(name=match.group(2) or str(len(stages)), base=base))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"line {line}: {keyword} before the first FROM")
            name, _, default = value.partition("=")
            global_args[name] = default.strip('"')
        else:
            stages[-1].instructions.append(Instruction(keyword, value, line))
    return global_args, stages


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT / CMD / HEALTHCHECK (after its options).

    ValueError for the shell form, which runs the command under ``/bin/sh -c``: sh, not the
    server, would then be PID 1 and receive SIGTERM.
    """
    value = instruction.value
    if instruction.keyword == "HEALTHCHECK":
        _options, found, value = value.partition("CMD ")
        if not found:
            raise ValueError(f"line {instruction.line}: HEALTHCHECK without CMD")
    if not value.startswith("["):
        raise ValueError(f"line {instruction.line}: {instruction.keyword} is in shell form")
    parsed = json.loads(value)
    if not isinstance(parsed, list) or not all(isinstance(part, str) for part in parsed):
        raise ValueError(f"line {instruction.line}: not a JSON array of strings")
    return parsed
