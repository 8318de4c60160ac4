"""Sub-commands of the ``histofm`` CLI, one module each (see ``histofm.cli``)."""
