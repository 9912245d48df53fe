"""Django integration: the cache backend (`InvalbusCache`) and the model registry that invalidates
after commits (`register`, the `INVALBUS_MODELS` setting; add `"invalbus.django"` to
INSTALLED_APPS to connect it)."""

from .cache import InvalbusCache
from .registry import register, registered

__all__ = ["InvalbusCache", "register", "registered"]
