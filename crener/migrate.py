"""Old home of :mod:`crener.tools.migrate`: installed ``crener.commands`` entry points still name
``crener.migrate:register`` until the package is reinstalled."""

from crener.tools.migrate import register  # noqa: F401
