"""Griffe extension for the API reference: turn the docstrings' Sphinx roles into links.

The code's docstrings cite objects as ``:class:`~distill.methods.kd.OfflineKD``` or ``:func:`set_width```.
Markdown does not know these roles, so before rendering every role becomes a cross-reference
``[OfflineKD][distill.methods.kd.OfflineKD]`` when its target is an object the reference renders
(public, documented, in a ``distill`` module), and plain code otherwise. An unqualified name is
looked up from the citing object outwards (its class, then its module). A link whose target the
reference does not render fails the strict build, so a renamed object cannot leave a dead link.
reST's ``text::`` before a literal block becomes ``text:``.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`(~?)([^`]+)`")
LITERAL_MARKER = re.compile(r"(?<=\S)::$", re.M)  # reST's "text::" before a literal block reads "text:"


def _target(collection, path: str):
    """The object at ``path`` with imports followed, or None."""
    try:
        obj = collection.get_member(path)
        return obj.final_target if obj.is_alias else obj
    except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _rendered(obj) -> bool:
    """Whether the API pages show ``obj``: public all the way down and documented (a class's or a
    module's members are shown only when they have a docstring)."""
    if not obj.path.startswith("distill."):
        return False
    node = obj
    while node is not None and not node.is_module:
        if node.name.startswith("_") and not node.name.startswith("__") or not node.has_docstring:
            return False
        node = node.parent
    return True


def _resolve(collection, owner, name: str):
    if name.startswith("distill."):
        return _target(collection, name)
    scope = owner if owner.is_class or owner.is_module else owner.parent
    while scope is not None:
        found = _target(collection, f"{scope.path}.{name}")
        if found is not None:
            return found
        scope = scope.parent
    return None


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        collection = loader.modules_collection
        pending = [pkg]
        while pending:
            obj = pending.pop()
            if obj.is_alias:
                continue
            pending.extend(obj.members.values())
            if obj.docstring is not None:
                text = ROLE.sub(lambda m, owner=obj: self._replace(collection, owner, m), obj.docstring.value)
                obj.docstring.value = LITERAL_MARKER.sub(":", text)

    @staticmethod
    def _replace(collection, owner, match: re.Match) -> str:
        short, name = match.group(1) == "~", match.group(2)
        label = name.rsplit(".", 1)[-1] if short else name
        target = _resolve(collection, owner, name)
        if target is None or not _rendered(target):
            return f"`{label}`"
        return f"[`{label}`][{target.path}]"
