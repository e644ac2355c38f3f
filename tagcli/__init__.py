"""tagcli: tag machine-learning content with one approved tag each.

Importing the package loads no heavy dependency; see `tagcli.cli`.
"""

__version__ = "0.1.0"
