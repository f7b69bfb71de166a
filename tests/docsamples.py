"""The code samples and console sessions of the documentation, and how an answer is compared
with a sample. Pure: no process, no socket; ``tests/integration/test_docs.py`` runs them.

A sample is a fenced block (```` ```python ````, ```` ```console ````, ...) in ``README.md``,
``docs/*.md`` or ``deploy/README.md``. The line right before its opening fence may opt it
out of the test, with a reason: ``<!-- doc-test: skip — why -->``. Any other
``doc-test`` comment, or one not followed by a fence, is an error: a typo must not turn a
sample's test off.

A console session is lines beginning with ``$ `` (a command; a trailing ``\\`` continues it
on the next line) each followed by the output it prints. The output is compared with
tolerance (:func:`match_output`): a line ``...`` matches any lines, ``...`` inside a line any
text; an HTTP answer's header lines are a set (order does not matter; without a ``...``
line among them, every header the server sent must be in the sample); ``Age``, the
``ttl`` of ``Cache-Status`` and dates may differ by the time the replay itself took; an
``ETag`` stands for the server's value, the same sample value always for the same server
value (:class:`Bindings`), and a later command that quotes it is sent the server's value.
"""

from __future__ import annotations

import ast
import builtins
import email.utils
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

SKIP = re.compile(r"^<!--\s*doc-test:\s*skip\s*[—–-]+\s*(?P<reason>\S.*?)\s*-->$")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
WILDCARD = "..."


class DocSampleError(ValueError):
    """A documentation file whose samples cannot be read as the convention says."""


@dataclass(frozen=True)
class Sample:
    """One fenced block: where it is, its language, its text, why it is skipped (if it is)."""

    path: str           # relative to the repository, e.g. "docs/SERVICE.md"
    line: int           # 1-based line of the opening fence
    lang: str           # "" for a fence without a language
    text: str
    skip: str | None = None
    before: str = ""    # the few lines of prose before the fence

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}:{self.lang or 'text'}"


def doc_files(root: Path = REPO_ROOT) -> list[Path]:
    """The documents whose samples are tested."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md")),
            root / "deploy" / "README.md"]


def extract(path: Path, root: Path = REPO_ROOT) -> list[Sample]:
    """Every fenced block of one Markdown file, in order."""
    rel = str(path.relative_to(root))
    lines = path.read_text(encoding="utf-8").splitlines()
    samples: list[Sample] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if "doc-test" in line and line.lstrip().startswith("<!--"):
            if SKIP.match(line.strip()) is None:
                raise DocSampleError(f"{rel}:{i + 1}: not the doc-test convention: {line!r} "
                                     "(write <!-- doc-test: skip — the reason -->)")
            if i + 1 >= len(lines) or FENCE.match(lines[i + 1]) is None:
                raise DocSampleError(f"{rel}:{i + 1}: a doc-test comment must be the line "
                                     "right before a sample's opening fence")
        opening = FENCE.match(line)
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        end = i + 1
        while end < len(lines) and not (lines[end].strip().startswith(fence)
                                        and lines[end].strip().strip(fence[0]) == ""):
            end += 1
        if end == len(lines):
            raise DocSampleError(f"{rel}:{i + 1}: a fence that is never closed")
        body = "\n".join(text[indent:] if text[:indent].strip() == "" else text
                         for text in lines[i + 1:end])
        skip = SKIP.match(lines[i - 1].strip()) if i else None
        samples.append(Sample(rel, i + 1, opening["lang"].lower(), body + "\n",
                              skip["reason"] if skip else None,
                              "\n".join(lines[max(0, i - 4):i])))
        i = end + 1
    return samples


def all_samples(root: Path = REPO_ROOT) -> list[Sample]:
    return [s for path in doc_files(root) if path.exists() for s in extract(path, root)]


# --------------------------------------------------------------------------------------------
# Console sessions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One ``$ command`` of a console session and the output the sample shows for it."""

    command: str
    expected: tuple[str, ...]
    line: int       # line of the command inside the sample (1-based)


def console_steps(sample: Sample) -> list[Step]:
    """The commands of a console sample with their expected output."""
    steps: list[Step] = []
    command: list[str] = []
    expected: list[str] = []
    start = 0
    lines = sample.text.splitlines()
    for number, line in enumerate(lines, 1):
        if command and command[-1].endswith("\\"):
            command[-1] = command[-1][:-1]
            command.append(line.removeprefix("> "))
            continue
        if line.startswith("$ "):
            if command:
                steps.append(Step(" ".join(command), tuple(expected), start))
            command, expected, start = [line[2:]], [], number
        elif not command:
            if line.strip():
                raise DocSampleError(f"{sample.id}: output before the first `$ ` command: "
                                     f"{line!r}")
        else:
            expected.append(line)
    if command:
        steps.append(Step(" ".join(command), tuple(expected), start))
    return steps


