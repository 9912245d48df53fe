"""The example project end to end: views read through the cache, and the registry invalidates
after commits (never before), including many-to-many changes."""

from __future__ import annotations

import json

from cluster import Node, wait_for


def get(path: str) -> dict:
    from django.test import Client

    r = Client().get(path)
    assert r.status_code == 200, r.content
    return json.loads(r.content)


def test_a_committed_write_is_seen_by_the_next_read(blog_node: Node) -> None:
    from blog.models import Article, Label
    from django.core.cache import cache
    from django.db import transaction

    a = Article.objects.create(title="Hello", body="v1", author="ada")
    assert get(f"/articles/{a.pk}")["body"] == "v1"
    assert cache.get(f"article:{a.pk}")["body"] == "v1", "the view cached the article"

    with transaction.atomic():
        a.body = "v2"
        a.save()
        # Not committed yet: the invalidation waits for the commit, so the cache still holds v1
        # (and a reader elsewhere would read v1 from the database too).
        assert cache.get(f"article:{a.pk}")["body"] == "v1"
    # Committed: the key was invalidated at the new version.
    assert cache.get(f"article:{a.pk}") is None
    assert get(f"/articles/{a.pk}") == {
        "title": "Hello",
        "body": "v2",
        "author": "ada",
        "version": 2,
        "labels": [],
    }

    # A rolled-back write invalidates nothing.
    try:
        with transaction.atomic():
            a.body = "never"
            a.save()
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    assert cache.get(f"article:{a.pk}")["body"] == "v2"

    # A many-to-many change invalidates too.
    a.refresh_from_db()
    a.labels.add(Label.objects.create(name="news"))
    wait_for(
        "the label change to invalidate the article",
        lambda: cache.get(f"article:{a.pk}") is None,
        10,
    )
    assert get(f"/articles/{a.pk}")["labels"] == ["news"]


def test_tags_drop_lists_when_any_article_of_the_author_changes(
    blog_node: Node,
) -> None:
    from blog.models import Article

    Article.objects.create(title="One", body="b", author="grace")
    assert get("/authors/grace")["titles"] == ["One"]
    Article.objects.create(title="Two", body="b", author="grace")
    assert get("/authors/grace")["titles"] == ["One", "Two"]
    Article.objects.filter(title="One").get().delete()
    assert get("/authors/grace")["titles"] == ["Two"]
