"""mandrill's version, as its installed distribution says (one place for the CLI's
``--version``, the fleet's status and ``mandrill_build_info``)."""

from __future__ import annotations

import functools
import importlib.metadata

#: The distribution mandrill is installed as (the import package and command are
#: ``mandrill``; ``mandrill`` on the public index is another project).
DISTRIBUTION = "mayhem-mandrill"


@functools.cache
def version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"
