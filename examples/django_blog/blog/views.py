from django.core.cache import cache
from django.http import Http404, JsonResponse

from .models import Article


def article(request, pk: int):
    # Ordinary Django code: get, query, set. The miss's reservation is remembered for this
    # thread and the set fills through it, so a value read before another worker's write is not
    # cached after it. The registry (settings.INVALBUS_MODELS) invalidates `article:<pk>` after
    # each committed write.
    key = f"article:{pk}"
    data = cache.get(key)
    if data is None:
        a = Article.objects.filter(pk=pk).first()
        if a is None:
            raise Http404
        data = {
            "title": a.title,
            "body": a.body,
            "author": a.author,
            "version": a.version,
            "labels": sorted(a.labels.values_list("name", flat=True)),
        }
        cache.set(key, data)
    return JsonResponse(data)


def by_author(request, author: str):
    # Read-through with tags: a write of any article of the author purges the tag.
    titles = cache.get_or_load(
        f"author-list:{author}",
        lambda: list(Article.objects.filter(author=author).order_by("pk").values_list("title", flat=True)),
        tags=[f"author:{author}"],
    )
    return JsonResponse({"titles": titles})
