from django.db import models


class Label(models.Model):
    name = models.CharField(max_length=50, unique=True)


class Article(models.Model):
    title = models.CharField(max_length=200)
    body = models.TextField()
    author = models.CharField(max_length=50)
    # Bumped by every write (the data version the cache keys are invalidated at).
    version = models.PositiveIntegerField(default=1)
    labels = models.ManyToManyField(Label, blank=True)

    def save(self, *args, **kwargs):
        if self.pk is not None:
            self.version += 1
        super().save(*args, **kwargs)
