"""Changing run-time settings from tests, and calling as a named administrator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from ledger.v1 import admin_service_pb2 as admin_pb
from ledger.v1 import admin_service_pb2_grpc
from ledger_server.server.identity import ACTOR_METADATA_KEY
from support.ledger import new_key


class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, base: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = base.wait_for_ready
        self.compression = base.compression


class ActorMetadata(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds `x-ledger-actor: <actor>` to every call of a channel."""

    def __init__(self, actor: str) -> None:
        self._actor = actor

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        metadata = [*(details.metadata or ()), (ACTOR_METADATA_KEY, self._actor)]
        return continuation(_Details(details, metadata), request)


def to_value(value: object) -> struct_pb2.Value:
    out = struct_pb2.Value()
    json_format.ParseDict(value, out)
    return out


class SettingsChanger:
    def __init__(self, admin: admin_service_pb2_grpc.AdminServiceStub) -> None:
        self._admin = admin
        self._saved: dict[str, admin_pb.Setting] = {}

    def _save(self, key: str) -> None:
        if key not in self._saved:
            current = {
                s.key: s for s in self._admin.ListSettings(admin_pb.ListSettingsRequest()).settings
            }
            self._saved[key] = current[key]

    def __call__(self, key: str, value: object) -> admin_pb.Setting:
        self._save(key)
        return self._admin.UpdateSetting(
            admin_pb.UpdateSettingRequest(
                key=key, value=to_value(value), reason="test", idempotency_key=new_key()
            )
        ).setting

    def reset(self, key: str) -> admin_pb.Setting:
        self._save(key)
        return self._admin.UpdateSetting(
            admin_pb.UpdateSettingRequest(
                key=key, reset=True, reason="test", idempotency_key=new_key()
            )
        ).setting

    def restore(self) -> None:
        for key, saved in self._saved.items():
            if saved.source == admin_pb.SETTING_SOURCE_ADMIN:
                request = admin_pb.UpdateSettingRequest(
                    key=key, value=saved.value, reason="restore", idempotency_key=new_key()
                )
            else:
                request = admin_pb.UpdateSettingRequest(
                    key=key, reset=True, reason="restore", idempotency_key=new_key()
                )
            self._admin.UpdateSetting(request)
