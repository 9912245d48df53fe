"""The model registry: which cache keys and tags a model's rows stand behind, invalidated after
every save, delete and many-to-many change, in `transaction.on_commit` (never before the
commit: a reader that misses after the invalidation reads the committed row).

    # settings.py
    INSTALLED_APPS = [..., "invalbus.django"]
    INVALBUS_MODELS = {
        "blog.Article": {
            "keys": ["article:{pk}"],                 # Django cache keys (KEY_PREFIX/VERSION apply)
            "tags": ["article:{pk}", "author:{author_id}", "articles"],
            "version_field": "version",               # keys are invalidated at this data version
            "cache": "default",                       # the CACHES alias (an InvalbusCache)
        },
    }

or, in code, `invalbus.django.register(Article, keys=[...], tags=[...])`. Placeholders are the
instance's attributes (`{pk}`, `{author_id}`, `{slug}`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core.cache import caches
from django.db import transaction
from django.db.models import Model, signals

log = logging.getLogger("invalbus.django")


@dataclass(frozen=True)
class Registration:
    """What one model's rows stand behind."""

    keys: Sequence[str] = ()
    tags: Sequence[str] = ()
    version_field: str | None = None
    cache: str = "default"
    extra: dict[str, Any] = field(default_factory=dict)

    def targets(self, instance: Model) -> tuple[list[str], list[str], int | None]:
        """The keys, the tags and the data version of one row."""
        attrs = _Attrs(instance)
        keys = [k.format_map(attrs) for k in self.keys]
        tags = [t.format_map(attrs) for t in self.tags]
        version = None
        if self.version_field:
            v = getattr(instance, self.version_field, None)
            version = int(v) if v is not None else None
        return keys, tags, version


class _Attrs(dict):  # type: ignore[type-arg]
    def __init__(self, instance: Model) -> None:
        super().__init__()
        self.instance = instance

    def __missing__(self, name: str) -> Any:
        return getattr(self.instance, name)


_registry: dict[type[Model], Registration] = {}


def registered() -> dict[type[Model], Registration]:
    """The registered models."""
    return dict(_registry)


def register(
    model: type[Model],
    *,
    keys: Sequence[str] = (),
    tags: Sequence[str] = (),
    version_field: str | None = None,
    cache: str = "default",
) -> type[Model]:
    """Invalidates `keys` and `tags` of a row after each committed save, delete or many-to-many
    change of `model`. Usable as a class decorator."""
    if not keys and not tags:
        raise ValueError(f"register({model.__name__}): give keys or tags to invalidate")
    reg = Registration(tuple(keys), tuple(tags), version_field, cache)
    first = model not in _registry
    _registry[model] = reg
    if first:
        uid = f"invalbus:{model._meta.label}"
        signals.post_save.connect(_saved, sender=model, dispatch_uid=uid + ":save", weak=False)
        signals.post_delete.connect(_deleted, sender=model, dispatch_uid=uid + ":delete", weak=False)
        for m2m in model._meta.many_to_many:
            through = m2m.remote_field.through
            signals.m2m_changed.connect(_m2m, sender=through, dispatch_uid=f"{uid}:m2m:{m2m.name}", weak=False)
    return model


def connect_from_settings() -> None:
    """Registers every model of the `INVALBUS_MODELS` setting."""
    for label, spec in getattr(settings, "INVALBUS_MODELS", {}).items():
        model = apps.get_model(label)
        register(
            model,
            keys=spec.get("keys", ()),
            tags=spec.get("tags", ()),
            version_field=spec.get("version_field"),
            cache=spec.get("cache", "default"),
        )


def _invalidate(reg: Registration, instance: Model, using: str | None, why: str) -> None:
    keys, tags, version = reg.targets(instance)
    label = instance._meta.label

    def run() -> None:
        cache = caches[reg.cache]
        for k in keys:
            cache.invalidate_key(k, data_version=version)
        for t in tags:
            cache.invalidate_tag(t)
        log.debug("invalbus: %s %s pk=%s: invalidated keys %s, tags %s", why, label, instance.pk, keys, tags)

    transaction.on_commit(run, using=using)


def _saved(sender: type[Model], instance: Model, using: str | None = None, **kwargs: Any) -> None:
    reg = _registry.get(sender)
    if reg is not None:
        _invalidate(reg, instance, using, "save")


def _deleted(sender: type[Model], instance: Model, using: str | None = None, **kwargs: Any) -> None:
    reg = _registry.get(sender)
    if reg is not None:
        _invalidate(reg, instance, using, "delete")


def _m2m(
    sender: Any,
    instance: Model,
    action: str,
    model: type[Model],
    pk_set: set[Any] | None,
    using: str | None = None,
    **kwargs: Any,
) -> None:
    if not action.startswith("post_"):
        return
    reg = _registry.get(type(instance))
    if reg is not None:
        _invalidate(reg, instance, using, f"m2m {action}")
    # The other side of the relation changed too.
    other = _registry.get(model)
    if other is not None and pk_set:
        for row in model._default_manager.using(using).filter(pk__in=pk_set):
            _invalidate(other, row, using, f"m2m {action}")
