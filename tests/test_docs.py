"""The documentation stays true: its tables against the code, its links and paths against the tree.

- docs/configuration.md lists every field of `Settings` once, by environment name, with a
  default the setting reads as its default and the bounds it enforces;
- docs/events.md ends with the event catalog's table (`make docs` writes it);
- docs/troubleshooting.md has a section for every alerted event;
- every relative link in README.md and docs/*.md reaches a file (and a heading, when it names
  one), every repository path they mention exists, and no file refers to a docs page or a
  PITFALLS file that is not there;
- no file in the repository is, or holds, the EICAR test string.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from harness import EICAR, ROOT
from watcher import events
from watcher.settings import Settings, _env_name, load_settings, parse_duration_s, parse_size_bytes

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)
# A path below one of the repository's top directories, not part of a longer path or URL.
REPO_PATH = re.compile(
    r"(?<![\w./<>@-])((?:watcher|tests|bench|docs|config|scripts|docker|examples)/[\w./-]*\w)"
)
GENERATED = {"bench/results/latest.json"}  # written by `make bench`, never committed
EN_DASH = "\N{EN DASH}"  # between the bounds of an integer: 1, the dash, 65535
PITFALLS = "PITFALLS" + ".md"  # spelled so that this file does not mention it


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting from the environment the suite runs in: only what a test gives."""
    for key in list(os.environ):
        if key.startswith(("WATCHER_", "CLAMAV_")) or key == "VIRUS_SCANNING_ENABLED":
            monkeypatch.delenv(key)


# -- docs/configuration.md ---------------------------------------------------------------------


