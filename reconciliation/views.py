"""The operations dashboard (staff only): one page and the one JSON endpoint it draws from."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from reconciliation.dashboard import PRIORITIES, WINDOWS, dashboard_data
from reconciliation.heartbeats import periodic_jobs_check
from reconciliation.models import Drill


@staff_member_required
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "reconciliation/dashboard.html",
        {
            **admin.site.each_context(request),
            "is_nav_sidebar_enabled": False,
            "windows": list(WINDOWS),
            "priorities": PRIORITIES,
            "title": "Dashboard",
            "last_drill": Drill.objects.order_by("-started_at").first(),
        },
    )


@staff_member_required
def dashboard_data_view(request: HttpRequest) -> JsonResponse:
    window = request.GET.get("window", "1h")
    priority = request.GET.get("priority", "")
    if window not in WINDOWS:
        return JsonResponse({"window": [f"Must be one of {', '.join(WINDOWS)}."]}, status=400)
    if priority and priority not in PRIORITIES:
        return JsonResponse({"priority": [f"Must be empty (all) or one of {', '.join(PRIORITIES)}."]}, status=400)
    # Someone looking is a clock beat does not drive: overdue periodic jobs' alerts open (or resolve) now.
    periodic_jobs_check()
    return JsonResponse(dashboard_data(window=window, priority=priority))
