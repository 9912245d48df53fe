"""A minimal Django project whose cache is an invalbus node: the `CACHES` entry and the
`INVALBUS_MODELS` registry are all it takes (with `pip install ./clients/python` and a node)."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = True
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "blogsite.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
INSTALLED_APPS = ["django.contrib.contenttypes", "invalbus.django", "blog"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("BLOG_DB", str(BASE_DIR / "db.sqlite3")),
    }
}

CACHES = {
    "default": {
        "BACKEND": "invalbus.django.InvalbusCache",
        # The node's sidecar: a Unix socket (unix:/run/invalbus.sock) or host:port.
        "LOCATION": os.environ.get("INVALBUS_LOCATION", "unix:/run/invalbus.sock"),
        "OPTIONS": {
            "TOKEN": os.environ.get("INVALBUS_TOKEN", ""),
            "LOCAL_MAX_ENTRIES": 10_000,  # the in-process layer; 0 turns it off
        },
    }
}

# Each save, delete or tag change of an article invalidates, after the commit, the article's
# cache key (at its version) and its tags, in every process on every host.
INVALBUS_MODELS = {
    "blog.Article": {
        "keys": ["article:{pk}"],
        "tags": ["author:{author}", "articles"],
        "version_field": "version",
    },
}
