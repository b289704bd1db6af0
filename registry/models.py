"""Registering and loading model versions safely.

``register_checkpoint`` logs an xai weights-only checkpoint (``core.models.save_checkpoint``) as a
run artifact (``model/checkpoint.pt`` plus ``model/xai-model.json`` with its SHA-256) and creates a
model version from it. ``load_version`` resolves ``models:/name/version`` or ``models:/name@alias``,
downloads the version's artifact and loads it with ``torch.load(weights_only=True)`` after checking
the recorded hash. A version logged with MLflow's pytorch flavor is a pickled module (loading it can
run arbitrary code), so it is loaded only with an explicit ``unsafe=True``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from core.errors import ModelError
from core.models import CHECKPOINT_FORMAT, LoadedModel, load_model
from registry.names import ModelRef, check_name, parse_models_uri

ARTIFACT_DIR = "model"
CHECKPOINT_NAME = "checkpoint.pt"
META_NAME = "xai-model.json"
UPLOAD_EXPERIMENT = "xai-model-uploads"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def client_for(tracking_uri: str | None = None) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


def ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise


def register_checkpoint(
    client: Any,
    name: str,
    checkpoint: str | Path,
    description: str | None = None,
    tags: dict[str, str] | None = None,
) -> Any:
    """Log ``checkpoint`` (must load weights-only) and register it as a new version of ``name``.
    Returns the MLflow ``ModelVersion``."""
    check_name(name)
    checkpoint = Path(checkpoint)
    loaded = load_model(checkpoint)  # refuse anything that does not load safely before uploading it
    digest = sha256(checkpoint)
    run = client.create_run(
        _experiment_id(client, UPLOAD_EXPERIMENT), run_name=f"upload-{name}", tags={"xai.upload_of": name}
    )
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / ARTIFACT_DIR
        staged.mkdir()
        (staged / CHECKPOINT_NAME).write_bytes(checkpoint.read_bytes())
        (staged / META_NAME).write_text(
            json.dumps(
                {
                    "format": CHECKPOINT_FORMAT,
                    "file": CHECKPOINT_NAME,
                    "sha256": digest,
                    "arch": loaded.arch,
                    "class_names": loaded.class_names,
                },
                indent=2,
            )
        )
        client.log_artifacts(run_id, str(staged), ARTIFACT_DIR)
    client.set_terminated(run_id)
    ensure_registered_model(client, name)
    return client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/{ARTIFACT_DIR}",
        run_id=run_id,
        tags={"xai.format": CHECKPOINT_FORMAT, "xai.sha256": digest, **(tags or {})},
        description=description,
    )


def resolve(client: Any, ref: ModelRef) -> Any:
    """The ``ModelVersion`` a reference points to (clear error when it does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        if ref.version:
            return client.get_model_version(ref.name, ref.version)
        return client.get_model_version_by_alias(ref.name, ref.alias)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "NOT_FOUND" in str(exc.error_code):
            raise ModelError(f"{ref.uri}: no such model version in the registry") from None
        raise


def load_version(uri: str, unsafe: bool = False, tracking_uri: str | None = None) -> LoadedModel:
    """Load ``models:/name/version`` or ``models:/name@alias`` (weights-only unless ``unsafe``)."""
    ref = parse_models_uri(uri)
    client = client_for(tracking_uri)
    mv = resolve(client, ref)
    with tempfile.TemporaryDirectory() as tmp:
        import mlflow.artifacts

        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=client.get_model_version_download_uri(mv.name, mv.version),
                    dst_path=tmp,
                    tracking_uri=tracking_uri,
                )
            )
        except Exception as exc:
            raise ModelError(f"{ref.uri}: cannot download the version's artifacts: {exc}") from None
        loaded = _load_local(local, ref.uri, unsafe, mv.tags or {})
    loaded.meta = {
        **loaded.meta,
        "registry": {"name": mv.name, "version": mv.version, "source": mv.source, "run_id": mv.run_id},
    }
    return loaded


def _load_local(local: Path, uri: str, unsafe: bool, tags: dict[str, str]) -> LoadedModel:
    folder = local if local.is_dir() else local.parent
    meta_file = folder / META_NAME
    if meta_file.is_file() or (folder / CHECKPOINT_NAME).is_file():
        path = folder / CHECKPOINT_NAME
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if not path.is_file():
            raise ModelError(f"{uri}: the version's artifact has no {CHECKPOINT_NAME}")
        expected = meta.get("sha256") or tags.get("xai.sha256")
        if expected and sha256(path) != expected:
            raise ModelError(
                f"{uri}: {CHECKPOINT_NAME} does not match its recorded SHA-256 (corrupted or altered)"
            )
        return _load_file(path, uri, unsafe)
    if (folder / "MLmodel").is_file():
        return _load_mlflow_pytorch(folder, uri, unsafe)
    candidates = (
        [local] if local.is_file() else sorted(p for p in folder.rglob("*") if p.suffix in (".pt", ".pth"))
    )
    if len(candidates) != 1:
        raise ModelError(f"{uri}: the version's artifact holds no xai checkpoint, MLmodel or single .pt file")
    return _load_file(candidates[0], uri, unsafe)


def _load_file(path: Path, uri: str, unsafe: bool) -> LoadedModel:
    try:
        return load_model(path, unsafe=unsafe)
    except ModelError as exc:
        raise ModelError(f"{uri}: {str(exc).replace(str(path), path.name)}") from None


def _load_mlflow_pytorch(folder: Path, uri: str, unsafe: bool) -> LoadedModel:
    import yaml

    flavors = (yaml.safe_load((folder / "MLmodel").read_text()) or {}).get("flavors", {})
    if "pytorch" not in flavors:
        raise ModelError(f"{uri}: MLflow model without the pytorch flavor ({', '.join(flavors) or 'none'})")
    if not unsafe:
        raise ModelError(
            f"{uri} is an MLflow pytorch-flavor model, i.e. a pickled module that can run arbitrary "
            "code when loaded; pass --unsafe-load only if you trust it, or register an xai "
            "checkpoint (registry.models.register_checkpoint)"
        )
    import mlflow.pytorch

    try:
        model = mlflow.pytorch.load_model(str(folder), map_location="cpu")
    except Exception as exc:
        raise ModelError(
            f"{uri}: cannot load the pytorch-flavor model: {type(exc).__name__}: {exc}"
        ) from None
    return LoadedModel(model.eval(), None, None)
