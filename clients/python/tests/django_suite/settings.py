"""Settings for Django's own cache tests (`tests/cache` of Django's source distribution, on
sys.path as the app `cache`) against InvalbusCache. `run.py` sets INVALBUS_LOCATION."""

import os

SECRET_KEY = "django-suite-not-secret"
USE_TZ = False
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "cache"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
INVALBUS_OPTIONS = {
    "TOKEN": os.environ.get("INVALBUS_TOKEN", ""),
    "LOCAL_MAX_ENTRIES": int(os.environ.get("INVALBUS_LOCAL_MAX_ENTRIES", "0")),
}
CACHES = {
    "default": {
        "BACKEND": "invalbus.django.InvalbusCache",
        "LOCATION": os.environ.get("INVALBUS_LOCATION", "127.0.0.1:7700"),
        "OPTIONS": INVALBUS_OPTIONS,
    }
}
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
