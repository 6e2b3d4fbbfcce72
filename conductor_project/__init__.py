"""Conductor's Django project: settings, the Celery app and URL routing."""

from conductor_project.celery import app as celery_app

__all__ = ("celery_app",)
