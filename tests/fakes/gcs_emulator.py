"""A local Google Cloud Storage for tests: PyPI's gcp-storage-emulator on 127.0.0.1, with the
parts of the JSON API it lacks and our clients rely on.

- Downloads carry `x-goog-generation`, from which TensorStore learns an object's generation
  (OCDBT rewrites its manifest "only if still at generation N").
- Uploads and deletes honour `ifGenerationMatch` (0: only if absent), answering 412 otherwise,
  as GCS does; the run lock depends on it.
- `objects.move` (`.../o/SRC/moveTo/o/DST`), which gcsfs tries first for each object of a
  rename (setting a damaged checkpoint aside). Without it the emulator answers 501, which
  gcsfs retries with back-off for about 1.7 s per object before it copies and deletes.

Usage: python gcs_emulator.py BUCKET  (prints the port, then serves until killed). Point the
clients at it with STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage) and
TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING (TensorStore).
"""

from __future__ import annotations

import sys
import time
from http import HTTPStatus

from gcp_storage_emulator import server, settings
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(storage, bucket: str, name: str) -> str:
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def _precondition_failed(request, storage, bucket: str, name: str | None) -> bool:
    wanted = request.query.get("ifGenerationMatch")
    return bool(wanted and name) and wanted[0] != _generation(storage, bucket, name)


def _refuse(response) -> None:
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": "Precondition Failed"}})


def download(request, response, storage, *args, **kwargs):
    objects_download(request, response, storage, *args, **kwargs)
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        obj = storage.get_file_obj(bucket, name)
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])


def insert(request, response, storage, *args, **kwargs):
    name = (request.query.get("name") or [None])[0]
    if _precondition_failed(request, storage, request.params["bucket_name"], name):
        return _refuse(response)
    objects_insert(request, response, storage, *args, **kwargs)
    time.sleep(1e-6)  # generations are nanosecond clocks: keep two writes apart


def delete(request, response, storage, *args, **kwargs):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    if _precondition_failed(request, storage, bucket, name):
        return _refuse(response)
    return objects_delete(request, response, storage, *args, **kwargs)


def move(request, response, storage, *args, **kwargs):
    bucket = request.params["bucket_name"]
    source, target = request.params["object_id"], request.params["dest_object_id"]
    if _precondition_failed(request, storage, bucket, target):
        return _refuse(response)
    try:
        moved = objects._copy(request.base_url, storage, bucket, source, bucket, target)
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    storage.delete_file(bucket, source)
    response.json(moved)


objects_download, objects_insert, objects_delete = objects.download, objects.insert, objects.delete
REPLACED = {objects.download: download, objects.insert: insert, objects.delete: delete}
for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
        handlers[method] = REPLACED.get(handler, handler)
objects.insert, objects.download = insert, download  # looked up there at call time too
# Before the generic object route, which would take `SRC/moveTo/o/DST` for an object's name.
server.HANDLERS = tuple(
    (rf"^{prefix}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
     r"(?P<dest_object_id>.*[^/]+)$", {"POST": move})
    for prefix in (settings.API_ENDPOINT, "")) + server.HANDLERS


def main() -> None:
    emulator = server.create_server("127.0.0.1", 0, in_memory=True, default_bucket=sys.argv[1])
    emulator.start()
    print(emulator._api._httpd.server_address[1], flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
