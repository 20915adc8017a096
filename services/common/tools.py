"""Tool protocols for retrieval inside generation: one definition of each protocol's tags, how documents are
formatted into a completion, and how queries and document blocks are found and stripped again.

Generation runs the tool loop with these tags, reward scores R1-Searcher's / Search-R1's formats with them, eval
strips the blocks before checking claims, the demo model is taught with them, and the CLI, the run config and the
proto enum list their names from :data:`TOOL_PROTOCOLS`. Adding a protocol is one entry here (and, for gRPC
callers, its ``TOOL_PROTOCOL_<NAME>`` enum value in ``generation_service.proto``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class ToolProtocol:
    """A protocol's tags and document format: the model writes ``query_open`` query ``query_close``; the service
    inserts ``docs_open`` documents ``docs_close``; ``doc_line`` formats one passage (``i``, ``title``, ``text``)."""

    name: str
    query_open: str
    query_close: str
    docs_open: str
    docs_close: str
    doc_line: str

    @property
    def tags(self) -> tuple[str, str, str, str]:
        return self.query_open, self.query_close, self.docs_open, self.docs_close

    @property
    def enum_name(self) -> str:
        """Its value in the generation proto's ``ToolProtocol`` enum."""
        return enum_name(self.name)

    def format_documents(self, passages) -> str:
        """The block inserted after a query; ``passages`` have ``title`` and ``text``.

        >>> class P: title, text = "Paris", "Paris is the capital of France."
        >>> TOOL_PROTOCOLS["r1_searcher"].format_documents([P()])
        '\\n<|begin_of_documents|>\\n(1) Paris: Paris is the capital of France.\\n<|end_of_documents|>\\n'
        >>> TOOL_PROTOCOLS["search_r1"].format_documents([P()])
        '\\n<information>\\nDoc 1(Title: Paris) Paris is the capital of France.\\n</information>\\n'
        """
        body = "\n".join(self.doc_line.format(i=i, title=p.title, text=p.text) for i, p in enumerate(passages, 1))
        return f"\n{self.docs_open}\n{body}\n{self.docs_close}\n"

    @cached_property
    def _query(self) -> re.Pattern:
        return re.compile(re.escape(self.query_open) + r"(.*?)" + re.escape(self.query_close), re.S)

    @cached_property
    def _exchange(self) -> re.Pattern:
        return re.compile(re.escape(self.query_open) + r"(.*?)" + re.escape(self.query_close) + r"\s*"
                          + re.escape(self.docs_open) + r"(.*?)" + re.escape(self.docs_close), re.S)

    @cached_property
    def _blocks(self) -> re.Pattern:
        return re.compile("|".join(re.escape(o) + ".*?" + re.escape(c) for o, c in
                                   ((self.docs_open, self.docs_close), (self.query_open, self.query_close))), re.S)

    def queries(self, text: str) -> list[str]:
        """Bodies of the closed queries in ``text``.

        >>> TOOL_PROTOCOLS["search_r1"].queries("<search> a b </search> x <search>c</search>")
        [' a b ', 'c']
        """
        return [m.group(1) for m in self._query.finditer(text)]

    def exchanges(self, text: str) -> list[tuple[str, str]]:
        """(query, documents) of each well-formed exchange: a non-empty query followed by its documents block.

        >>> TOOL_PROTOCOLS["r1_searcher"].exchanges("<|begin_of_query|>capital of France<|end_of_query|>"
        ...                                          "<|begin_of_documents|>(1) Paris<|end_of_documents|>")
        [('capital of France', '(1) Paris')]
        """
        return [(m.group(1), m.group(2)) for m in self._exchange.finditer(text) if m.group(1).strip()]

    def last_query(self, text: str) -> str:
        """The query a model just closed: the text after the last open tag (the whole tail if it wrote none).

        >>> TOOL_PROTOCOLS["r1_searcher"].last_query("I should search.<|begin_of_query|> Ada Lovelace <|end_of_query|>")
        'Ada Lovelace'
        """
        body = text.rsplit(self.query_open, 1)[-1]
        return body.split(self.query_close, 1)[0].strip() or text.strip()[-200:]

    def strip_blocks(self, text: str) -> str:
        """``text`` without its query and document blocks."""
        return self._blocks.sub(" ", text)


def enum_name(protocol: str) -> str:
    """The generation proto's enum value name of a protocol name ('' = none).

    >>> enum_name("r1_searcher"), enum_name("")
    ('TOOL_PROTOCOL_R1_SEARCHER', 'TOOL_PROTOCOL_UNSPECIFIED')
    """
    return f"TOOL_PROTOCOL_{protocol.upper()}" if protocol else "TOOL_PROTOCOL_UNSPECIFIED"


def from_enum_name(value: str) -> str:
    """The protocol name of a proto enum value name ('' for UNSPECIFIED); ValueError for an unknown protocol.

    >>> from_enum_name("TOOL_PROTOCOL_SEARCH_R1"), from_enum_name("TOOL_PROTOCOL_UNSPECIFIED")
    ('search_r1', '')
    """
    name = value.removeprefix("TOOL_PROTOCOL_").lower()
    if name == "unspecified":
        return ""
    if name not in TOOL_PROTOCOLS:
        raise ValueError(f"unknown tool protocol {value!r}; use one of {NAMES}")
    return name


TOOL_PROTOCOLS: dict[str, ToolProtocol] = {p.name: p for p in (
    # R1-Searcher (RUCAIBox, arXiv 2503.05592)
    ToolProtocol("r1_searcher", "<|begin_of_query|>", "<|end_of_query|>", "<|begin_of_documents|>",
                 "<|end_of_documents|>", "({i}) {title}: {text}"),
    # Search-R1 (PeterGriffinJin/Search-R1)
    ToolProtocol("search_r1", "<search>", "</search>", "<information>", "</information>",
                 "Doc {i}(Title: {title}) {text}"),
)}
NAMES: tuple[str, ...] = tuple(TOOL_PROTOCOLS)
DEFAULT = "r1_searcher"


def check(name: str, field: str = "tool_protocol", allow_empty: bool = True) -> str:
    """``name`` if it names a protocol (or is empty, when allowed); ValueError naming the field and the choices."""
    if (name == "" and allow_empty) or name in TOOL_PROTOCOLS:
        return name
    raise ValueError(f"{field}: unknown tool protocol {name!r}; use one of {NAMES}"
                     + (" or '' for none" if allow_empty else ""))


def strip_tool_blocks(text: str, protocols: Sequence[ToolProtocol] | None = None) -> str:
    """``text`` without the query and document blocks of every protocol (what the model itself asserted).

    >>> strip_tool_blocks("a<|begin_of_query|>q<|end_of_query|><|begin_of_documents|>d<|end_of_documents|>b "
    ...                   "<search>q</search><information>d</information>c")
    'a  b   c'
    """
    for p in protocols or TOOL_PROTOCOLS.values():
        text = p.strip_blocks(text)
    return text
