"""REST routes of the trainer: status, start, cancel, saved settings.

No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations at run time.

Registered on the WebUI's FastAPI app (``on_app_started``, only with ``--api``) and on the standalone app's.  When
the server has credentials (the WebUI's ``--api-auth user:pass,user2:pass2``, the app's ``--auth``) every route asks
for HTTP basic auth, as the WebUI's own API does.  A settings JSON that cannot be used answers 422 with every
problem as a sentence.
"""

import secrets
from typing import Any

from ..errors import DreamBoothError
from ..runner import Runner, RunnerBusy
from ..settings import Settings, SettingsError

PREFIX = "/dreambooth"


def parse_credentials(api_auth: str | None) -> dict[str, str] | None:
    """``user:pass,user2:pass2`` (the WebUI's ``--api-auth`` format) -> {user: password}; None when not set.

    A value without any ``user:pass`` pair gives {}: no one is let in (a typo must not open the routes).
    """
    if not (api_auth or "").strip():
        return None
    pairs = [item.split(":", 1) for item in api_auth.split(",") if ":" in item]
    return {user.strip(): password.strip() for user, password in pairs}


def register_routes(app: Any, runner: Runner, credentials: dict[str, str] | None = None) -> None:
    """Add the routes to the FastAPI ``app``; with ``credentials`` ({user: password}, even empty) each asks for
    HTTP basic auth."""
    from fastapi import Body, Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    host = runner.host
    basic = HTTPBasic(auto_error=False)

    def authorised(given: HTTPBasicCredentials | None = Depends(basic)) -> None:  # noqa: B008 (FastAPI idiom)
        if credentials is None:
            return
        if given is not None and given.username in credentials:
            expected = credentials[given.username].encode()
            if secrets.compare_digest(given.password.encode(), expected):
                return
        raise HTTPException(status_code=401, detail="wrong user or password", headers={"WWW-Authenticate": "Basic"})

    guard = [Depends(authorised)]

    def status() -> dict[str, Any]:
        return runner.snapshot().to_dict()

    def start(payload: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        notes: list[str] = []  # the guide's names that were translated or are ignored
        try:
            entered = Settings.from_dict(payload, notes=notes)
            settings = host.prepare(entered)
            job_id = runner.start(settings)
        except SettingsError as error:
            raise HTTPException(status_code=422, detail=error.problems) from error
        except RunnerBusy as error:
            raise HTTPException(status_code=409, detail=str(error)) from error
        except DreamBoothError as error:
            raise HTTPException(status_code=422, detail=[str(error)]) from error
        host.remember_last_used(entered)  # as sent: a run folder picked for an empty class folder stays per run
        return {
            "job_id": job_id,
            "model_name": settings.model_name,
            "checkpoint_dir": settings.checkpoint_dir,
            "lora_dir": settings.lora_dir,  # where a LoRA / LoHa / LoKr run writes its files
            "notes": notes,
        }

    def cancel() -> dict[str, Any]:
        return {"cancelled": runner.cancel()}

    def saved() -> dict[str, Any]:
        return {"saved": host.saved_settings()}

    def saved_one(name: str) -> dict[str, Any]:
        try:
            return host.load_settings(name).to_dict()
        except (FileNotFoundError, DreamBoothError) as error:
            raise HTTPException(status_code=404, detail=str(error)) from error

    app.add_api_route(f"{PREFIX}/status", status, methods=["GET"], dependencies=guard)
    app.add_api_route(f"{PREFIX}/start", start, methods=["POST"], dependencies=guard)
    app.add_api_route(f"{PREFIX}/cancel", cancel, methods=["POST"], dependencies=guard)
    app.add_api_route(f"{PREFIX}/settings", saved, methods=["GET"], dependencies=guard)
    app.add_api_route(f"{PREFIX}/settings/{{name}}", saved_one, methods=["GET"], dependencies=guard)
