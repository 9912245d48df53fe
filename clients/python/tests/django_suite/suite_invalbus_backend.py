"""Django's own cache test suite (`BaseCacheTests`, as django-redis reuses it) against
InvalbusCache on a real node. Tests that cannot pass are listed in EXCLUDED with the reason."""

import os
import unittest

from cache.tests import BaseCacheTests, caches_setting_for_tests
from django.test import TestCase, override_settings

BACKEND = {
    "BACKEND": "invalbus.django.InvalbusCache",
    "LOCATION": os.environ["INVALBUS_LOCATION"],
    "OPTIONS": {
        "TOKEN": os.environ["INVALBUS_TOKEN"],
        "LOCAL_MAX_ENTRIES": int(os.environ.get("INVALBUS_LOCAL_MAX_ENTRIES", "0")),
        "READ_SOCKET": os.environ.get("INVALBUS_READ_SOCKET") or None,
    },
}

#: Tests of BaseCacheTests that cannot pass, and why.
EXCLUDED = {
    # The `cull` and `zero_cull` aliases are left out of CACHES (as for Django's own Redis
    # tests), so these three skip themselves: a node cache evicts by moka's size-aware policy
    # when it reaches `max_entries`, not by Django's MAX_ENTRIES/CULL_FREQUENCY, which the
    # backend does not implement.
    "test_cull": "no MAX_ENTRIES/CULL_FREQUENCY culling (moka evicts by its own policy)",
    "test_zero_cull": "no MAX_ENTRIES/CULL_FREQUENCY culling (moka evicts by its own policy)",
    "test_cull_delete_when_store_empty": "no MAX_ENTRIES/CULL_FREQUENCY culling",
}


@override_settings(CACHES=caches_setting_for_tests(base=BACKEND, exclude={"cull", "zero_cull"}))
class InvalbusCacheTests(BaseCacheTests, TestCase):
    pass


for _name, _why in EXCLUDED.items():
    setattr(InvalbusCacheTests, _name, unittest.skip(_why)(getattr(InvalbusCacheTests, _name)))
