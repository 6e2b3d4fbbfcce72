"""The Celery app; configuration comes from Django settings under the CELERY_ namespace."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "conductor_project.settings.base")

app = Celery("conductor")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
