from django.urls import path

from blog import views

urlpatterns = [
    path("articles/<int:pk>", views.article),
    path("authors/<str:author>", views.by_author),
]
