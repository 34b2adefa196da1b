"""``/api/identities``: list, show, face crop, eval sheet, add (upload), joint, remove, rename.

Names in paths and forms are validated as the CLI validates them before anything is looked up;
uploads are bounded and decoded as `add` decodes photos; nothing a request sends becomes a path.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from ..errors import InvalidOption
from ..fitting.settings import MAX_PHOTOS
from . import work
from .state import State

router = APIRouter(prefix="/api/identities", tags=["identities"])

# Detected image kind -> the extension a staged photo gets (the client's file name is not used).
_KINDS = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF8", ".gif"),
          (b"BM", ".bmp"), (b"RIFF", ".webp"))
MAX_FORM_FIELDS = 16


def _summary(ident: Any) -> dict[str, Any]:
    data = ident.summary()
    evals = ident.meta.get("evals") or []
    data["latest_eval"] = evals[-1] if evals else None
    data["face_url"] = f"/api/identities/{ident.name}/face" if ident.has_face else None
    data["sheet_url"] = (f"/api/identities/{ident.name}/sheet"
                         if evals and evals[-1].get("sheet") else None)
    return data


@router.get("", summary="List identities (broken entries as warnings)")
async def list_identities(state: State) -> dict[str, Any]:
    def scan() -> dict[str, Any]:
        from .. import registry

        result = registry.list_identities()
        return {"identities": [_summary(i.full()) for i in result.identities],
                "warnings": list(result.warnings)}

    return await state.run_blocking(scan)


def _identity(name: str) -> Any:
    from .. import registry

    registry.validate_name(name)
    return registry.get_identity(name, verify="all")


@router.get("/{name}", summary="One identity's metadata and eval history")
async def show_identity(name: str, state: State) -> dict[str, Any]:
    ident = await state.run_blocking(_identity, name)
    return {"name": ident.name, **ident.meta, **{k: v for k, v in _summary(ident).items()
                                                 if k.endswith("_url")}}


@router.get("/{name}/face", summary="The aligned face crop (PNG)",
            responses={200: {"content": {"image/png": {}}}})
async def face(name: str, state: State, index: int = 1) -> Response:
    from ..errors import IdentityNotFound

    def read() -> bytes:
        ident = _identity(name)
        if not 1 <= index <= max(ident.face_count, 1):
            raise InvalidOption(f"'{name}' has {ident.face_count} face crop(s); index must be "
                                f"between 1 and {max(ident.face_count, 1)}.")
        data = ident.load_face_png(index)
        if data is None:
            raise IdentityNotFound(name, [])
        return data

    return Response(await state.run_blocking(read), media_type="image/png",
                    headers={"Cache-Control": "no-cache"})


@router.get("/{name}/sheet", summary="The contact sheet of the latest eval (PNG)",
            responses={200: {"content": {"image/png": {}}}})
async def sheet(name: str, state: State) -> Response:
    def read() -> bytes:
        from pathlib import Path

        from ..errors import StorageError
        from ..storage.special_files import read_regular_file

        ident = _identity(name)
        evals = ident.meta.get("evals") or []
        where = evals[-1].get("sheet") if evals else None
        # The path comes from the identity's own record (written by `eval`), never a request.
        if not where or not str(where).lower().endswith(".png"):
            raise StorageError(f"'{name}' has no eval contact sheet on record; run "
                               f"`celebctl eval {name}`.")
        return read_regular_file(Path(where), limit=64 * 2**20)

    return Response(await state.run_blocking(read), media_type="image/png")


def _kind(data: bytes) -> str:
    for magic, suffix in _KINDS:
        if data.startswith(magic):
            return suffix
    return ".img"  # load_photo says why it is not an image


@router.post("", status_code=202, summary="Add a person from 1-16 photos (multipart); a job")
async def add_identity(request: Request, state: State
                       ) -> dict[str, Any]:
    from starlette.datastructures import UploadFile

    form = await request.form(max_files=MAX_PHOTOS * 4, max_fields=MAX_FORM_FIELDS)
    try:
        name = form.get("name")
        if not isinstance(name, str):
            raise InvalidOption("Send the person's name in the form field 'name'.")
        uploads = [f for f in form.getlist("photos") if isinstance(f, UploadFile)]
        if len(uploads) > MAX_PHOTOS:
            raise InvalidOption(f"Give 1 to {MAX_PHOTOS} photos of the person, not "
                                f"{len(uploads)}.")
        photos = []
        for upload in uploads:
            data = await upload.read(work.MAX_PHOTO_UPLOAD + 1)
            photos.append(data)
        replace = str(form.get("replace", "false")).lower() in ("1", "true", "yes", "on")
        steps = _int_field(form.get("steps"), "steps")
        seed = _int_field(form.get("seed"), "seed") or 0
    finally:
        await form.close()
    await state.run_blocking(work.check_add, name, photos, replace=replace, steps=steps)
    folder, paths = await state.run_blocking(work.stage_photos, photos,
                                             [_kind(p) for p in photos])
    try:
        job = state.queue.submit("add", f"add {name}",
                                 work.add(state.settings, name, folder, paths, replace=replace,
                                          steps=steps, seed=seed))
    except BaseException:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        raise
    return {"job": job.to_dict()}


def _int_field(value: Any, label: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(str(value))
    except ValueError:
        raise InvalidOption(f"{label} must be a whole number, not {str(value)[:20]!r}.") from None


class JointRequest(BaseModel):
    names: list[str] = Field(min_length=2, max_length=16)
    steps: int | None = None
    seed: int = 0


@router.post("/joint", status_code=202, summary="Refit identities together; a job")
async def joint(body: JointRequest, state: State) -> dict[str, Any]:
    from ..fitting.identities import _check_joint

    if body.steps is not None and not 1 <= body.steps <= work.MAX_FIT_STEPS:
        raise InvalidOption(f"steps must be between 1 and {work.MAX_FIT_STEPS}.")
    await state.run_blocking(_check_joint, body.names, None)
    job = state.queue.submit("joint", "joint " + " ".join(body.names),
                             work.joint(state.settings, body.names, steps=body.steps,
                                        seed=body.seed))
    return {"job": job.to_dict()}


@router.delete("/{name}", summary="Remove an identity")
async def remove(name: str, state: State) -> dict[str, Any]:
    def delete() -> dict[str, Any]:
        from .. import registry
        from ..errors import IdentityNotFound

        registry.validate_name(name)
        if not registry.identity_dir(name).exists():
            raise IdentityNotFound(name, registry.known_names())
        return {"removed": registry.remove_identity(name).name}

    return await state.run_blocking(delete)


class RenameRequest(BaseModel):
    new_name: str


@router.post("/{name}/rename", summary="Rename an identity")
async def rename(name: str, body: RenameRequest, state: State
                 ) -> dict[str, Any]:
    def move() -> dict[str, Any]:
        from .. import registry

        registry.validate_name(name)
        return {"renamed": name, "name": registry.rename_identity(name, body.new_name).name}

    return await state.run_blocking(move)
