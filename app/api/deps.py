"""Typed dependencies, as `Annotated` aliases (SettingsDep, RegistryDep, CeleryDep)."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from app.core.config import Settings
from app.registry import Registry


def get_settings_dep(request: Request) -> Settings:
    """The app's settings (set by create_app)."""
    return request.app.state.settings


def get_registry(request: Request) -> Registry:
    """The app's registry client."""
    return request.app.state.registry


def get_celery(request: Request) -> Celery:
    """The Celery client that sends tasks to the workers."""
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
