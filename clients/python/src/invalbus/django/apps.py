"""The app config: connects the models named in the `INVALBUS_MODELS` setting when Django starts."""

from __future__ import annotations

from django.apps import AppConfig


class InvalbusConfig(AppConfig):
    name = "invalbus.django"
    label = "invalbus_django"
    verbose_name = "invalbus"

    def ready(self) -> None:
        from .registry import connect_from_settings

        connect_from_settings()
