"""The supported kinds of base layers: importing a module registers its kind (see layers.registry)."""

from . import bitsandbytes, conv1d, linear  # noqa: F401