@dataclass
class Bindings:
    """What the sample's time-varying values stand for in this replay: an ETag of the sample
    is the server's ETag it was first seen with, and stays that one."""

    etags: dict[str, str] = field(default_factory=dict)

    def bind_etag(self, sample: str, actual: str) -> str | None:
        if sample in self.etags:
            if self.etags[sample] != actual:
                return (f"ETag {sample} stood for {self.etags[sample]} earlier in the session, "
                        f"and the server now answers {actual}")
            return None
        others = [s for s, a in self.etags.items() if a == actual]
        if others:
            return (f"the server answered ETag {actual} again, which the sample showed as "
                    f"{others[0]} before, not {sample}")
        self.etags[sample] = actual
        return None

    def substitute(self, command: str) -> str:
        """``command`` with every sample ETag seen so far replaced by the server's."""
        for sample, actual in self.etags.items():
            command = command.replace(sample, actual)
        return command


def line_pattern(expected: str) -> str:
    """A regex for one expected line: ``...`` inside it matches any text."""
    return ".*?".join(re.escape(part) for part in expected.split(WILDCARD))


def match_lines(expected: list[str], actual: list[str]) -> str | None:
    """None when ``actual`` matches ``expected`` line by line (a ``...`` line: any lines),
    else what differs."""
    pattern = "".join("(?:.*\n)*?" if line.strip() == WILDCARD else line_pattern(line) + "\n"
                      for line in expected)
    text = "".join(line + "\n" for line in actual)
    if re.fullmatch(pattern, text):
        return None
    return ("expected:\n  " + "\n  ".join(expected) + "\ngot:\n  " + "\n  ".join(actual))


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def _int(value: str) -> int | None:
    return int(value) if value.strip().isdigit() else None


def match_header(name: str, expected: str, actual: str, bindings: Bindings,
                 elapsed: float) -> str | None:
    """None when the server's value of header ``name`` matches the sample's, else why not.

    ``elapsed``: seconds the replay has taken so far; a value that counts time may be off
    by that much (rounded up), in the direction time runs, and no more."""
    slack = math.ceil(elapsed)
    lname = name.lower()
    if expected == WILDCARD:
        return None
    if lname == "age":
        want, got = _int(expected), _int(actual)
        if want is None or got is None or not 0 <= got - want <= slack:
            return f"Age: the sample shows {expected}, the server answered {actual}"
        return None
    if lname in ("date", "last-modified", "expires"):
        try:
            email.utils.parsedate_to_datetime(actual)
        except (TypeError, ValueError):
            return f"{name}: the server's {actual!r} is not an HTTP date"
        return None
    if lname == "etag":
        if WILDCARD in expected:
            return None if re.fullmatch(line_pattern(expected), actual) else \
                f"ETag: {actual} does not match {expected}"
        return bindings.bind_etag(expected, actual)
    if lname == "cache-status":
        ttl = re.compile(r"ttl=(-?\d+)")
        want, got = ttl.search(expected), ttl.search(actual)
        if want and got:
            if not 0 <= int(want[1]) - int(got[1]) <= slack:
                return f"Cache-Status: the sample shows {expected}, the server answered {actual}"
            expected, actual = ttl.sub("ttl=N", expected), ttl.sub("ttl=N", actual)
    if re.fullmatch(line_pattern(expected), actual):
        return None
    return f"{name}: the sample shows {expected!r}, the server answered {actual!r}"


def _split_head(lines: list[str]) -> tuple[list[str], list[str] | None]:
    if "" in lines:
        at = lines.index("")
        return lines[:at], lines[at + 1:]
    return lines, None