def settings_table() -> dict[str, tuple[str, str]]:
    """env name -> (default cell, accepts cell), from the table under "Every setting"."""
    text = (DOCS / "configuration.md").read_text()
    section = text.split("\n## Every setting\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            name, _meaning, default, accepts = (c.strip() for c in line.strip("|").split(" | "))
            assert name.strip("`") not in rows, f"{name} is listed twice"
            rows[name.strip("`")] = (default, accepts)
    return rows


def env_names() -> dict[str, str]:
    return {_env_name(field): field for field in Settings.model_fields}


def value_type(field: str) -> Any:
    """The field's type without Optional and Annotated: int, float, bool, str, Path, Literal."""
    annotation = Settings.model_fields[field].annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def accepts(field: str, value: Any) -> bool:
    try:
        Settings(**{field: value})
    except ValidationError:
        return False
    return True


def as_written(field: str, cell: str) -> str:
    """A cell's value as a user would set it: backticks off, thousands separators off numbers."""
    value = cell.strip("`")
    return value.replace(",", "") if value_type(field) in (int, float) else value


def test_the_settings_table_lists_every_setting_once_by_its_environment_name() -> None:
    assert sorted(settings_table()) == sorted(env_names())


@pytest.mark.usefixtures("clean_env")
def test_each_default_in_the_settings_table_reads_as_the_fields_default() -> None:
    """A default is written as a user would set it (`4h`, `100M`, `10,000`, a comma list);
    `—` is "unset" (None)."""
    names = env_names()
    wrong = []
    for name, (default, _) in settings_table().items():
        field = names[name]
        expected = Settings.model_fields[field].default
        if default == "—":
            shown = () if expected == () else None  # unset: None, or an empty list
        else:
            written: dict[str, Any] = {field: as_written(field, default)}
            shown = getattr(Settings(**written), field)
        if shown != expected:
            wrong.append(f"{name}: {default} reads {shown!r}, the default is {expected!r}")
    assert not wrong


@pytest.mark.usefixtures("clean_env")
def test_each_bound_in_the_settings_table_is_the_one_the_setting_enforces() -> None:
    """Integers show LOW and HIGH joined by an en dash; durations and sizes `≤ HIGH` (they must
    be above 0), or LOW and HIGH joined by an en dash for a duration with a lower bound;
    choices show every value, in order; true/false settings `true`, `false`."""
    names = env_names()
    wrong = [
        f"{name}: {cell}: {problem}"
        for name, (_, cell) in settings_table().items()
        if (problem := bound_problem(names[name], cell))
    ]
    assert not wrong


def bound_problem(field: str, cell: str) -> str | None:
    kind = value_type(field)
    if typing.get_origin(kind) is typing.Literal:
        choices = ", ".join(f"`{v}`" for v in typing.get_args(kind))
        return None if cell == choices else f"the choices are {choices}"
    if kind is bool:
        return None if cell == "`true`, `false`" else "the choices are `true`, `false`"
    if kind is int and EN_DASH in cell:
        low, high = (int(part.replace(",", "")) for part in cell.split(EN_DASH))
        if not (accepts(field, low) and accepts(field, high)):
            return "refused"
        if accepts(field, low - 1) or accepts(field, high + 1):
            return "the setting accepts more"
        return None
    if kind is float and EN_DASH in cell:  # a duration bounded below too (2s, 1h)
        low, high = (parse_duration_s(part) for part in cell.split(EN_DASH))
        if not (accepts(field, low) and accepts(field, high)):
            return "refused"
        if accepts(field, low * 0.999) or accepts(field, high * 1.001):
            return "the setting accepts more"
        return None
    if kind in (int, float):
        if not cell.startswith("≤ "):
            return "a number needs its bounds"
        limit = cell.removeprefix("≤ ")
        above = parse_size_bytes(limit) + 1 if kind is int else parse_duration_s(limit) * 1.001
        if not accepts(field, limit):
            return "refused"
        if accepts(field, above) or accepts(field, 0):
            return "the setting accepts more"
    return None


def test_the_example_configuration_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    example = ROOT / "config" / "watcher.toml"
    monkeypatch.setenv("WATCHER_CONFIG", str(example))
    assert load_settings().clamav_socket is not None
    assert set(tomllib.loads(example.read_text())) <= set(Settings.model_fields)


# -- docs/events.md, docs/troubleshooting.md ---------------------------------------------------


def test_the_events_page_holds_the_catalogs_table() -> None:
    """Out of date after a change to watcher/events.py: run `make docs`."""
    text = (DOCS / "events.md").read_text()
    marker = "<!-- generated by `make docs`"
    assert text.count(marker) == 1
    generated = text.split(marker, 1)[1].split("\n", 1)[1]
    assert generated == events.markdown_table()


def test_troubleshooting_has_a_section_for_every_alerted_event() -> None:
    headings = HEADING.findall(strip_code((DOCS / "troubleshooting.md").read_text()))
    missing = [n for n, _ in events.alerted() if not any(f"`{n}`" in h for h in headings)]
    assert not missing


# -- links and paths ---------------------------------------------------------------------------


def strip_code(markdown: str) -> str:
    return FENCE.sub("", markdown)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in HEADING.findall(strip_code(page.read_text())):
        base = slug(heading)
        name, n = base, 0
        while name in found:  # a repeated heading gets -1, -2, ...
            n += 1
            name = f"{base}-{n}"
        found.add(name)
    return found


def test_every_relative_link_in_the_docs_reaches_a_file_and_heading() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(strip_code(page.read_text())):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken


def test_every_repository_path_the_docs_name_exists() -> None:
    missing = []
    for page in PAGES:
        for path in REPO_PATH.findall(page.read_text()):
            if path in GENERATED:
                continue
            if not (ROOT / path).exists() and not (page.parent / path).exists():
                missing.append(f"{page.name}: {path}")
    assert not missing


def repository_files() -> Iterator[Path]:
    """Tracked and untracked files of the checkout, without what .gitignore ignores."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk it
        skip = {".git", ".venv", "node_modules", "var", "build", "results", "__pycache__"}
        for dirpath, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in skip and not d.endswith("_cache")]
            yield from (Path(dirpath) / n for n in names)
        return
    for name in listed.split(b"\0"):
        path = ROOT / os.fsdecode(name)
        if name and path.is_file():
            yield path


def test_no_file_refers_to_a_docs_page_or_pitfalls_file_that_does_not_exist() -> None:
    wrong = []
    for path in repository_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for page in re.findall(r"\bdocs/[\w./-]+\.md\b", text):
            if not (ROOT / page).exists():
                wrong.append(f"{path.relative_to(ROOT)}: {page}")
        if PITFALLS in text and not (ROOT / PITFALLS).exists():
            wrong.append(f"{path.relative_to(ROOT)}: {PITFALLS}")
    assert not wrong


def test_no_file_in_the_repository_holds_the_eicar_test_string() -> None:
    """Virus scanners (and this project's own test signature) would flag the checkout."""
    assert not [p for p in repository_files() if EICAR in p.read_bytes()]


# -- README.md ---------------------------------------------------------------------------------


def test_the_readme_names_the_two_commands_and_one_configuration_for_every_command() -> None:
    readme = (ROOT / "README.md").read_text()
    two_commands = FENCE.findall(readme)[0]
    assert "make run" in two_commands and "make test" in two_commands
    assert "export WATCHER_CONFIG=var/watcher.toml" in readme
    # No setting repeated by hand on a command line: the exported file is the configuration.
    assert not re.search(r"\b(WATCHER_(?!CONFIG)\w+|CLAMAV_\w+)=\S", code_blocks(readme))


def code_blocks(markdown: str) -> str:
    return "\n".join(FENCE.findall(markdown))
