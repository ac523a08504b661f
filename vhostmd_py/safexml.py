"""The one hardened lxml parser set-up for every XML document we read.

Configs, libvirt's domain XML, xml-metric output and the metrics document a
guest reads may all be hostile or broken: the parser never touches the
network, never loads a DTD and never expands entities (no XXE, no billion
laughs), and refuses huge trees. Validation against our own DTDs is done
explicitly with lxml.etree.DTD, never through a DOCTYPE.
"""

from __future__ import annotations

from lxml import etree


def safe_parser() -> etree.XMLParser:
    """A new hardened parser (one per call: lxml parsers are not thread-safe)."""
    return etree.XMLParser(
        resolve_entities=False,
        load_dtd=False,
        no_network=True,
        dtd_validation=False,
        huge_tree=False,
    )