def match_output(expected: list[str], output: str, bindings: Bindings,
                 elapsed: float = 0.0) -> str | None:
    """None when ``output`` (what the command printed) matches the sample's ``expected``
    lines by the convention of the module docstring, else what differs."""
    actual = _trim(output.replace("\r\n", "\n").split("\n"))
    expected = _trim(list(expected))
    if not (expected and expected[0].startswith("HTTP/") and actual
            and actual[0].startswith("HTTP/")):
        return match_lines(expected, actual)
    exp_head, exp_body = _split_head(expected)
    act_head, act_body = _split_head(actual)
    problems: list[str] = []
    if not re.fullmatch(line_pattern(exp_head[0]), act_head[0]):
        problems.append(f"status: the sample shows {exp_head[0]!r}, the server answered "
                        f"{act_head[0]!r}")
    sent = [tuple(part.strip() for part in line.split(":", 1)) for line in act_head[1:]]
    unmatched = list(range(len(sent)))
    open_set = any(line.strip() == WILDCARD for line in exp_head)
    for line in exp_head[1:]:
        if line.strip() == WILDCARD:
            continue
        name, _, value = (part.strip() for part in line.partition(":"))
        same_name = [i for i in unmatched if sent[i][0].lower() == name.lower()]
        if not same_name:
            problems.append(f"{name}: in the sample, not sent by the server")
            continue
        reasons = [match_header(name, value, sent[i][1], bindings, elapsed) for i in same_name]
        if None in reasons:
            unmatched.remove(same_name[reasons.index(None)])
        else:
            problems.append(str(reasons[0]))
    if not open_set and unmatched:
        problems.append("sent by the server, not in the sample (add them, or a `...` line): "
                        + ", ".join(": ".join(sent[i]) for i in unmatched))
    if exp_body is None:
        exp_body = [WILDCARD] if exp_head[-1].strip() == WILDCARD else []
    body = match_lines(exp_body, act_body or [])
    if body is not None:
        problems.append("body: " + body)
    return "\n".join(problems) or None


# --------------------------------------------------------------------------------------------
# Python fragments
# --------------------------------------------------------------------------------------------

# Names a fragment may use without defining them: what the text around it establishes.
CONTEXT_NAMES = frozenset({"app"})
DOTTED = re.compile(r"^service(?:\.\w+)+(?::\w+)?$")


def is_app(tree: ast.Module) -> bool:
    """A complete app: it makes ``app = Flask(__name__)`` itself, at module level."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name) and node.value.func.id == "Flask"
                and any(isinstance(t, ast.Name) and t.id == "app" for t in node.targets)):
            return True
    return False


def free_names(tree: ast.Module) -> set[str]:
    """Names a block reads but never binds (imports, assignments, defs, parameters)."""
    bound: set[str] = set()
    loaded: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return loaded - bound - set(dir(builtins))


def imported(tree: ast.Module) -> list[tuple[str, str | None]]:
    """(module, name) of every import in the block, nested ones included."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.module, alias.name) for alias in node.names if alias.name != "*"]
    return found


def dotted_paths(tree: ast.Module) -> list[str]:
    """String constants that name an object of the project (``"service.backend.X"``)."""
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and DOTTED.match(node.value)]


@dataclass(frozen=True)
class Route:
    path: str             # with converters filled in: /users/<int:user_id> -> /users/1
    swr_cached: bool      # decorated with @swr.cached: MISS then HIT


def routes(tree: ast.Module) -> list[Route]:
    """The GET routes an app sample declares with ``@app.get``/``@app.route``."""
    found: list[Route] = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        path = None
        swr_cached = False
        for deco in node.decorator_list:
            call = deco if isinstance(deco, ast.Call) else None
            func = call.func if call else deco
            if not isinstance(func, ast.Attribute) or not isinstance(func.value, ast.Name):
                continue
            if func.value.id == "app" and func.attr in ("get", "route") and call and call.args:
                methods = [k for k in call.keywords if k.arg == "methods"]
                if methods and "GET" not in ast.literal_eval(methods[0].value):
                    continue
                path = ast.literal_eval(call.args[0])
            if func.value.id == "swr" and func.attr == "cached":
                swr_cached = True
        if path is not None:
            path = re.sub(r"<int:\w+>", "1", path)
            path = re.sub(r"<(?:\w+:)?\w+>", "x", path)
            found.append(Route(path, swr_cached))
    return found


# --------------------------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------------------------

LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to ``-``."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def broken_links(path: Path) -> list[str]:
    """Relative links of a Markdown file whose file or heading does not exist."""
    problems = []
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        if fenced:
            continue
        for match in LINK.finditer(line):
            target = match["target"]
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            where = (path.parent / file).resolve() if file else path
            if not where.exists():
                problems.append(f"{number}: {target}: no such file")
            elif anchor and where.suffix == ".md" and anchor not in anchors(where):
                problems.append(f"{number}: {target}: no such heading in {where.name}")
    return problems
